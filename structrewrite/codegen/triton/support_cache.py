"""Layouts derived from a sparse support, made once and reused while the support lives.

The support buffers of a layer (``crow``, ``col``, ``row``) do not change while it
trains; only ``values`` do. Whatever a kernel derives from them (a CSC copy, the channel
list of a channel-wise support, constant GEMM blocks) is cached here, keyed on the
buffers' identity (data pointer, held weakly), version (an in-place change rebuilds) and
the extra key parts the caller gives. Bounded: the oldest entry goes first.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch

_CACHE: dict = {}
MAX_ENTRIES = 2048


def cached(kind: str, tensors: Sequence[torch.Tensor], extra: tuple, build: Callable[[], Any]):
    """``build()`` once per (kind, tensors as they are now, extra); the stored value after."""
    key = (kind, *(t.data_ptr() for t in tensors), *(t._version for t in tensors),
           *(t.numel() for t in tensors), *extra)
    hit = _CACHE.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)):
        return hit[1]
    value = build()
    if len(_CACHE) >= MAX_ENTRIES:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (tuple(weakref.ref(t) for t in tensors), value)
    return value
