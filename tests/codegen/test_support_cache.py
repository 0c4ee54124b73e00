"""The cache of what kernels derive from a sparse support (``support_cache``): built once
per support as it is, rebuilt after an in-place change or for new buffers, and built on a
helper thread on CUDA (so that CUDA graphs' private pools, which take the calling
thread's allocations, never hold a cached tensor; checked on the device by the
benchmark's fresh-layer check)."""
import threading

import pytest
import torch

from structrewrite.codegen.triton import support_cache as sc


def test_built_once_per_support_and_rebuilt_after_a_change():
    crow, col = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([3, 1], dtype=torch.int32)
    calls = []

    def build():
        calls.append(1)
        return col.sum().item() + len(calls)

    first = sc.cached("test-kind", (crow, col), (2,), build)
    assert sc.cached("test-kind", (crow, col), (2,), build) == first and len(calls) == 1
    assert sc.cached("test-kind", (crow, col), (3,), build) != first      # another extra key
    col.add_(1)                                                            # in place: new version
    sc.cached("test-kind", (crow, col), (2,), build)
    assert len(calls) == 3
    other = col.clone()                                                    # other buffers, same values
    sc.cached("test-kind", (crow, other), (2,), build)
    assert len(calls) == 4


def test_every_live_support_stays_cached_however_many():
    """One entry per live support: with more supports than any count bound would hold
    (a large model and an EMA copy run every step), each is built once, and a second
    pass over them all builds nothing. An in-place change replaces its entry."""
    supports = [(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([i % 7], dtype=torch.int32))
                for i in range(5000)]
    calls = []

    def build():
        calls.append(1)
        return len(calls)

    def entries():   # this test's (other tests' tensors may die, and their entries go, meanwhile)
        return sum(k[0] == "test-many" for k in sc._CACHE)
    for _ in range(2):
        for crow, col in supports:
            sc.cached("test-many", (crow, col), (1,), build)
    assert len(calls) == 5000
    assert entries() == 5000
    crow, col = supports[17]
    col.add_(1)
    sc.cached("test-many", (crow, col), (1,), build)
    assert len(calls) == 5001 and entries() == 5000   # replaced, not added
    assert sc.cached("test-many", (crow, col), (1,), build) == 5001
    del supports, crow, col
    import gc
    gc.collect()
    assert entries() == 0


def test_helper_thread_returns_the_result_and_raises_the_error():
    here = threading.get_ident()
    assert sc.on_helper_thread(lambda: threading.get_ident()) != here
    assert sc.on_helper_thread(lambda: 42) == 42

    def fails():
        raise ValueError("bad support")
    with pytest.raises(ValueError, match="bad support"):
        sc.on_helper_thread(fails)


def test_cpu_builds_run_in_place():
    here = threading.get_ident()
    assert sc.outside_graph_pools(torch.device("cpu"), lambda: threading.get_ident()) == here


def test_an_entry_goes_with_its_tensors():
    """What a layer's support left in the cache (layouts, on the device) goes when the
    layer does."""
    import gc
    import weakref

    class Layout:
        pass
    crow, col = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([3, 1], dtype=torch.int32)
    layout = weakref.ref(sc.cached("test-life", (crow, col), (), Layout))
    keep = torch.tensor([0, 1], dtype=torch.int32)
    other = weakref.ref(sc.cached("test-life", (keep,), (), Layout))
    assert layout() is not None
    del col
    gc.collect()
    assert layout() is None and other() is not None
    assert not any(k[0] == "test-life" and len(k) > 4 for k in sc._CACHE)
