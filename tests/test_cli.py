"""The `structrewrite` command: passes, plan, rewrite, and one-line policy errors."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny_model:make"


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "structrewrite.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def setup(tmp_path):
    (tmp_path / "tiny_model.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))\n"
        "    return m, (torch.randn(4, 16),)\n")
    (tmp_path / "policy.yaml").write_text(
        "version: 1\nrules:\n  - match: '*'\n    rewrite: sparse_lowrank\n"
        "    with: {rank: 8, density: 0.05}\n")
    return tmp_path


def test_passes_json(tmp_path):
    res = run("passes", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["sparse_lowrank"]["options"]["init"]["choices"] == ["random", "svd", "lost"]


def test_plan_and_rewrite(tmp_path):
    setup(tmp_path)
    res = run("plan", MODEL, "-p", "policy.yaml", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert [r["site"] for r in json.loads(res.stdout)] == ["0", "2"]
    res = run("rewrite", MODEL, "-p", "policy.yaml", "-o", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"model.pt", "policy.yaml", "report.json", "report.md"}
    sd = torch.load(out / "model.pt")
    assert "0.sparse_col" in sd and "2.values" in sd
    report = json.loads((out / "report.json").read_text())
    assert [s["site"] for s in report["sites"]] == ["0", "2"]


def test_policy_error_is_one_line_and_exit_2(tmp_path):
    setup(tmp_path)
    (tmp_path / "bad.yaml").write_text("version: 1\nrules:\n  - match: '*'\n    rewrite: lowrank\n")
    res = run("plan", MODEL, "-p", "bad.yaml", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("structrewrite: policy error: bad.yaml:3: rule 0: unknown pass 'lowrank'")


def test_bad_model_spec_is_one_line_and_exit_2(tmp_path):
    res = run("plan", "no_such_module:make", "-p", "x.yaml", cwd=tmp_path)
    assert res.returncode == 2 and "cannot import 'no_such_module'" in res.stderr
    assert "Traceback" not in res.stderr


def test_rewrite_of_a_meta_model_says_the_state_dict_has_no_values(tmp_path):
    setup(tmp_path)
    (tmp_path / "meta_model.py").write_text(
        "import torch\n"
        "def make():\n"
        "    with torch.device('meta'):\n"
        "        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))\n")
    res = run("rewrite", "meta_model:make", "-p", "policy.yaml", "-o", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "model.pt holds shapes, no values" in res.stdout


def test_bench_without_a_name_lists_the_benchmarks_and_an_unknown_one_is_refused():
    res = run("bench", cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "sparse_lowrank" in res.stdout and "harness" not in res.stdout
    res = run("bench", "no_such_kernel", cwd=ROOT)
    assert res.returncode == 2 and "unknown benchmark 'no_such_kernel'" in res.stderr
