"""The benchmark harness's interleaved timing (no GPU: the per-call timer is replaced by a
model of a device whose speed drifts during the run)."""
from benchmarks import harness


class DriftingDevice:
    """Stands in for ``harness.timeit``: each call of ``fn`` costs ``cost[fn]`` ms times
    a slowdown that grows with every call made so far (a device warming up)."""

    def __init__(self, cost, drift_per_call=0.002):
        self.cost, self.drift, self.calls, self.order = cost, drift_per_call, 0, []

    def __call__(self, fn, nsets=1, reps=30, sync_each=False, raw=False):
        self.order.append(fn)
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
