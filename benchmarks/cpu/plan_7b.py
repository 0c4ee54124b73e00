"""Plan and rewrite of a LLaMA-7B-shaped model on the meta device (CPU timing).

    python -m benchmarks.cpu.plan_7b

SLTrain's 7B setting: every attention and MLP projection -> rank 1024, density 0.05,
``init: random``. Writes benchmarks/results/plan_7b.md and .json with the times, the
parameter counts and the formula's prediction.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import structrewrite as sr  # noqa: E402
from examples.models import llama_7b_meta  # noqa: E402

POLICY = {"version": 1, "defaults": {"seed": 0}, "rules": [
    {"match": "model.layers.*.self_attn.*_proj", "rewrite": "sparse_lowrank",
     "with": {"rank": 1024, "density": 0.05, "init": "random"}},
    {"match": "model.layers.*.mlp.*_proj", "rewrite": "sparse_lowrank",
     "with": {"rank": 1024, "density": 0.05, "init": "random"}},
]}


def formula(d=4096, ffn=11008, layers=32, vocab=32000, r=1024, density=0.05) -> int:
    def slr(m, n):
        return r * (m + n) + int(density * m * n + 0.5)
    per_layer = 4 * slr(d, d) + 2 * slr(ffn, d) + slr(d, ffn) + 2 * d
    return layers * per_layer + 2 * vocab * d + d


def main(repeats: int = 3) -> dict:
    model = llama_7b_meta()
    dense_params = sum(p.numel() for p in model.parameters())
    plan_times, rewrite_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = sr.plan(model, POLICY)
        plan_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = sr.rewrite(model, POLICY)
        rewrite_times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in res.model.parameters())
    out = {
        "benchmark": "plan_7b",
        "command": "python -m benchmarks.cpu.plan_7b",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "sites": len(plan),
        "plan_s_median": statistics.median(plan_times),
        "rewrite_s_median": statistics.median(rewrite_times),
        "plan_s": plan_times, "rewrite_s": rewrite_times,
        "params_dense": dense_params, "params_rewritten": params,
        "params_formula": formula(),
        "report_total_after": res.report.totals()["after"]["params"],
    }
    results = Path(__file__).resolve().parents[1] / "results"
    results.mkdir(exist_ok=True)
    (results / "plan_7b.json").write_text(json.dumps(out, indent=2))
    (results / "plan_7b.md").write_text(f"""# Plan and rewrite of a LLaMA-7B-shaped model (meta device)

Command: `{out['command']}`; machine: {out['machine']['cpu']}, {out['machine']['cores']} threads,
Python {out['machine']['python']}, torch {out['machine']['torch']}. Median of {repeats} runs.

Policy: every attention and MLP projection of the 32 layers -> `sparse_lowrank`
(rank 1024, density 0.05, init random), SLTrain's 7B setting.

| what | value |
|---|---|
| sites | {out['sites']} |
| plan (s, median) | {out['plan_s_median']:.3f} |
| rewrite incl. plan (s, median) | {out['rewrite_s_median']:.3f} |
| parameters, dense | {dense_params:,} |
| parameters, rewritten (counted) | {params:,} |
| parameters, rewritten (formula) | {out['params_formula']:,} |
""")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
