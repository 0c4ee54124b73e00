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
* ``Report``: collects environment, ceilings, cases and peers and writes
  ``results/<name>.md``, ``.json`` and ``.png``.
"""
from __future__ import annotations

import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync():
    torch.cuda.synchronize()


def timeit(fn: Callable[[int], object], nsets: int = 1, warmup: int = 5, reps: int = 30,
           min_ms: float = 0.0, sync_each: bool = False, raw: bool = False) -> dict:
    """Median/quartiles (ms) of ``fn(i % nsets)``, each call timed with its own events.
    ``raw``: the per-call device and host times too (``times``, ``host``)."""
    for i in range(warmup):
        fn(i % nsets)
    sync()
    times, host = [], []
    i = 0
    while i < reps or sum(times) < min_ms:
        n = max(reps - i, 1)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for start, stop in events:
            t0 = time.perf_counter()
            start.record()
            fn(i % nsets)
            stop.record()
            host.append((time.perf_counter() - t0) * 1e3)
            if sync_each:
                stop.synchronize()
            i += 1
        sync()
        times += [start.elapsed_time(stop) for start, stop in events]
    out = _stats(times, host, sync_each)
    if raw:
        out["times"], out["host"] = times, host
    return out


def _stats(times: list, host: list, sync_each: bool) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "reps": len(times),
            "host_ms": statistics.median(host), "sync_each": sync_each}


def interleaved(fns: dict, nsets: int = 1, reps: int = 30, rounds: int = 3,
                sync_each: bool = False) -> dict:
    """``{name: timeit result}`` for ``fns`` ({name: fn(i)}), timed in ``rounds`` rounds
    that each run every function for about reps / rounds calls (after its warm-up), in
    turn; each result's statistics are over all of that function's calls."""
    per = max(1, -(-reps // rounds))
    raw = {name: ([], []) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = timeit(fn, nsets, reps=per, sync_each=sync_each, raw=True)
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


def ceilings() -> dict:
    """Measured bf16 matmul rate (TFLOP/s) and device copy rate (GB/s, read + write)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = timeit(lambda i: a @ b, warmup=5, reps=20)["median_ms"]
    tflops = 2 * n ** 3 / (t * 1e-3) / 1e12
    del a, b
    nbytes = 2 << 30
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    tc = timeit(lambda i: dst.copy_(src), warmup=3, reps=20)["median_ms"]
    gbs = 2 * nbytes / (tc * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return {"matmul_bf16_tflops": tflops, "matmul_shape": [n, n, n],
            "copy_gbs": gbs, "copy_bytes": nbytes}


def cpu_model() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo, else what platform reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(command: str) -> dict:
    import triton
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": command,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


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
        lines = [f"# Benchmark `{self.name}`", "",
                 f"- device: {e.get('device')} ({e.get('sm_count')} SMs, {e.get('memory_gib')} GiB)",
                 f"- torch {e.get('torch')}, triton {e.get('triton')}, CUDA {e.get('cuda')}, "
                 f"Python {e.get('python')}",
                 f"- command: `{self.command}`",
                 f"- date (UTC): {e.get('date_utc')}"]
        if c:
            lines.append(f"- measured ceilings (same run): bf16 matmul {c['matmul_bf16_tflops']:.0f} "
                         f"TFLOP/s ({'x'.join(map(str, c['matmul_shape']))}), device copy "
                         f"{c['copy_gbs']:.0f} GB/s (read + write)")
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
        (outdir / f"{self.name}.json").write_text(json.dumps(blob, indent=1, default=str))
        if plot is not None:
            try:
                plot(outdir / f"{self.name}.png")
            except ImportError as exc:  # matplotlib missing: tables still written
                print(f"no plot: {exc}", file=sys.stderr)
        return outdir


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
