"""Tile choice and device facts shared by the Triton kernels.

``pick`` times the candidate configs of a kernel once per problem key on CUDA and keeps
the fastest; without CUDA, under the interpreter or with ``STRUCTREWRITE_TUNE=0`` it
returns the kernel's default. Timing happens at the first call at a new shape, which
must not be inside CUDA-graph capture; for a tile layer it takes seconds (the four
kernels' candidates, and Triton's first compilation of each).

Triton compiles a kernel per config, and these compilations can overlap. So before
timing, the candidates' first calls run in a pool of ``STRUCTREWRITE_COMPILE_THREADS``
threads (default: the CPUs this process may run on, at most 16; ``1`` compiles one by
one), on the caller's device and stream; the device is then synchronised and the timing
runs one candidate at a time as before. On the H200's host (16 cores; 32x32 tiles at the
three shapes of a LLaMA-1B block, 16384 tokens, a fresh Triton cache, no kept choices)
the first fwd+bwd of the three layers took 41.7 s with 16 threads against 109.2 s one
by one (each ``bsr_spmm`` choice 2.9-4.4 s against 9.3-11.1 s). The two runs agreed on
16 of the 20 choices and gave the same errors against the float64 reference
(2026-11-29; not in a results file). The trials' scratch buffers are made once for all threads (``lazily``):
the peak memory of the first fwd+bwd at 2048->5461 was 1696 MiB above the inputs with
the pool and 1929 MiB one by one (same day, not in a results file).

The choices are also kept on disk, one JSON file per device name and torch / Triton
version, in ``STRUCTREWRITE_TUNE_CACHE`` (default ``$XDG_CACHE_HOME/structrewrite`` or
``~/.cache/structrewrite``; ``0`` keeps nothing on disk), so that the next process on the
same machine takes them without timing. An entry names the candidate list it was chosen
from; when the list changes, or the entry is not one of the candidates, the problem is
timed again. ``tuned_configs()`` lists the choices and the candidates' times, or where a
choice came from the disk (the benchmarks store them with their results, and time
afresh: they switch the disk off).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
import triton
import triton.language as tl

TUNED: dict = {}
TUNE_LOG: dict = {}
TUNE = os.environ.get("STRUCTREWRITE_TUNE", "1") != "0"
# threads that make the candidates' first calls, and so Triton's compilations, at once
# (``_first_calls``); 1: each candidate compiles when the timing reaches it
COMPILE_THREADS = (int(os.environ.get("STRUCTREWRITE_COMPILE_THREADS", "0") or 0)
                   or min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1))


def _default_cache_dir() -> Optional[str]:
    where = os.environ.get("STRUCTREWRITE_TUNE_CACHE")
    if where is not None:
        return None if where in ("", "0") else where
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "structrewrite")


# where the choices are kept between processes (None: nowhere)
CACHE_DIR: Optional[str] = _default_cache_dir()
_DISK: dict = {}   # cache file -> its entries, read once per process


def interpreting() -> bool:
    """Under Triton's CPU interpreter. Its bf16 x bf16 dots are wrong (Triton 3.9); the
    kernels then take their operands as float32, which gives the same exact products as
    the tensor cores."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` (``acc`` None: ``a @ b``) in float32. ``IEEE``: the operands are taken
    as float32 and multiplied in full precision (float32 inputs, and any input under the
    interpreter, see ``interpreting``); else they go to the tensor cores as they are."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


_PROPS: dict = {}


def _properties(device: torch.device):
    """The CUDA device's properties, read once per device (the launchers ask per call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = _PROPS.get(index)
    if props is None:
        props = _PROPS[index] = torch.cuda.get_device_properties(index)
    return props


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere."""
    return _properties(device).multi_processor_count if device.type == "cuda" else 4


def has_tma(device: torch.device) -> bool:
    """Whether kernels on ``device`` can move blocks with the tensor memory accelerator
    (TMA, tensor descriptors): CUDA devices of compute capability 9.0 and above, and the
    interpreter, which emulates it."""
    if interpreting():
        return True
    return device.type == "cuda" and _properties(device).major >= 9


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grids and tile counts. ``triton.cdiv`` computes the
    same, but as a ``constexpr_function`` it costs several microseconds of host time per
    call from Python (about 6.6 us in Triton 3.9 on the CPU host here; nine calls per
    fwd+bwd of a tile layer)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1); ``triton.next_power_of_2`` without its
    host cost (``cdiv``)."""
    return 1 << max(0, (n - 1).bit_length())


def bucket(M: int) -> int:
    """Token counts share a tile choice up to the next power of two."""
    return next_power_of_2(M)


def pick(kind: str, key: tuple, candidates, run, default):
    """The fastest of ``candidates`` for ``(kind, *key)``, timed once with ``run(config)``
    (or read from the disk cache, where an earlier process timed the same problem)."""
    full = (kind,) + key
    if full in TUNED:
        return TUNED[full]
    if not TUNE or not torch.cuda.is_available() or interpreting():
        return default
    candidates = list(candidates)
    entry = _entry(full, candidates)
    kept = _read(entry, candidates)
    if kept is not None:
        TUNED[full] = kept
        TUNE_LOG[repr(full)] = {"from disk": CACHE_DIR}
        return kept
    if COMPILE_THREADS > 1 and len(candidates) > 1:
        _first_calls(candidates, run)
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
    if best_t < float("inf"):   # a choice that rests on a timing
        _write(entry, best)
    return best


def lazily(make):
    """A function that returns ``make()``, made at its first call only, whichever thread
    calls first: the trials' scratch buffers, which the first calls (``_first_calls``)
    ask for from several threads at once, are made once and only where a timing runs."""
    lock = threading.Lock()
    made = []

    def get():
        with lock:
            if not made:
                made.append(make())
        return made[0]
    return get


def _first_calls(candidates, run) -> None:
    """Calls ``run`` once per candidate from ``COMPILE_THREADS`` threads, on the caller's
    device and stream, and waits for the device: a candidate's first call compiles its
    kernels, and the compilations overlap. A failing candidate is left for the timing,
    which logs it."""
    device = torch.cuda.current_device()
    stream = torch.cuda.current_stream(device)

    def first(cfg):
        try:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                run(cfg)
        except Exception:   # noqa: BLE001 (timed again below, where it is logged)
            pass
    with ThreadPoolExecutor(min(COMPILE_THREADS, len(candidates))) as pool:
        list(pool.map(first, candidates))
    torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------
# the choices on disk
# ----------------------------------------------------------------------------------
def _device_name() -> str:
    return torch.cuda.get_device_name(torch.cuda.current_device())


def _cache_file() -> Optional[str]:
    if not CACHE_DIR:
        return None
    tag = f"{_device_name()}-torch{torch.__version__}-triton{triton.__version__}"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)
    return os.path.join(CACHE_DIR, f"tuning-{safe}.json")


def _entry(full: tuple, candidates: list) -> str:
    """The problem and the candidate list it is chosen from, as one string."""
    digest = hashlib.sha1(repr(candidates).encode()).hexdigest()[:12]
    return f"{full!r} of {digest}"


def _load(path: str) -> dict:
    if path not in _DISK:
        try:
            with open(path) as f:
                data = json.load(f)
            _DISK[path] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):   # none yet, or unreadable: time afresh
            _DISK[path] = {}
    return _DISK[path]


def _read(entry: str, candidates: list):
    """The kept choice for ``entry``, if it is one of ``candidates``."""
    path = _cache_file()
    if path is None:
        return None
    kept = _load(path).get(entry)
    if not isinstance(kept, dict) or "config" not in kept:
        return None
    config = _from_json(kept["config"])
    return config if config in candidates else None


def _write(entry: str, config) -> None:
    """Adds ``entry`` to the cache file: read again, merged and replaced in one rename,
    so that processes writing at once lose no entry but the other's latest."""
    path = _cache_file()
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _DISK.pop(path, None)
        data = dict(_load(path))
        data[entry] = {"config": _to_json(config)}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
        _DISK[path] = data
    except OSError:   # a read-only home or full disk: the choice stays in this process
        pass


def _to_json(config):
    return list(map(_to_json, config)) if isinstance(config, tuple) else config


def _from_json(value):
    return tuple(map(_from_json, value)) if isinstance(value, list) else value


def tuned_configs() -> dict:
    """The configs chosen so far and the candidates' times (ms), by (kind, problem key)."""
    return {repr(k): {"chosen": v, "candidates_ms": TUNE_LOG.get(repr(k), {})}
            for k, v in TUNED.items()}
