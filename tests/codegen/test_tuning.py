"""Tile choice by timing (codegen/triton/tuning.py), and the kernels' timing trials: on
the CPU the timer is replaced by one that runs each candidate once under Triton's
interpreter and reports a made-up time, so that the choosing code and the trials (which
run on scratch copies, never on the real outputs) are exercised without a GPU."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import itertools  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from structrewrite.codegen.triton import sparse_lowrank as sl  # noqa: E402
from structrewrite.codegen.triton import sparse_lowrank_block as blk  # noqa: E402
from structrewrite.codegen.triton import tuning  # noqa: E402
from structrewrite.nn.sparse_lowrank import SparseLowRankLinear  # noqa: E402
from structrewrite.ops.sparse_lowrank_linear import reference, reference_backward  # noqa: E402


@pytest.fixture
def timed(monkeypatch):
    """Tuning switched on as on a GPU; each candidate runs once and gets the next time of
    a decreasing sequence (so the last one that runs wins)."""
    monkeypatch.setattr(tuning, "TUNE", True)
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tuning, "TUNED", {})
    monkeypatch.setattr(tuning, "TUNE_LOG", {})
    clock = itertools.count(1000, -1)
    ran = []

    def do_bench(fn, **kw):
        fn()
        ran.append(1)
        return float(next(clock))
    monkeypatch.setattr(tuning.triton.testing, "do_bench", do_bench)
    return ran


def test_pick_keeps_the_fastest_skips_failures_and_caches(timed):
    def run(cfg):
        if cfg == "bad":
            raise RuntimeError("out of resources")
    assert tuning.pick("k", (1,), ["a", "bad", "b"], run, "default") == "b"
    assert tuning.pick("k", (1,), ["a", "bad", "b"], run, "default") == "b"   # cached
    assert len(timed) == 2
    log = tuning.tuned_configs()["('k', 1)"]
    assert log["chosen"] == "b" and log["candidates_ms"]["'bad'"].startswith("failed")
    assert tuning.pick("k", (2,), [], run, "default") == "default"            # nothing ran


def test_pick_without_a_gpu_returns_the_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tuning.pick("k", (3,), ["a"], lambda c: None, "default") == "default"


@pytest.mark.parametrize("block", [1, 16])
def test_trials_leave_the_outputs_right(timed, monkeypatch, block):
    """The op's forward and backward choose their tiles by timing trials (here: every
    interpreter-sized candidate), then run once for real; the result equals the reference."""
    small_spmm = [(16, 16, 0, 0, 4), (32, 16, 8, 2, 4)]
    monkeypatch.setattr(sl, "SPMM_CANDIDATES", small_spmm)
    monkeypatch.setattr(sl, "SPMM_DEFAULT", small_spmm[0])
    monkeypatch.setattr(sl, "SDDMM_CANDIDATES", [("mm", 16, 16, 16, 4, 2), ("gather", 16, 16, 0, 4)])
    monkeypatch.setattr(sl, "SDDMM_DEFAULT", ("mm", 16, 16, 16, 4, 2))
    monkeypatch.setattr(blk, "SPMM_CANDIDATES", [(16, 4, 2), (32, 4, 2)])
    monkeypatch.setattr(blk, "SDDMM_CANDIDATES", [(16, 0, 4, 2), (32, 2, 4, 2)])
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    layer = SparseLowRankLinear(48, 40, rank=6, density=0.2, init="random", block=block, key="t")
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 9, 48)
    g = torch.randn(2, 9, 40)
    args = (x, layer.A.detach(), layer.B.detach(), layer.values.detach(), layer.sparse_crow,
            layer.sparse_col, layer.sparse_row, layer.bias.detach(), layer.scale)
    y = sl._forward_cuda(*args)
    grads = sl._backward_cuda(g, *args[:7], layer.scale)
    assert len(timed) >= 6                                   # every candidate was tried
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    assert rel(y, reference(*args)) < 1e-5, f"seed {seed}"
    for a, b in zip(grads, reference_backward(g, *args[:7], layer.scale)):
        assert rel(a, b) < 1e-5, f"seed {seed}"
