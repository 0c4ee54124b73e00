"""The benchmark harness: interleaved timing (the per-call timer replaced by a model of a
device whose speed drifts during the run), the CPU timer, the rates, the runner's module
list and the result files (all without a GPU)."""
import json
import time

import pytest
import torch

from benchmarks import available, harness


class DriftingDevice:
    """Stands in for ``harness.timeit``: each call of ``fn`` costs ``cost[fn]`` ms times
    a slowdown that grows with every call made so far (a device warming up)."""

    def __init__(self, cost, drift_per_call=0.002):
        self.cost, self.drift, self.calls, self.order = cost, drift_per_call, 0, []

    def __call__(self, fn, nsets=1, warmup=5, reps=30, sync_each=False, raw=False, device=None):
        self.order.append(fn)
        self.asked = getattr(self, "asked", []) + [(fn, warmup, reps)]
        times = []
        for _ in range(reps):
            times.append(self.cost[fn] * (1.0 + self.drift * self.calls))
            self.calls += 1
        host = [0.01] * reps
        return {"times": times, "host": host, **harness._stats(times, host, sync_each)}


def test_interleaved_runs_the_peers_in_alternating_rounds_and_pools_their_calls(monkeypatch):
    device = DriftingDevice({"ours": 1.0, "dense": 2.0}, drift_per_call=0.0)
    monkeypatch.setattr(harness, "timeit", device)
    out = harness.interleaved({"ours": "ours", "dense": "dense"}, nsets=2, reps=30, rounds=3)
    assert device.order == ["ours", "dense"] * 3
    assert out["ours"]["reps"] == 30 and out["dense"]["reps"] == 30
    assert out["ours"]["median_ms"] == 1.0 and out["dense"]["median_ms"] == 2.0
    assert set(out["ours"]) == {"median_ms", "q1_ms", "q3_ms", "reps", "host_ms", "sync_each"}


def test_interleaving_keeps_a_drift_out_of_the_ratio(monkeypatch):
    """With the device slowing down during the run, timing one peer after the other puts
    the drift into their ratio; alternating rounds keep the ratio near the true one."""
    cost = {"ours": 1.0, "dense": 1.0}          # the true ratio is 1
    seq = DriftingDevice(cost)
    monkeypatch.setattr(harness, "timeit", seq)
    one_after_other = {k: seq(k, reps=30)["median_ms"] for k in cost}
    inter = DriftingDevice(cost)
    monkeypatch.setattr(harness, "timeit", inter)
    alternating = {k: v["median_ms"] for k, v in harness.interleaved({k: k for k in cost}, reps=30,
                                                                     rounds=3).items()}
    ratio_seq = one_after_other["dense"] / one_after_other["ours"]
    ratio_alt = alternating["dense"] / alternating["ours"]
    assert abs(ratio_seq - 1.0) > 0.05                  # the drift shows in the sequential ratio
    assert abs(ratio_alt - 1.0) < abs(ratio_seq - 1.0) / 2


def test_interleaved_times_exactly_the_reps_asked_and_warms_up_once(monkeypatch):
    """20 calls over 3 rounds are 7 + 7 + 6 timed calls (not 3 x 7), and only the first
    round warms up: later rounds add no untimed calls."""
    device = DriftingDevice({"a": 1.0, "b": 1.0}, drift_per_call=0.0)
    monkeypatch.setattr(harness, "timeit", device)
    out = harness.interleaved({"a": "a", "b": "b"}, reps=20, rounds=3)
    assert [(w, r) for fn, w, r in device.asked if fn == "a"] == [(5, 7), (0, 7), (0, 6)]
    assert out["a"]["reps"] == out["b"]["reps"] == 20
    device = DriftingDevice({"a": 1.0}, drift_per_call=0.0)
    monkeypatch.setattr(harness, "timeit", device)
    assert harness.interleaved({"a": "a"}, reps=2, rounds=3)["a"]["reps"] == 2
    with pytest.raises(ValueError, match="reps >= 1"):
        harness.interleaved({"a": "a"}, reps=0)


def test_timeit_on_the_cpu_counts_its_calls_and_extends_to_min_ms():
    calls = []

    def fn(i):
        calls.append(i)
        time.sleep(0.002)
    t = harness.timeit(fn, nsets=3, warmup=2, reps=7, raw=True, device="cpu")
    assert t["reps"] == 7 and len(calls) == 9 and calls[2:] == [0, 1, 2, 0, 1, 2, 0]
    assert all(ms >= 2.0 for ms in t["times"]) and t["times"] == t["host"]
    assert t["q1_ms"] <= t["median_ms"] <= t["q3_ms"]
    t = harness.timeit(fn, warmup=0, reps=3, min_ms=20.0, raw=True, device="cpu")
    # whole batches of 3 until they add up to min_ms, the last batch needed
    assert t["reps"] % 3 == 0 and sum(t["times"]) >= 20.0 > sum(t["times"][:-3])
    with pytest.raises(ValueError, match="reps >= 1"):
        harness.timeit(fn, reps=0, device="cpu")
    with pytest.raises(ValueError, match="'cuda' or 'cpu', not 'mps'"):
        harness.timeit(fn, device="mps")


def test_rates_and_flop_bounds():
    ceil = {"matmul_bf16_tflops": 800.0, "copy_gbs": 4000.0}
    r = harness.rates(2.0, flops=400e9, nbytes=2e9, ceil=ceil)
    assert r == pytest.approx({"tflops": 200.0, "gbs": 1000.0, "pct_matmul": 25.0, "pct_copy": 25.0})
    assert harness.flop_bound_ms(800e9, ceil) == pytest.approx(1.0)
    assert harness.rates(1.0, 1e12, 0)["tflops"] == pytest.approx(1000.0)
    with pytest.raises(KeyError, match="no fp16 matmul ceiling"):
        harness.rates(1.0, 1e12, 1e9, ceil=ceil, dtype=torch.float16)


def test_ceilings_environment_and_l2_sets_on_the_cpu(monkeypatch):
    c = harness.ceilings((torch.float32,), n=128, copy_bytes=1 << 20, device="cpu")
    assert c["matmul_fp32_tflops"] > 0 and c["copy_gbs"] > 0 and c["matmul_shape"] == [128] * 3
    env = harness.environment("python -m benchmarks x", "cpu")
    assert env["device"].startswith("CPU") and env["torch_threads"] >= 1
    monkeypatch.setattr(harness, "on_cuda", lambda: False)
    assert harness.sets_beyond_l2(1 << 20) == 2   # no L2 to beat: the minimum


def test_result_files_are_valid_json_markdown_and_a_plot(tmp_path):
    report = harness.Report("probe", "python -m benchmarks probe",
                            env=harness.environment("python -m benchmarks probe", "cpu"),
                            ceilings={"copy_gbs": 12.5})
    report.table("times", ["case", "ms", "note"],
                 [["a|b", float("nan"), 3.4e12], ["c", 0.123456, 1234.5]])
    report.data["cases"] = [{"graphed_ms": float("nan"), "ms": 1.5}]
    report.write(tmp_path, plot=lambda path: harness.plot_times(
        path, ["1x1", "2x2"], {"ours": [1.0, 2.0]}, {"FLOP bound": [0.5, 1.0]}))
    md = (tmp_path / "probe.md").read_text()
    assert "| a\\|b | - | 3.4e+12 |" in md and "| c | 0.123 | 1234 |" in md
    assert "memory copy 12 GB/s" in md and "no GPU" in md

    def refuse(const):
        raise ValueError(const)
    blob = json.loads((tmp_path / "probe.json").read_text(), parse_constant=refuse)
    assert blob["cases"][0]["graphed_ms"] is None and blob["tables"][0]["rows"][0][1] is None
    png = tmp_path / "probe.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_runner_lists_modules_but_not_helpers(tmp_path):
    for name in ("__init__", "harness", "_shared", "conv_kernels"):
        (tmp_path / f"{name}.py").write_text("")
    assert available(tmp_path) == ["conv_kernels"]
    assert "sparse_lowrank" in available() and "harness" not in available()
