"""The timing and reporting harness shared by every GPU benchmark.

* ``timeit(fn, nsets)``: CUDA-event timing of ``fn(i)`` for input set ``i`` cycling over
  ``nsets`` sets (so that repeated runs do not measure a warm L2), after warm-up; returns
  the median and the quartiles in milliseconds. Calls are issued back to back, as in a
  training loop: the device time of each call is measured while the host queues the
  next, so host-side launch cost shows only where it exceeds the device time. The host
  time per call is returned too (``host_ms``). ``sync_each=True`` synchronises before
  every call instead (each call then also pays its launch latency on an idle device).
* ``interleaved(fns, nsets)``: ``timeit`` of several functions (a case's peers) in
  alternating rounds, so that a drift of the device's speed during the run (clocks,
  temperature; on the H200 the median of the same dense fwd+bwd ranged from 2.10 to
  2.92 ms across four rounds of one process) falls on every peer alike; the statistics
  of each are over all of its calls.
* ``graphed(fn)``: the same call captured in a CUDA graph and replayed: device time
  without any host work between the kernels.
* ``peak_extra(fn)``: peak device memory allocated by ``fn()`` above what was allocated
  before it (the tensors it returns included).
* ``ceilings()``: the device's matmul (bf16, 8192³, random data) and copy (device to
  device, 2 GiB, bytes read + written) rates, measured in the same run as the cases.
* ``rates``, ``flop_bound_ms``: achieved TFLOP/s and GB/s of a time and their share of
  the ceilings; the time of a FLOP count at the measured matmul rate.
* ``sets_beyond_l2(bytes_per_set)``: how many input sets ``timeit`` must cycle so that a
  call never finds its inputs in the device's L2.
* ``plot_times``: time against shape, one line per peer, the FLOP bounds dotted.
* ``Report``: collects environment, ceilings, cases and peers and writes
  ``results/<name>.md``, ``.json`` (NaN written as null) and ``.png``.

``timeit``, ``interleaved``, ``ceilings`` and ``environment`` take ``device="cpu"`` (the
default without CUDA): they then time by the host clock (a CPU call is synchronous: its
host time is its time), so CPU benchmarks use the same harness; ``graphed`` and
``peak_extra`` need CUDA.
"""
from __future__ import annotations

import gc
import json
import math
import numbers
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def on_cuda() -> bool:
    """Whether the harness times on a CUDA device (else on the CPU, by the host clock)."""
    return torch.cuda.is_available()


def _device(device: Optional[str]) -> str:
    """"cuda" or "cpu": where the timed work runs (default: CUDA where there is a device)."""
    device = device or ("cuda" if on_cuda() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"the harness times on 'cuda' or 'cpu', not {device!r}")
    return device


def sync(device: Optional[str] = None):
    if _device(device) == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[int], object], nsets: int = 1, warmup: int = 5, reps: int = 30,
           min_ms: float = 0.0, sync_each: bool = False, raw: bool = False,
           device: Optional[str] = None) -> dict:
    """Median/quartiles (ms) of ``fn(i % nsets)``, each call timed with its own events
    (``device="cpu"``, the default without CUDA: by the host clock). ``reps`` calls are
    issued back to back (one by one with ``sync_each``); where they took less than
    ``min_ms`` in all, batches of ``reps`` more follow, issued the same way, until they
    do. ``raw``: the per-call device and host times too (``times``, ``host``)."""
    if reps < 1 or nsets < 1:
        raise ValueError(f"timeit needs reps >= 1 and nsets >= 1, got {reps} and {nsets}")
    device = _device(device)
    for i in range(warmup):
        fn(i % nsets)
    sync(device)
    times, host = [], []
    i = 0
    while i < reps or sum(times) < min_ms:
        batch = _timed_batch(fn, i, reps, nsets, sync_each, device)
        times += batch[0]
        host += batch[1]
        i += reps
    out = _stats(times, host, sync_each)
    if raw:
        out["times"], out["host"] = times, host
    return out


def _timed_batch(fn, first: int, n: int, nsets: int, sync_each: bool,
                 device: str) -> tuple[list, list]:
    """(device ms, host ms) of calls ``first .. first + n - 1``."""
    host = []
    if device == "cpu":   # synchronous: the host time is the time
        for i in range(first, first + n):
            t0 = time.perf_counter()
            fn(i % nsets)
            host.append((time.perf_counter() - t0) * 1e3)
        return list(host), host
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
    for i, (start, stop) in enumerate(events, first):
        t0 = time.perf_counter()
        start.record()
        fn(i % nsets)
        stop.record()
        host.append((time.perf_counter() - t0) * 1e3)
        if sync_each:
            stop.synchronize()
    sync(device)
    return [start.elapsed_time(stop) for start, stop in events], host


def _stats(times: list, host: list, sync_each: bool) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "reps": len(times),
            "host_ms": statistics.median(host), "sync_each": sync_each}


def interleaved(fns: dict, nsets: int = 1, reps: int = 30, rounds: int = 3,
                sync_each: bool = False, warmup: int = 5, device: Optional[str] = None) -> dict:
    """``{name: timeit result}`` for ``fns`` ({name: fn(i)}), timed in ``rounds`` rounds
    that each run every function in turn; the ``reps`` calls of each are split over the
    rounds (the first rounds take the remainder), and each function warms up in the
    first round only. Each result's statistics are over all of that function's calls."""
    if reps < 1:
        raise ValueError(f"interleaved needs reps >= 1, got {reps}")
    rounds = max(1, min(rounds, reps))
    raw = {name: ([], []) for name in fns}
    for r in range(rounds):
        per = reps // rounds + (r < reps % rounds)
        for name, fn in fns.items():
            t = timeit(fn, nsets, warmup=warmup if r == 0 else 0, reps=per,
                       sync_each=sync_each, raw=True, device=device)
            raw[name][0].extend(t["times"])
            raw[name][1].extend(t["host"])
    return {name: _stats(times, host, sync_each) for name, (times, host) in raw.items()}


def graphed(fn: Callable[[int], object], reps: int = 30) -> dict:
    """Device time of ``fn(0)`` captured once in a CUDA graph and replayed: the time of its
    kernels with no host work between them (one input set, so smaller inputs stay in L2).
    ``{"median_ms": nan, "error": ...}`` where the capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn(0)
        torch.cuda.current_stream().wait_stream(side)
        sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            keep = fn(0)
        out = timeit(lambda i: graph.replay(), 1, reps=reps)
        del graph, keep
        gc.collect()              # the captured autograd graph holds the pool's tensors in cycles
        torch.cuda.empty_cache()
        return out
    except Exception as exc:  # a capture the op does not allow: report, do not fail the run
        sync()
        return {"median_ms": float("nan"), "error": f"{type(exc).__name__}: {exc}"[:200]}


def peak_extra(fn: Callable[[], object]) -> int:
    """Peak bytes allocated while ``fn()`` runs, above the allocation before it."""
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
          torch.float64: "fp64"}


def _dtype(dtype) -> torch.dtype:
    """A torch dtype, or its name, as a torch dtype."""
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _short(dtype) -> str:
    """bf16, fp16, fp32 or fp64 for a torch dtype or its name."""
    dt = _dtype(dtype)
    if dt not in _SHORT:
        raise ValueError(f"no matmul ceiling for {dtype}: one of {sorted(_SHORT.values())}")
    return _SHORT[dt]


def ceilings(dtypes=(torch.bfloat16,), n: Optional[int] = None,
             copy_bytes: Optional[int] = None, device: Optional[str] = None) -> dict:
    """Measured matmul rate of each dtype (``matmul_bf16_tflops``, ``matmul_fp32_tflops``,
    ...: n x n x n on random data) and device copy rate (``copy_gbs``, bytes read +
    written). Defaults: n = 8192 and 2 GiB on CUDA; on the CPU n = 2048 and 256 MiB
    (there name torch.float32 in ``dtypes``: the CPU's own GEMM rate)."""
    dev = _device(device)
    n = n or (8192 if dev == "cuda" else 2048)
    out = {"matmul_shape": [n, n, n]}
    for dt in dtypes:
        name = _short(dt)
        a = torch.randn(n, n, device=dev, dtype=_dtype(dt))
        b = torch.randn(n, n, device=dev, dtype=_dtype(dt))
        t = timeit(lambda i: a @ b, warmup=3 if dev == "cuda" else 1,
                   reps=20 if dev == "cuda" else 3, device=dev)["median_ms"]
        out[f"matmul_{name}_tflops"] = 2 * n ** 3 / (t * 1e-3) / 1e12
        del a, b
    nbytes = copy_bytes or ((2 << 30) if dev == "cuda" else (256 << 20))
    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    tc = timeit(lambda i: dst.copy_(src), warmup=3, reps=20 if dev == "cuda" else 5,
                device=dev)["median_ms"]
    out.update(copy_gbs=2 * nbytes / (tc * 1e-3) / 1e9, copy_bytes=nbytes)
    del src, dst
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def matmul_tflops(ceil: dict, dtype=torch.bfloat16) -> float:
    """The measured matmul rate of ``dtype`` (a torch dtype or its name) in ``ceil``."""
    key = f"matmul_{_short(dtype)}_tflops"
    if key not in ceil:
        raise KeyError(f"no {_short(dtype)} matmul ceiling was measured: pass {dtype} in "
                       f"ceilings(dtypes=...) (measured: "
                       f"{sorted(k for k in ceil if k.endswith('_tflops'))})")
    return ceil[key]


def flop_bound_ms(flops: float, ceil: dict, dtype=torch.bfloat16) -> float:
    """The time of ``flops`` at the measured matmul rate of ``dtype`` (ms)."""
    return flops / (matmul_tflops(ceil, dtype) * 1e9)


def rates(ms: float, flops: float, nbytes: float, ceil: Optional[dict] = None,
          dtype=torch.bfloat16) -> dict:
    """Achieved ``tflops`` and ``gbs`` of a call of ``ms`` that does ``flops`` useful
    FLOPs and must move ``nbytes`` (the fewest bytes: inputs read once, outputs written
    once), and with the ceilings their shares in percent (``pct_matmul``, ``pct_copy``:
    the compute- and memory-utilisation figures of EfficientLLM)."""
    out = {"tflops": flops / (ms * 1e-3) / 1e12, "gbs": nbytes / (ms * 1e-3) / 1e9}
    if ceil:
        out["pct_matmul"] = 100 * out["tflops"] / matmul_tflops(ceil, dtype)
        out["pct_copy"] = 100 * out["gbs"] / ceil["copy_gbs"]
    return out


def l2_bytes() -> Optional[int]:
    """The CUDA device's L2 cache size in bytes (None without CUDA)."""
    if not on_cuda():
        return None
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)) or None


def sets_beyond_l2(bytes_per_set: int, factor: float = 2.0, at_least: int = 2) -> int:
    """How many input sets ``timeit(fn, nsets)`` should cycle so that the sets together
    hold ``factor`` times the L2 (a call then finds none of its inputs left in L2 by the
    calls before it): at least ``at_least``."""
    l2 = l2_bytes() or 0
    return max(at_least, math.ceil(factor * l2 / max(bytes_per_set, 1)))


def plot_times(path, xs: list, series: dict, bounds: Optional[dict] = None,
               xlabel: str = "shape", title: str = "", ylabel: str = "median ms",
               logy: bool = True):
    """A PNG of time against shape: ``series`` {peer: [ms per x]} as lines with markers,
    ``bounds`` {label: [ms per x]} (FLOP bounds) dotted. Needs matplotlib (ImportError
    otherwise, which ``Report.write`` turns into a note)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    pos = list(range(len(xs)))
    for name, ys in series.items():
        ax.plot(pos, ys, marker="o", label=name)
    for name, ys in (bounds or {}).items():
        ax.plot(pos, ys, ls=":", color="k", label=name)
    ax.set_xticks(pos, [str(x) for x in xs], rotation=20)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_model() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo, else what platform reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(command: str, device: Optional[str] = None) -> dict:
    """Device, versions, the command and the date, for the head of a result file.
    ``device``: "cuda" or "cpu" (default: CUDA where there is a device)."""
    common = {"torch": torch.__version__, "python": platform.python_version(),
              "command": command, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        import triton
        common["triton"] = triton.__version__
    except ImportError:
        common["triton"] = None
    if _device(device) == "cpu":
        return {"device": f"CPU: {cpu_model()}", "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), **common}
    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "cuda": torch.version.cuda, **common}


@dataclass
class Report:
    """One benchmark's results; ``write`` produces results/<name>.{md,json,png}."""
    name: str
    command: str
    env: dict = field(default_factory=dict)
    ceilings: dict = field(default_factory=dict)
    sections: list = field(default_factory=list)   # (title, columns, rows, note)
    data: dict = field(default_factory=dict)       # everything else, for the JSON

    def table(self, title: str, columns: list[str], rows: list[list], note: str = ""):
        self.sections.append((title, columns, rows, note))

    def markdown(self) -> str:
        e, c = self.env, self.ceilings
        lines = [f"# Benchmark `{self.name}`", ""]
        if "sm_count" in e:
            l2 = f", {e['l2_mib']} MiB L2" if e.get("l2_mib") else ""
            lines += [f"- device: {e.get('device')} ({e.get('sm_count')} SMs, "
                      f"{e.get('memory_gib')} GiB{l2})",
                      f"- torch {e.get('torch')}, triton {e.get('triton')}, CUDA {e.get('cuda')}, "
                      f"Python {e.get('python')}"]
        else:
            lines += [f"- device: {e.get('device')} ({e.get('cpus')} CPUs, "
                      f"{e.get('torch_threads')} torch threads)",
                      f"- torch {e.get('torch')}, Python {e.get('python')}, no GPU"]
        lines += [f"- command: `{self.command}`", f"- date (UTC): {e.get('date_utc')}"]
        matmuls = [(k[len("matmul_"):-len("_tflops")], v) for k, v in c.items()
                   if k.startswith("matmul_") and k.endswith("_tflops")]
        if matmuls or "copy_gbs" in c:
            parts = [f"{name} matmul {v:.0f} TFLOP/s" if v >= 10 else f"{name} matmul {v:.3g} TFLOP/s"
                     for name, v in matmuls]
            if matmuls and "matmul_shape" in c:
                parts[-1] += f" ({'x'.join(map(str, c['matmul_shape']))})"
            if "copy_gbs" in c:
                parts.append(f"{'device' if 'sm_count' in e else 'memory'} copy "
                             f"{c['copy_gbs']:.0f} GB/s (read + write)")
            lines.append("- measured ceilings (same run): " + ", ".join(parts))
        for title, cols, rows, note in self.sections:
            lines += ["", f"## {title}", ""]
            if note:
                lines += [note, ""]
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for r in rows:
                lines.append("| " + " | ".join(_fmt(v) for v in r) + " |")
        return "\n".join(lines) + "\n"

    def write(self, outdir: Optional[Path] = None, plot: Optional[Callable] = None) -> Path:
        outdir = Path(outdir or RESULTS)
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / f"{self.name}.md").write_text(self.markdown())
        blob = {"name": self.name, "command": self.command, "env": self.env,
                "ceilings": self.ceilings,
                "tables": [{"title": t, "columns": c, "rows": r, "note": n}
                           for t, c, r, n in self.sections], **self.data}
        (outdir / f"{self.name}.json").write_text(
            json.dumps(_finite(blob), indent=1, default=str, allow_nan=False))
        if plot is not None:
            try:
                plot(outdir / f"{self.name}.png")
            except ImportError as exc:  # matplotlib missing: tables still written
                print(f"no plot: {exc}", file=sys.stderr)
        return outdir


def _finite(obj):
    """``obj`` with every NaN or infinite float (a capture that failed, a ratio of
    nothing) as None: JSON has no NaN, and strict parsers refuse it."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, numbers.Real) and not isinstance(obj, (bool, int)) \
            and not math.isfinite(float(obj)):
        return None
    if isinstance(obj, numbers.Real) and not isinstance(obj, bool) and type(obj).__module__ == "numpy":
        return obj.item()
    return obj


def _fmt(v) -> str:
    """A table cell: floats (Python, NumPy or one-element tensors) to 3 significant
    digits, whole numbers from 100 to 1e6 without decimals, larger ones in exponent
    form; NaN as "-"; a "|" escaped so that it does not split the cell."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral)):
        v = float(v)
        if v != v:
            return "-"
        a = abs(v)
        if a < 100 or a >= 1e6:
            return f"{v:.3g}"
        return f"{v:.0f}"
    return str(v).replace("|", "\\|")
