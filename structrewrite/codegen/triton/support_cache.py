"""Layouts derived from a sparse support, made once and reused while the support lives.

The support buffers of a layer (``crow``, ``col``, ``row``) do not change while it
trains; only ``values`` do. Whatever a kernel derives from them (a CSC copy, the channel
list of a channel-wise support, constant GEMM blocks) is cached here, keyed on the
buffers' identity (data pointer, held weakly), version (an in-place change rebuilds) and
the extra key parts the caller gives. An entry goes when one of its tensors dies, and an
in-place change replaces it; so the cache holds one entry per live support and layout
kind, whatever the number of layers. (It has no count bound: a bound below what the
models of a process use, say a large model with an EMA or reference copy run every step,
would have every layer's layouts rebuilt at every call.)

What is cached is allocated outside any CUDA-graph memory pool (``outside_graph_pools``):
``torch.compile(mode="reduce-overhead")`` runs its first calls with the calling thread's
allocations going to the graph's private pool, and checks afterwards that everything
still alive in that pool is one of the graph's outputs. A layout cached there made a
freshly compiled layer fail that check on the H200 ("Detected 3 tensor(s) in the
cudagraph pool not tracked as outputs").
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Sequence

import torch

_CACHE: dict = {}
_SIDE: dict = {}


def on_helper_thread(fn: Callable[[], Any]):
    """``fn()`` run to completion on a new thread; its result returned, its exception
    raised here."""
    result: list = []

    def work():
        try:
            result.append((True, fn()))
        except BaseException as exc:   # re-raised in the caller
            result.append((False, exc))

    thread = threading.Thread(target=work, name="structrewrite-support-build")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def outside_graph_pools(device: torch.device, build: Callable[[], Any]):
    """``build()`` with its allocations taken from the ordinary pools of the caching
    allocator, also while CUDA graphs warm up. While ``torch.compile``'s CUDA graphs warm
    up or record, every allocation of the calling thread goes to the graph's private pool;
    so ``build()`` runs on a helper thread, on a side stream ordered after the work already
    queued on the caller's stream, which then waits for it. Freed blocks go back to the
    side stream's pool, and every later build waits for the caller's stream first, so a
    block is never reused while queued kernels still read it. Not allowed during capture
    itself (building synchronises with the host)."""
    if device.type != "cuda":
        return build()
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("a sparse support is first used inside CUDA-graph capture: call the "
                           "layer once (forward and backward) before capturing it")
    index = device.index if device.index is not None else torch.cuda.current_device()
    main = torch.cuda.current_stream(index)
    side = _SIDE.get(index)
    if side is None:
        side = _SIDE[index] = torch.cuda.Stream(index)

    def work():
        torch.cuda.set_device(index)
        side.wait_stream(main)
        with torch.cuda.stream(side), torch.no_grad():
            return build()

    value = on_helper_thread(work)
    main.wait_stream(side)
    return value


WRITES = "_structrewrite_writes"


def version(t: torch.Tensor) -> int:
    """``t``'s version counter, which an in-place change moves on. An inference tensor
    (made under ``torch.inference_mode``) keeps none: for it, -1 less the writes recorded
    with ``mark_written`` (a layer records its loads), so that a support loaded into
    inference-mode buffers is seen; other in-place changes to one are not."""
    if t.is_inference():
        return -1 - getattr(t, WRITES, 0)
    return t._version


def mark_written(t: torch.Tensor) -> None:
    """Records a write into ``t`` where its version counter cannot (inference tensors)."""
    if t.is_inference():
        setattr(t, WRITES, getattr(t, WRITES, 0) + 1)


def cached(kind: str, tensors: Sequence[torch.Tensor], extra: tuple, build: Callable[[], Any]):
    """``build()`` once per (kind, tensors, extra) as the tensors are now; the stored value
    after, until one of the tensors dies or changes in place."""
    key = (kind, *(t.data_ptr() for t in tensors), *(t.numel() for t in tensors), *extra)
    versions = tuple(version(t) for t in tensors)
    hit = _CACHE.get(key)
    if hit is not None:
        if hit[1] == versions and all(ref() is t for ref, t in zip(hit[0], tensors)):
            return hit[2]
        del _CACHE[key]   # written in place, or other tensors at the same address: rebuilt

    value = outside_graph_pools(tensors[0].device, build)

    def drop(ref, key=key, cache=_CACHE):
        """The entry goes with the first of its tensors to die: its value (layouts on the
        device) would otherwise outlive the layer, as in a sweep that builds model after
        model. (``cache`` is bound here: at interpreter exit the module's globals may
        already be gone when tensors die.)"""
        hit = cache.get(key)
        if hit is not None and any(r is ref for r in hit[0]):
            del cache[key]
    _CACHE[key] = (tuple(weakref.ref(t, drop) for t in tensors), versions, value)
    return value


def forget(tensors: Sequence[torch.Tensor]) -> None:
    """Drops every entry built from any of ``tensors``, and with it the weak references to
    them: ``torch.utils.swap_tensors`` (``load_state_dict`` under
    ``torch.__future__.set_swap_module_params_on_conversion(True)``) refuses a tensor
    that is weakly referenced."""
    ids = {id(t) for t in tensors}
    for key, (refs, _, _) in list(_CACHE.items()):
        if any(id(r()) in ids for r in refs):
            _CACHE.pop(key, None)
