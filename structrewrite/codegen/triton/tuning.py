"""Tile choice and device facts shared by the Triton kernels.

``pick`` times the candidate configs of a kernel once per problem key on CUDA and keeps
the fastest; without CUDA, under the interpreter or with ``STRUCTREWRITE_TUNE=0`` it
returns the kernel's default. The first call at a new shape therefore takes a few
hundred ms, and it must not happen inside CUDA-graph capture. ``tuned_configs()`` lists
the choices and the candidates' times (the benchmarks store them with their results).
"""
from __future__ import annotations

import os

import torch
import triton

TUNED: dict = {}
TUNE_LOG: dict = {}
TUNE = os.environ.get("STRUCTREWRITE_TUNE", "1") != "0"


def interpreting() -> bool:
    """Under Triton's CPU interpreter. Its bf16 x bf16 dots are wrong (Triton 3.9); the
    kernels then take their operands as float32, which gives the same exact products as
    the tensor cores."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def bucket(M: int) -> int:
    """Token counts share a tile choice up to the next power of two."""
    return 1 << max(0, (M - 1).bit_length())


def pick(kind: str, key: tuple, candidates, run, default):
    """The fastest of ``candidates`` for ``(kind, *key)``, timed once with ``run(config)``."""
    full = (kind,) + key
    if full in TUNED:
        return TUNED[full]
    if not TUNE or not torch.cuda.is_available() or interpreting():
        return default
    best, best_t = default, float("inf")
    log = TUNE_LOG.setdefault(repr(full), {})
    for cfg in candidates:
        try:
            t = triton.testing.do_bench(lambda: run(cfg), warmup=10, rep=40, return_mode="median")
        except Exception as exc:  # a config the device cannot run (resources): skip it
            log[repr(cfg)] = f"failed: {type(exc).__name__}"
            continue
        log[repr(cfg)] = t
        if t < best_t:
            best, best_t = cfg, t
    TUNED[full] = best
    return best


def tuned_configs() -> dict:
    """The configs chosen so far and the candidates' times (ms), by (kind, problem key)."""
    return {repr(k): {"chosen": v, "candidates_ms": TUNE_LOG.get(repr(k), {})}
            for k, v in TUNED.items()}
