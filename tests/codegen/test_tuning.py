"""Tile choice by timing (codegen/triton/tuning.py), and the kernels' timing trials: on
the CPU the timer is replaced by one that runs each candidate once under Triton's
interpreter and reports a made-up time, so that the choosing code and the trials (which
run on scratch copies, never on the real outputs) are exercised without a GPU."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import contextlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

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
    monkeypatch.setattr(tuning, "CACHE_DIR", None)   # nothing on disk unless a test says so
    monkeypatch.setattr(tuning, "COMPILE_THREADS", 1)   # the interpreter runs one kernel at a time
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



@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA calls of ``tuning._first_calls`` recorded per thread, without a GPU: the
    caller is on device 1, stream "s1"."""
    seen = {"device": [], "stream": [], "synchronize": []}
    here = threading.local()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"s{device}")

    @contextlib.contextmanager
    def device(d):
        here.device = d
        yield

    @contextlib.contextmanager
    def stream(s):
        here.stream = s
        yield
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: seen["synchronize"].append(d))
    seen["here"] = here
    return seen


def test_first_calls_overlap_on_the_callers_device_and_stream(fake_cuda, monkeypatch):
    """Every candidate's first call runs once, all of them at the same time (each waits
    at a barrier for the others), with the caller's device and stream; a failing one is
    passed over; the device is synchronised before the timing starts."""
    monkeypatch.setattr(tuning, "COMPILE_THREADS", 8)
    candidates = ["a", "b", "bad", "c"]
    meet = threading.Barrier(len(candidates), timeout=30)
    calls = []

    def run(cfg):
        meet.wait()                          # breaks (and fails the test) unless all four overlap
        calls.append((cfg, fake_cuda["here"].device, fake_cuda["here"].stream))
        if cfg == "bad":
            raise RuntimeError("out of resources")
    tuning._first_calls(candidates, run)
    assert sorted(calls) == [(c, 1, "s1") for c in sorted(candidates)]
    assert not meet.broken and fake_cuda["synchronize"] == [1]



def test_lazily_makes_once_for_threads_that_ask_at_once():
    """The trials' scratch buffers: asked for by every first call at the same moment, made
    once (not once per thread: a copy of a layer's output per thread), and not before."""
    made = []

    def make():
        made.append(1)
        time.sleep(0.05)                     # a slow allocation: the others ask meanwhile
        return object()
    get = tuning.lazily(make)
    assert made == []
    meet = threading.Barrier(8, timeout=30)

    def ask(_):
        meet.wait()
        return get()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert made == [1] and all(g is got[0] for g in got)

def test_pick_compiles_the_candidates_together_before_timing_them(timed, fake_cuda, monkeypatch):
    monkeypatch.setattr(tuning, "COMPILE_THREADS", 4)
    calls = []

    def run(cfg):
        calls.append((cfg, threading.current_thread() is threading.main_thread()))
        if cfg == "bad":
            raise RuntimeError("out of resources")
    assert tuning.pick("k", (5,), ["a", "bad", "b"], run, "default") == "b"
    # first calls in the pool's threads, all before the timing's (in the caller's thread)
    assert sorted(calls[:3]) == [("a", False), ("b", False), ("bad", False)]
    assert calls[3:] == [("a", True), ("bad", True), ("b", True)]
    assert fake_cuda["synchronize"] == [1]
    assert tuning.tuned_configs()["('k', 5)"]["candidates_ms"]["'bad'"].startswith("failed")
    monkeypatch.setattr(tuning, "COMPILE_THREADS", 1)      # one thread: straight to the timing
    calls.clear()
    tuning.pick("k", (6,), ["a", "b"], run, "default")
    assert len(calls) == 2 and fake_cuda["synchronize"] == [1]

@pytest.fixture
def on_disk(timed, tmp_path, monkeypatch):
    """``timed``, with the choices kept in a fresh directory for a made-up device."""
    monkeypatch.setattr(tuning, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_device_name", lambda: "Test GPU 80GB")
    monkeypatch.setattr(tuning, "_DISK", {})
    return timed


def _new_process(monkeypatch):
    """What a new process starts with: no choices in memory, the files not yet read."""
    monkeypatch.setattr(tuning, "TUNED", {})
    monkeypatch.setattr(tuning, "_DISK", {})


def test_choices_are_kept_on_disk_for_the_next_process(on_disk, tmp_path, monkeypatch):
    cands = [(64, 4, 3), ("mm", 128, 64), "fused"]
    assert tuning.pick("k", (1, torch.bfloat16), cands, lambda c: None, None) == "fused"
    assert len(on_disk) == 3
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and "Test_GPU_80GB" in files[0].name
    _new_process(monkeypatch)
    never = lambda c: pytest.fail("timed again")  # noqa: E731
    assert tuning.pick("k", (1, torch.bfloat16), cands, never, None) == "fused"
    assert tuning.tuned_configs()["('k', 1, torch.bfloat16)"]["candidates_ms"] == {
        "from disk": str(tmp_path)}
    # tuples come back as tuples
    _new_process(monkeypatch)
    assert tuning.pick("k2", (1,), [(64, 4, 3), ("mm", 1, 2)], lambda c: None, None) == ("mm", 1, 2)
    _new_process(monkeypatch)
    assert tuning.pick("k2", (1,), [(64, 4, 3), ("mm", 1, 2)], never, None) == ("mm", 1, 2)


def test_a_changed_candidate_list_or_problem_is_timed_again(on_disk, monkeypatch):
    tuning.pick("k", (1,), ["a", "b"], lambda c: None, None)
    _new_process(monkeypatch)
    assert tuning.pick("k", (1,), ["a", "b", "c"], lambda c: None, None) == "c"   # new list
    assert tuning.pick("k", (2,), ["a", "b"], lambda c: None, None) == "b"        # new problem
    assert len(on_disk) == 2 + 3 + 2


def test_an_unreadable_cache_file_is_timed_over_and_replaced(on_disk, tmp_path, monkeypatch):
    tuning.pick("k", (1,), ["a", "b"], lambda c: None, None)
    (path,) = tmp_path.iterdir()
    path.write_text("{not json")
    _new_process(monkeypatch)
    assert tuning.pick("k", (1,), ["a", "b"], lambda c: None, None) == "b"
    assert len(on_disk) == 4
    _new_process(monkeypatch)
    assert tuning.pick("k", (1,), ["a", "b"], lambda c: pytest.fail("timed again"), None) == "b"


def test_failed_trials_leave_nothing_on_disk_and_writes_merge(on_disk, tmp_path, monkeypatch):
    def fails(c):
        raise RuntimeError("out of resources")
    assert tuning.pick("k", (1,), ["a"], fails, "default") == "default"
    assert not list(tmp_path.iterdir())
    tuning.pick("k", (2,), ["a", "b"], lambda c: None, None)
    # another process wrote its own choice in the meantime: both survive the next write
    (path,) = tmp_path.iterdir()
    other = json.loads(path.read_text())
    other["('other', 9) of 000000000000"] = {"config": "x"}
    path.write_text(json.dumps(other))
    tuning.pick("k", (3,), ["a", "b"], lambda c: None, None)
    kept = json.loads(path.read_text())
    assert "('other', 9) of 000000000000" in kept and len(kept) == 3


def test_no_cache_dir_keeps_nothing(timed, tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTREWRITE_TUNE_CACHE", "0")
    assert tuning._default_cache_dir() is None
    monkeypatch.setenv("STRUCTREWRITE_TUNE_CACHE", str(tmp_path / "t"))
    assert tuning._default_cache_dir() == str(tmp_path / "t")
    monkeypatch.delenv("STRUCTREWRITE_TUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning._default_cache_dir() == str(tmp_path / "structrewrite")


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


def test_host_cdiv_and_next_power_of_2_match_tritons():
    for a in range(0, 300, 7):
        for b in (1, 2, 3, 16, 64, 128):
            assert tuning.cdiv(a, b) == tuning.triton.cdiv(a, b)
    for n in range(1, 2100, 3):
        assert tuning.next_power_of_2(n) == tuning.triton.next_power_of_2(n)
