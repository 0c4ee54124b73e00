"""Benchmark of ``structrewrite::sparse_lowrank_linear`` (y = s·(x Aᵀ)Bᵀ + x Sᵀ) on CUDA.

``python -m benchmarks sparse_lowrank [--tokens M] [--shapes ...] [--reps N] [--layers L]
[--skip-check] [--skip-ops] [--skip-e2e] [--e2e-modes eager,compiled,graphs] [--out DIR]``

1. Correctness on the device: the Triton implementation against the reference op
   (run on the CPU in float64), for bf16, fp16 and fp32, outputs poisoned with NaN; and
   fresh layers of each support kind, eagerly and compiled with
   ``mode="reduce-overhead"`` from their first call.
2. Per shape (bf16, M tokens, rank = in/4, density 0.03), fwd and fwd+bwd medians of
   ours (the layer's eager CUDA path, for the random, channel-wise and 16/32-tile
   supports; and the 32-tile layer through the torch.library op) and of the peers,
   all in this run: dense cuBLAS ``F.linear``; dense with its rows padded to 16 bytes
   (what Inductor does); the SLTrain-style path (W = s·B@A with S scatter-added, then
   ``F.linear``; autograd through W); the low-rank product alone. Ratios, achieved
   TFLOP/s and GB/s against the measured ceilings, peak extra memory of fwd+bwd against
   the dense-free bound, and a breakdown of our fwd+bwd into its kernels.
3. Every way of running a fwd+bwd: eager back to back, synchronised, captured in a CUDA
   graph, as a ``torch.cuda.make_graphed_callables`` layer, and (dense, the random
   support and the structured ones) under ``torch.compile(mode="reduce-overhead")``.
4. End to end: one training step (fwd, bwd, AdamW) of a stack of LLaMA-1B-shaped
   decoder layers (d=2048, ffn 5461, 16 heads), dense (also with the MLP width rounded
   up to 5504) against every linear replaced by SparseLowRankLinear (rank 512, density
   0.03): tokens/s and peak memory; then every variant again with the model under
   ``torch.compile`` (default mode), and under ``torch.compile(mode="reduce-overhead")``
   (``graphs``: the compiled graphs replayed as CUDA graphs, so the host's time to issue
   a step no longer bounds it).
"""
from __future__ import annotations

import argparse
import gc
import math
import shlex
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from benchmarks.harness import (Report, ceilings, environment, flop_bound_ms, graphed, interleaved,
                                peak_extra, rates, sync, timeit)
from structrewrite.codegen.triton import aligned

SHAPES = [(4096, 4096), (4096, 11008), (2048, 2048), (2048, 5461)]
COMPILED = ("channel", "block32")   # structured supports also timed under torch.compile
DENSITY = 0.03


def _support(out_f, in_f, density, device, gen):
    from structrewrite.nn.sparse_lowrank import csr_from_flat
    nnz = int(math.floor(density * out_f * in_f + 0.5))
    flat = torch.randperm(out_f * in_f, generator=gen)[:nnz]
    crow, col, row = csr_from_flat(flat, out_f, in_f)
    return crow.to(device), col.to(device), row.to(device)


def _channel_support(out_f, in_f, density, device, gen):
    """LOST's channel-wise support: round(density * in) input channels, all rows."""
    from structrewrite.nn.sparse_lowrank import channel_flat, csr_from_flat, lost_channels
    cols = torch.randperm(in_f, generator=gen)[:lost_channels(in_f, density)]
    flat = channel_flat(cols, out_f, in_f)
    crow, col, row = csr_from_flat(flat, out_f, in_f)
    return crow.to(device), col.to(device), row.to(device)


def _block_support(out_f, in_f, density, b, device, gen):
    """Whole aligned b x b tiles chosen at random (``block: b``), as many as the density gives."""
    from structrewrite.nn.sparse_lowrank import block_count, block_flat, csr_from_flat
    whole = (out_f // b) * (in_f // b)
    tiles = torch.randperm(whole, generator=gen)[:block_count(out_f, in_f, density, b)]
    crow, col, row = csr_from_flat(block_flat(tiles, in_f, b), out_f, in_f)
    return crow.to(device), col.to(device), row.to(device)


def _make_support(kind, out_f, in_f, density, device, gen):
    if kind == "channel":
        return _channel_support(out_f, in_f, density, device, gen)
    if kind.startswith("block"):
        return _block_support(out_f, in_f, density, int(kind[5:]), device, gen)
    return _support(out_f, in_f, density, device, gen)


STRUCTURED = ("channel", "block16", "block32")
# suffix of the peers that run a structured layer with its pads and slices as ATen's
# copies instead of ``aligned.copy_cols`` (timed at misaligned shapes only)
ATEN_PADS = "_aten_pads"


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------
# 1. correctness
# ----------------------------------------------------------------------------------
def check(report: Report) -> bool:
    from structrewrite.codegen.triton import sparse_lowrank as sl
    from structrewrite.ops.sparse_lowrank_linear import reference, reference_backward

    tol = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}
    cases = [  # (M, in, out, rank, density, bias, support)
        (1000, 1000, 1500, 64, 0.03, True, "random"), (333, 777, 555, 300, 0.1, False, "random"),
        (4097, 512, 1030, 8, 0.0, True, "random"), (1, 256, 300, 128, 0.05, True, "random"),
        # folded in several chunks of rows and of columns, misaligned output width
        (600, 2048, 5461, 64, 0.03, True, "random"),
        # the first two random cases take the folded path; run them on the gathers too
        (1000, 1000, 1500, 64, 0.03, True, "random-gathers"), (333, 777, 555, 300, 0.1, False, "random-gathers"),
        (1000, 1000, 1500, 64, 0.03, True, "channel"), (333, 777, 555, 300, 0.1, False, "channel"),
        (1000, 1000, 1500, 64, 0.03, True, "block32"), (333, 777, 555, 300, 0.1, False, "block16"),
        (4097, 512, 1030, 8, 0.05, True, "block64"), (1, 256, 300, 128, 0.1, False, "block32"),
    ]
    poisoned = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)  # noqa: E731
    saved, sl._empty = sl._empty, poisoned
    saved_f, sl.folded._empty = sl.folded._empty, poisoned
    from structrewrite.codegen.triton import tuning
    tune, tuning.TUNE = tuning.TUNE, False   # default tiles here; the timed shapes check the tuned ones
    rows, ok_all = [], True
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    try:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for M, in_f, out_f, rank, dens, has_bias, support in cases:
                crow, col, row = _make_support(support, out_f, in_f, dens, "cuda", gen)
                nnz = col.numel()
                cpu = dict(x=torch.randn(M, in_f, generator=gen),
                           A=torch.randn(rank, in_f, generator=gen) / in_f ** 0.5,
                           B=torch.randn(out_f, rank, generator=gen) / rank ** 0.5,
                           values=torch.randn(nnz, generator=gen) * 0.1,
                           bias=torch.randn(out_f, generator=gen) if has_bias else None)
                g = torch.randn(M, out_f, generator=gen)
                scale = 32.0 / rank
                dev = {k: (v.to("cuda", dtype) if v is not None else None) for k, v in cpu.items()}
                # the reference sees the same (rounded) inputs, in float64, on the CPU
                ref_in = {k: (v.to(dtype).double() if v is not None else None) for k, v in cpu.items()}
                c3 = (crow.cpu(), col.cpu(), row.cpu())
                y_ref = reference(
                    ref_in["x"], ref_in["A"], ref_in["B"], ref_in["values"], *c3, ref_in["bias"], scale)
                grads_ref = reference_backward(
                    g.to(dtype).double(), ref_in["x"], ref_in["A"], ref_in["B"], ref_in["values"], *c3, scale)
                with sl.folded.forced("never" if support.endswith("-gathers") else "auto"):
                    if sl.plan(crow, col, row, out_f, in_f).kind == "gather":
                        support = "random (folded)" if sl._folds(dev["x"], dev["A"], dev["B"], dev["values"]) \
                            else "random (gathers)"
                    y = torch.ops.structrewrite.sparse_lowrank_linear(
                        dev["x"], dev["A"], dev["B"], dev["values"], crow, col, row, dev["bias"], scale)
                    grads = torch.ops.structrewrite.sparse_lowrank_linear_backward(
                        g.to("cuda", dtype), dev["x"], dev["A"], dev["B"], dev["values"], crow, col, row,
                        scale)
                sync()
                errs = [_rel(y, y_ref)] + [(_rel(a, b) if b.numel() else 0.0)
                                           for a, b in zip(grads, grads_ref)]
                finite = bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(t).all()) for t in grads)
                ok = finite and max(errs) < tol[dtype]
                ok_all &= ok
                rows.append([str(dtype).replace("torch.", ""), support, f"{M}x{in_f}->{out_f}", rank, nnz,
                             has_bias, *[f"{e:.1e}" for e in errs], "yes" if ok else "NO"])
    finally:
        sl._empty, tuning.TUNE, sl.folded._empty = saved, tune, saved_f
    report.table("Correctness on the device (relative Frobenius error against the reference in float64)",
                 ["dtype", "support", "M x in -> out", "rank", "nnz", "bias", "y", "dx", "dA", "dB", "dvalues", "pass"],
                 rows, note="Outputs poisoned with NaN before each run; tolerances bf16 1e-2, "
                            "fp16 5e-3, fp32 1e-4. Fresh random inputs each run.")
    return ok_all


class _Layer(torch.nn.Module):
    """A peer as a module: ``fn(x, *params, *buffers)`` with its tensors registered, so that
    ``make_graphed_callables`` and ``torch.compile`` see them as the module's own (static
    for CUDA graphs) rather than as closure constants."""

    def __init__(self, fn, params, buffers=()):
        super().__init__()
        self.fn = fn
        self.names = []
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)
            self.names.append(f"p{i}")
        for i, b in enumerate(buffers):
            self.register_buffer(f"b{i}", b)
            self.names.append(f"b{i}")

    def forward(self, x):
        return self.fn(x, *[getattr(self, n) for n in self.names])


def _failed(exc) -> dict:
    sync()
    return {"median_ms": float("nan"), "host_ms": float("nan"), "error": f"{type(exc).__name__}: {exc}"[:300]}


def _graphed_callable(layer: torch.nn.Module, xs, gs, nsets: int, reps: int) -> dict:
    """fwd+bwd of ``torch.cuda.make_graphed_callables(layer)``, calls back to back: one CUDA
    graph for the forward and one for the backward, replayed per call; the input and the
    incoming gradient are copied into the graphs' static buffers each call (both counted)."""
    try:
        g_layer = torch.cuda.make_graphed_callables(layer, (xs[0],), num_warmup_iters=3)
        params = list(layer.parameters())

        def step(i):
            return torch.autograd.grad(g_layer(xs[i]), [xs[i], *params], gs[i])
        return timeit(step, nsets, reps=reps)
    except Exception as exc:   # a capture the path does not allow: report it, do not fail the run
        return _failed(exc)


def _compiled(layer: torch.nn.Module, xs, gs, nsets: int, reps: int) -> dict:
    """fwd+bwd of ``torch.compile(layer, mode="reduce-overhead")`` (Inductor and CUDA
    graphs), calls back to back; ``compile_s``: the first three calls (compilation, warm-up,
    capture)."""
    try:
        torch._dynamo.reset()
        c_layer = torch.compile(layer, mode="reduce-overhead")
        params = list(layer.parameters())

        def step(i):
            torch.compiler.cudagraph_mark_step_begin()
            return torch.autograd.grad(c_layer(xs[i]), [xs[i], *params], gs[i])
        t0 = time.perf_counter()
        for i in range(3):
            step(i % nsets)
        sync()
        compile_s = time.perf_counter() - t0
        out = timeit(step, nsets, reps=reps)
        out["compile_s"] = compile_s
        return out
    except Exception as exc:
        traceback.print_exc()
        return _failed(exc)
    finally:
        torch._dynamo.reset()


def check_modes(report: Report) -> bool:
    """Fresh layers of each support kind (their supports never seen before), run eagerly and
    under ``torch.compile(mode="reduce-overhead")`` from their very first call, so that
    everything derived from the support is built while CUDA graphs warm up; three fwd+bwd
    calls on new inputs each, the last against the reference."""
    from structrewrite.nn.sparse_lowrank import SparseLowRankLinear
    from structrewrite.ops.sparse_lowrank_linear import reference, reference_backward

    from structrewrite.codegen.triton import sparse_lowrank_folded as folded

    # random: the folded path at these sizes; random-gathers: the same kept on the gathers
    kinds = {"random": dict(init="random"), "random-gathers": dict(init="random"),
             "channel": dict(init="lost"), "block32": dict(init="random", block=32)}
    rows, ok_all = [], True
    for mode in ("eager", "reduce-overhead"):
        for kind, kw in kinds.items():
            for in_f, out_f in ((1024, 1536), (777, 555)):
                torch._dynamo.reset()
                layer = SparseLowRankLinear(in_f, out_f, rank=64, density=0.03, key=f"{mode}{kind}{in_f}",
                                            seed=torch.seed() % 2**31, **kw).to("cuda", torch.bfloat16)
                with torch.no_grad():
                    layer.B.normal_(0, 0.02)
                run = layer if mode == "eager" else torch.compile(layer, mode="reduce-overhead")
                params = [layer.A, layer.B, layer.values, layer.bias]
                try:
                    for _ in range(3):
                        x = torch.randn(4, 512, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                        g = torch.randn(4, 512, out_f, device="cuda", dtype=torch.bfloat16)
                        if mode != "eager":
                            torch.compiler.cudagraph_mark_step_begin()
                        with folded.forced("never" if kind == "random-gathers" else "auto"):
                            y = run(x)
                            grads = torch.autograd.grad(y, [x, *params], g)
                        got = [t.detach().clone() for t in (y, *grads)]
                    sync()
                    ref = [t.detach().double().cpu() for t in (x, layer.A, layer.B, layer.values)]
                    sup = (layer.sparse_crow.cpu(), layer.sparse_col.cpu(), layer.sparse_row.cpu())
                    bias = layer.bias.detach().double().cpu()
                    want = [reference(*ref, *sup, bias, layer.scale),
                            *reference_backward(g.double().cpu(), *ref, *sup, layer.scale),
                            g.double().cpu().reshape(-1, out_f).sum(0)]
                    errs = [_rel(a, b) for a, b in zip(got, want)]
                    ok = max(errs) < 1e-2
                    detail = " ".join(f"{e:.1e}" for e in errs)
                except Exception as exc:   # report the failure, keep checking the rest
                    traceback.print_exc()
                    ok, detail = False, f"{type(exc).__name__}: {exc}"[:160]
                ok_all &= ok
                rows.append([mode, kind, f"{in_f}->{out_f}", detail, "yes" if ok else "NO"])
    torch._dynamo.reset()
    report.table("Fresh layers in eager mode and under torch.compile(mode='reduce-overhead')",
                 ["mode", "support", "in->out", "rel. error y dx dA dB dvalues dbias", "pass"], rows,
                 note="SparseLowRankLinear in bf16, 2048 tokens, rank 64, density 0.03, compiled "
                      "before its first call; the third call against the float64 reference "
                      "(tolerance 1e-2).")
    return ok_all


# ----------------------------------------------------------------------------------
# 2. op timings
# ----------------------------------------------------------------------------------
def op_cases(report: Report, M: int, shapes, nsets: int, reps: int) -> list[dict]:
    from structrewrite.codegen.triton import sparse_lowrank as sl

    dtype, dev = torch.bfloat16, "cuda"
    gen = torch.Generator().manual_seed(0)
    cl = report.ceilings
    results = []
    for in_f, out_f in shapes:
        rank = in_f // 4
        scale = 32.0 / rank
        crow, col, row = _support(out_f, in_f, DENSITY, dev, gen)
        nnz = col.numel()
        rowl, coll = row.long(), col.long()
        p = lambda *s: torch.nn.Parameter(torch.randn(*s, device=dev, dtype=dtype) / math.sqrt(s[-1]))  # noqa: E731
        A, B, values, W = p(rank, in_f), p(out_f, rank), p(nnz), p(out_f, in_f)
        structured = {}
        for kind in STRUCTURED:
            sup = _make_support(kind, out_f, in_f, DENSITY, dev, gen)
            structured[kind] = (sup, p(sup[1].numel()))
        xs = [torch.randn(M, in_f, device=dev, dtype=dtype, requires_grad=True) for _ in range(nsets)]
        gs = [torch.randn(M, out_f, device=dev, dtype=dtype) for _ in range(nsets)]

        def ours(x):
            return sl.eager(x, A, B, values, crow, col, row, None, scale)

        def gathers(x):   # the same layer kept on the gather kernels (the folded path's alternative)
            with sl.folded.forced("never"):
                return sl.eager(x, A, B, values, crow, col, row, None, scale)

        def with_support(kind):
            (scrow, scol, srow), svalues = structured[kind]
            return lambda x: sl.eager(x, A, B, svalues, scrow, scol, srow, None, scale)

        def block32_op(x):     # the same layer through the dispatcher (torch.library op)
            (scrow, scol, srow), svalues = structured["block32"]
            return torch.ops.structrewrite.sparse_lowrank_linear(x, A, B, svalues, scrow, scol, srow,
                                                                 None, scale)

        def dense(x):
            return F.linear(x, W)

        in_p, out_p = aligned.width(in_f, dtype), aligned.width(out_f, dtype)

        def dense_padded(x):   # dense with its widths padded to 16 bytes, as Inductor does
            Wp = aligned.pad_cols(aligned.pad_rows(W, out_p), in_p)
            return aligned.cols(F.linear(aligned.pad_cols(x, in_p), Wp), out_f)

        def sltrain(x):
            Wm = (B @ A) * scale
            Wm = Wm.index_put((rowl, coll), values, accumulate=True)
            return F.linear(x, Wm)

        def lowrank(x):
            return F.linear(F.linear(x, A), B)

        def lowrank_padded(x):   # the same with widths and rank padded to 16 bytes (as ours pads)
            Ap, Bp = aligned.lowrank(A, B, dtype)
            return aligned.cols(F.linear(F.linear(aligned.pad_cols(x, in_p), Ap), Bp), out_f)

        peers = {"ours": (ours, [A, B, values]), "gathers": (gathers, [A, B, values]),
                 **{k: (with_support(k), [A, B, structured[k][1]]) for k in STRUCTURED},
                 "block32_op": (block32_op, [A, B, structured["block32"][1]]),
                 "dense": (dense, [W]), "dense_padded": (dense_padded, [W]),
                 "sltrain": (sltrain, [A, B, values]), "lowrank": (lowrank, [A, B]),
                 "lowrank_padded": (lowrank_padded, [A, B])}
        if (in_p, out_p) != (in_f, out_f):   # the pads as ATen's copies, in the same run
            for k in ("channel", "block32"):
                peers[f"{k}{ATEN_PADS}"] = (with_support(k), [A, B, structured[k][1]])
        case = {"in": in_f, "out": out_f, "M": M, "rank": rank, "nnz": nnz, "density": DENSITY,
                **{f"{k}_nnz": structured[k][1].numel() for k in STRUCTURED}}
        fwds, fwdbwds = {}, {}
        for name, (fn, params) in peers.items():
            kernel = not name.endswith(ATEN_PADS)

            def fwd(i, fn=fn, kernel=kernel):
                with torch.no_grad(), aligned.copies_by(kernel):
                    return fn(xs[i])

            def fwdbwd(i, fn=fn, params=params, kernel=kernel):
                with aligned.copies_by(kernel):
                    y = fn(xs[i])
                    return torch.autograd.grad(y, [xs[i], *params], gs[i])

            fwdbwd(0)  # first call: compile and pick tiles
            fwds[name], fwdbwds[name] = fwd, fwdbwd
        # the peers in alternating rounds: a drift of the device's speed falls on all alike
        for suffix, fns, sync_each in (("fwd", fwds, False), ("fwdbwd", fwdbwds, False),
                                       ("fwdbwd_synced", fwdbwds, True)):
            for name, t in interleaved(fns, nsets, reps=reps, sync_each=sync_each).items():
                case[f"{name}_{suffix}"] = t
        for name, fwdbwd in fwdbwds.items():
            case[f"{name}_fwdbwd_graphed"] = graphed(fwdbwd, reps=reps)
            case[f"{name}_peak_extra_bytes"] = peak_extra(lambda: fwdbwd(0))
        # the two CUDA-graph modes a user has for host-bound layers
        for name, (fn, params) in peers.items():
            if name != "block32_op" and not name.endswith(ATEN_PADS):
                case[f"{name}_fwdbwd_callable"] = _graphed_callable(_Layer(lambda x, *_, fn=fn: fn(x), params),
                                                                    xs, gs, nsets, reps)

        def op_fn(x, A, B, v, crow, col, row):
            return torch.ops.structrewrite.sparse_lowrank_linear(x, A, B, v, crow, col, row, None, scale)

        def train_fn(x, A, B, v, crow, col, row):   # what the layer calls when it trains compiled
            return torch.ops.structrewrite.sparse_lowrank_linear_train(x, A, B, v, crow, col, row,
                                                                       None, scale)[0]
        compiled = {"dense": _Layer(lambda x, W: F.linear(x, W), [W]),
                    "ours": _Layer(op_fn, [A, B, values], (crow, col, row)),
                    **{k: _Layer(train_fn, [A, B, structured[k][1]], structured[k][0]) for k in COMPILED},
                    "block32_op": _Layer(op_fn, [A, B, structured["block32"][1]], structured["block32"][0])}
        for name, layer in compiled.items():
            case[f"{name}_fwdbwd_compiled"] = _compiled(layer, xs, gs, nsets, reps)
        with torch.no_grad():  # the tuned tiles at this shape, against the materialised weight
            case["rel_err_vs_sltrain_fwd"] = _rel(ours(xs[0]), sltrain(xs[0]))
            for k in STRUCTURED:
                (scrow, scol, srow), svalues = structured[k]
                Wc = ((B @ A) * scale).index_put((srow.long(), scol.long()), svalues, accumulate=True)
                case[f"{k}_rel_err_vs_materialised_fwd"] = _rel(peers[k][0](xs[0]), F.linear(xs[0], Wc))
                del Wc
        # breakdown of ours (same tiles as the op uses)
        x0, g0 = xs[0].detach(), gs[0]
        xt, gt = sl.transpose(x0), sl.transpose(g0)
        y = torch.empty(M, out_f, device=dev, dtype=dtype)
        dx = torch.empty(M, in_f, device=dev, dtype=dtype)
        base_y = torch.empty(M, out_f, device=dev, dtype=dtype)
        base_x = torch.empty(M, in_f, device=dev, dtype=dtype)
        cptr, cidx, cperm, cowner = sl.csc_of(col, row, in_f)
        from structrewrite.codegen.triton.tuning import TUNED as tuned, bucket
        key = lambda kind, n1, n2: (kind, bucket(M), n1, n2, nnz, dtype)  # noqa: E731
        cfg_f = tuned.get(key("spmm", out_f, in_f), sl.SPMM_DEFAULT)
        cfg_t = tuned.get(key("spmm_t", in_f, out_f), sl.SPMM_DEFAULT)
        cfg_d = tuned.get(key("sddmm", out_f, in_f), sl.SDDMM_DEFAULT)
        with torch.no_grad():
            parts = {
                "transpose x": lambda i: sl.transpose(x0),
                "fwd sparse+epilogue": lambda i: sl.gather_spmm(xt, crow, col, values, out_f, y, base=base_y, scale=scale, config=cfg_f, owner=row),
                "dx sparse+epilogue": lambda i: sl.gather_spmm(gt, cptr, cidx, values[cperm], in_f, dx, base=base_x, config=cfg_t, owner=cowner),
                "dvalues sddmm": lambda i: sl.sddmm(g0, x0, crow, col, row, config=cfg_d, gt=gt, xt=xt),
                "low-rank GEMMs fwd+bwd (6)": lambda i: _lowrank_gemms(x0, g0, A, B, recompute=False),
            }
            case["breakdown"] = {k: timeit(f, 1, reps=reps)["median_ms"] for k, f in parts.items()}
        case["configs"] = {"spmm": cfg_f, "spmm_t": cfg_t, "sddmm": cfg_d}
        case["block_breakdown"] = _block_breakdown(structured["block32"], x0, g0, A, B, scale, reps)
        # FLOPs (useful) and the fewest bytes
        lr = 2 * M * rank * (in_f + out_f)
        case["flops"] = {"dense_fwd": 2 * M * in_f * out_f, "dense_fwdbwd": 6 * M * in_f * out_f,
                         "ours_fwd": lr + 2 * M * nnz, "ours_fwdbwd": 3 * lr + 6 * M * nnz,
                         "ours_lowrank_fwdbwd": 3 * lr}
        es = 2
        w_bytes = es * (rank * (in_f + out_f) + nnz) + 4 * (nnz + out_f + 1)
        case["bytes"] = {"ours_fwd": es * M * (in_f + out_f) + w_bytes,
                         "ours_fwdbwd": es * M * (in_f + out_f) * 2 + es * M * in_f + 3 * w_bytes + 4 * nnz}
        # memory bound without any out x in temporary: the outputs of fwd+bwd (y, dx, dA,
        # dB, dvalues) plus the two M x rank low-rank intermediates
        case["dense_free_bound_bytes"] = es * (M * out_f + M * in_f + rank * (in_f + out_f) + nnz + 2 * M * rank)
        case["dense_weight_bytes"] = es * in_f * out_f
        for what in ("fwd", "fwdbwd"):
            r = rates(case[f"ours_{what}"]["median_ms"], case["flops"][f"ours_{what}"],
                      case["bytes"][f"ours_{what}"], cl)
            for k in ("tflops", "gbs", "pct_matmul", "pct_copy"):
                case[f"ours_{what}_{k}"] = r[k]
        case["flop_bound_ms"] = {k: flop_bound_ms(case["flops"][k], cl)
                                 for k in ("ours_fwdbwd", "dense_fwdbwd", "ours_fwd", "dense_fwd")}
        results.append(case)
        print(_case_line(case), flush=True)
        del xs, gs, A, B, values, W, structured, peers
        torch.cuda.empty_cache()
    return results


def _block_breakdown(support, x, g, A, B, scale, reps):
    """Median ms of each part of the block-sparse (32 x 32 tiles) fwd+bwd, with the tiles
    the op tuned, and the path it chose for d values (inside the dx kernel or apart)."""
    from structrewrite.codegen.triton import sparse_lowrank_block as blk
    (crow, col, row), values = support
    M, in_f, out_f = x.shape[0], x.shape[1], B.shape[0]
    lay = blk.layout(crow, col, row, 32, out_f, in_f)
    from structrewrite.codegen.triton.tuning import TUNED, bucket
    key = (bucket(M), in_f, out_f, lay.nt, 32, x.dtype)    # the backward's key
    cfg_f = TUNED.get(("bsr_spmm", bucket(M), out_f, in_f, lay.nt, 32, x.dtype), blk.SPMM_DEFAULT)
    cfg_td = TUNED.get(("bsr_spmm_t_dv", *key), blk.SPMM_DEFAULT)
    cfg_t = TUNED.get(("bsr_spmm_t", *key), blk.SPMM_DEFAULT)
    cfg_d = TUNED.get(("bsr_sddmm", *key), blk.SDDMM_DEFAULT)
    path = TUNED.get(("bsr_dv_path", *key), "fused")
    with torch.no_grad():
        y, dx = torch.zeros(M, out_f, device=x.device, dtype=x.dtype), torch.zeros_like(x)
        dv = torch.zeros(values.shape, device=x.device, dtype=torch.float32)
        parts = {
            "fwd bsr_spmm+epilogue": lambda i: blk.bsr_spmm(x, lay, values, out_f, y, False, base=y, scale=scale, config=cfg_f),
            "dx with d values (one bsr_spmm)": lambda i: blk.bsr_spmm(g, lay, values, in_f, dx, True, base=dx, config=cfg_td, x=x, dv=dv),
            "dx bsr_spmm alone": lambda i: blk.bsr_spmm(g, lay, values, in_f, dx, True, base=dx, config=cfg_t),
            "d values bsr_sddmm alone": lambda i: blk.bsr_sddmm(g, x, lay, config=cfg_d),
            "low-rank GEMMs fwd+bwd (6)": lambda i: _lowrank_gemms(x, g, A, B, recompute=False),
        }
        out = {k: timeit(f, 1, reps=reps)["median_ms"] for k, f in parts.items()}
    out["path"] = path
    out["configs"] = {"bsr_spmm": cfg_f, "bsr_spmm_t_dv": cfg_td, "bsr_spmm_t": cfg_t, "bsr_sddmm": cfg_d}
    return out


def _lowrank_gemms(x, g, A, B, recompute=True):
    """The cuBLAS GEMMs of a fwd+bwd as the implementation runs them (widths and rank
    padded to 16 bytes where misaligned, the pads included): seven where the backward
    recomputes x Aᵀ (the op), six where it keeps the forward's (the layer's eager path)."""
    in_p, out_p = aligned.widths(A, B, x.dtype)
    xa, ga = aligned.pad_cols(x, in_p), aligned.pad_cols(g, out_p)
    Ap, Bp = aligned.lowrank(A, B, x.dtype)
    xA = xa @ Ap.t()
    y = xA @ Bp.t()
    gB = ga @ Bp
    if recompute:
        xA = xa @ Ap.t()
    return y, gB @ Ap, gB.t() @ xa, ga.t() @ xA


def _case_line(c):
    m = lambda k: c[k]["median_ms"]  # noqa: E731
    return (f"{c['in']}->{c['out']} r={c['rank']}: fwd+bwd ours {m('ours_fwdbwd'):.3f} dense {m('dense_fwdbwd'):.3f} "
            f"sltrain {m('sltrain_fwdbwd'):.3f} lowrank {m('lowrank_fwdbwd'):.3f} | ratio dense "
            f"{m('ours_fwdbwd') / m('dense_fwdbwd'):.2f} | "
            + " ".join(f"{k} {m(k + '_fwdbwd'):.3f} ({m(k + '_fwdbwd') / m('dense_fwdbwd'):.2f}x, "
                       f"synced {m(k + '_fwdbwd_synced'):.3f})" for k in STRUCTURED)
            + f" | breakdown {c['breakdown']}")


def tables(report: Report, cases: list[dict]):
    m = lambda c, k: c[k]["median_ms"]  # noqa: E731
    for what, title in (("fwdbwd", "fwd+bwd"), ("fwd", "forward only")):
        rows = []
        for c in cases:
            o = m(c, f"ours_{what}")
            rows.append([f"{c['in']}->{c['out']}", c["rank"], c["nnz"], o, m(c, f"dense_{what}"),
                         m(c, f"sltrain_{what}"), m(c, f"lowrank_{what}"), m(c, f"lowrank_padded_{what}"),
                         o / m(c, f"dense_{what}"), m(c, f"sltrain_{what}") / o,
                         c["flop_bound_ms"][f"ours_{what}"] / m(c, f"dense_{what}"),
                         c[f"ours_{what}_tflops"], c[f"ours_{what}_pct_matmul"],
                         c[f"ours_{what}_gbs"], c[f"ours_{what}_pct_copy"]])
        report.table(f"{title}: median ms (bf16, M={cases[0]['M']}, rank=in/4, density {DENSITY})",
                     ["in->out", "rank", "nnz", "ours", "dense", "sltrain", "lowrank", "lowrank_padded",
                      "ours/dense", "sltrain/ours", "FLOP bound/dense", "ours TFLOP/s",
                      "% matmul ceiling", "ours GB/s", "% copy ceiling"], rows,
                     note="ours: SparseLowRankLinear's eager CUDA path (EagerFunction: the op's kernels, "
                          "called without the dispatcher), random element-wise support (SLTrain), on "
                          "the path the op's cost model picks (sparse_lowrank_folded.pays): at these "
                          "shapes the folded one, W = s·B A + S built a chunk of rows at a time and "
                          "multiplied on cuBLAS (the table of the ways of running a layer also has "
                          "'gathers', the same layer on the gather kernels). "
                          "dense: cuBLAS F.linear; sltrain: W = s·B@A + S materialised, then F.linear "
                          "(autograd through W); lowrank: F.linear(F.linear(x, A), B), and "
                          "lowrank_padded the same on operands padded as ours pads them. Target: "
                          "ours/dense <= 0.75 and sltrain/ours >= 1.5 for fwd+bwd. FLOP bound: our "
                          "useful FLOPs at the measured matmul rate.")
    mem_peers = ("ours", "gathers", *STRUCTURED, "dense", "dense_padded", "sltrain", "lowrank",
                 "lowrank_padded")
    rows = []
    for c in cases:
        rows.append([f"{c['in']}->{c['out']}", *[c[f"{p}_peak_extra_bytes"] / 2**20 for p in mem_peers],
                     c["dense_free_bound_bytes"] / 2**20, c["dense_weight_bytes"] / 2**20])
    chrows = [[k, f"{c['in']}->{c['out']}", {"fwdbwd": "fwd+bwd", "fwd": "fwd"}[w], c["rank"], c[f"{k}_nnz"],
               m(c, f"{k}_{w}"), m(c, f"dense_{w}"), m(c, f"dense_padded_{w}"), m(c, f"sltrain_{w}"),
               m(c, f"{k}_{w}") / m(c, f"dense_{w}"), m(c, f"{k}_{w}") / m(c, f"dense_padded_{w}"),
               m(c, f"sltrain_{w}") / m(c, f"{k}_{w}"), c[f"{k}_rel_err_vs_materialised_fwd"]]
              for k in STRUCTURED for c in cases for w in ("fwdbwd", "fwd")]
    report.table(f"Structured supports (same op): median ms (bf16, M={cases[0]['M']}, "
                 f"rank=in/4, density {DENSITY})",
                 ["support", "in->out", "pass", "rank", "nnz", "ours", "dense", "dense_padded", "sltrain",
                  "ours/dense", "ours/dense_padded", "sltrain/ours", "fwd rel. error vs materialised W"],
                 chrows,
                 note="channel: round(density * in) whole input channels (LOST's channel-wise sparse "
                      "component, init: lost), folded into the low-rank GEMMs (rank r -> r + k), cuBLAS "
                      "only. blockK: whole aligned K x K tiles at random (block: K), as many as the "
                      "density gives; tensor-core block-sparse Triton kernels. The CUDA implementation "
                      "detects either structure from the support. sltrain is the random-support "
                      "SLTrain path of the table above. dense_padded: dense with its rows padded to 16 "
                      "bytes (see the table of the ways of running a layer).")
    report.table("Peak extra memory of one fwd+bwd (MiB, gradients included)",
                 ["in->out", "ours", "gathers", *[f"ours ({k})" for k in STRUCTURED], "dense", "dense_padded",
                  "sltrain", "lowrank", "lowrank_padded", "dense-free bound", "one out x in bf16 matrix"],
                 rows, note="Dense-free bound: y, dx, dA, dB, dvalues and the two M x rank intermediates. "
                            "gathers and the tile kernels also hold xᵀ and gᵀ (M x in, M x out) and the "
                            "cuBLAS low-rank outputs that the sparse epilogues read; ours (folded) holds "
                            "one chunk of W and one of its gradient (at most 2^23 elements each: at "
                            "2048->2048, 4.2M elements, the chunk is the whole out x in matrix). No out "
                            "x in temporary in the others. Where a width is not a multiple of 16 bytes "
                            "(2048->5461), the cuBLAS GEMMs read a padded copy of the incoming gradient "
                            "and write into padded buffers, one more M x out matrix at the peak, as "
                            "dense_padded holds; the bound counts none.")
    launch_peers = ("ours", "gathers", *STRUCTURED, f"channel{ATEN_PADS}", f"block32{ATEN_PADS}",
                    "block32_op", "dense", "dense_padded", "sltrain", "lowrank", "lowrank_padded")
    get = lambda c, k: c[k]["median_ms"] if k in c else float("nan")  # noqa: E731
    rows = []
    def best(c, p):   # the fastest of the ways a user runs a layer: eager, graphed callable, compiled
        return min((v for v in (get(c, f"{p}_fwdbwd{h}") for h in ("", "_callable", "_compiled"))
                    if v == v), default=float("nan"))
    for c in cases:
        for p in (p for p in launch_peers if f"{p}_fwdbwd" in c):
            modes = [get(c, f"{p}_fwdbwd{h}") for h in ("", "_synced", "_graphed", "_callable", "_compiled")]
            rows.append([f"{c['in']}->{c['out']}", p, *modes, c[f"{p}_fwdbwd"]["host_ms"],
                         best(c, p) / min(best(c, "dense"), best(c, "dense_padded")),
                         modes[2] / min(get(c, "dense_fwdbwd_graphed"), get(c, "dense_padded_fwdbwd_graphed"))])
    report.table("fwd+bwd in each way of running it (median ms)",
                 ["in->out", "peer", "b2b", "synced", "graphed", "graphed callable", "compiled", "host",
                  "best / dense best", "graphed / dense graphed"], rows,
                 note="b2b: eager calls issued back to back as in a training loop (the numbers of every "
                      "other table); synced: the device idles before each call, so each call also pays "
                      "its launch latency; graphed: the call captured once in a CUDA graph and replayed "
                      "(device time alone, one input set, no input copies); graphed callable: the layer "
                      "wrapped by torch.cuda.make_graphed_callables, called back to back (a graph each "
                      "for forward and backward; x and the incoming gradient are copied into its static "
                      "buffers every call); compiled: torch.compile(layer, mode='reduce-overhead'), "
                      "the way the layer trains compiled: through the torch.library op "
                      "(sparse_lowrank_linear for the random support, sparse_lowrank_linear_train, "
                      "which keeps x Aᵀ for the backward, for tiles), channel-wise layers as their "
                      "two GEMMs on widened operands (channel_decomposition, no op); Inductor with "
                      "CUDA graphs; non-static inputs are copied likewise; called back to back; "
                      "host: host time to issue one eager call "
                      "(median, b2b; it includes waits when the launch queue is full). Where host "
                      "exceeds b2b, the eager call is bound by Python and launch overhead, not by the "
                      "device. block32_op: the block32 layer called through sparse_lowrank_linear "
                      "(dispatcher layers, x Aᵀ recomputed in the backward; compiled likewise). dense_padded: dense with x, "
                      "W and the output padded to 16-byte rows (what Inductor does; eager cuBLAS is slow "
                      "on a 5461-wide matrix). best / dense best: the fastest of b2b, graphed callable "
                      "and compiled (the ways a user runs a layer), over the fastest of the same for "
                      "dense and dense_padded. graphed / dense graphed: the device time alone, against "
                      "the faster of dense and dense_padded graphed. lowrank_padded: lowrank with x, "
                      "A and B padded to 16-byte rows and rank as ours pads them (a floor for any "
                      "layer of rank r: no sparse part). channel_aten_pads, block32_aten_pads (where "
                      "a width is misaligned): the same layers with their pads and slices as ATen's "
                      "F.pad and slice instead of the copy_cols kernel (aligned.copies_by), to "
                      "weigh the kernel's device time against its launch's host time in one run.")
    bkeys = [k for k in cases[0]["block_breakdown"] if k not in ("configs", "path")]

    def bsum(bd):   # forward, the backward's sparse path as the op runs it, low-rank GEMMs
        sparse = (bd["dx with d values (one bsr_spmm)"] if bd["path"] == "fused"
                  else bd["dx bsr_spmm alone"] + bd["d values bsr_sddmm alone"])
        return bd["fwd bsr_spmm+epilogue"] + sparse + bd["low-rank GEMMs fwd+bwd (6)"]
    report.table("Breakdown of the block-sparse (block32) fwd+bwd (median ms of each part run alone)",
                 ["in->out", *bkeys, "d values path", "sum", "op fwd+bwd",
                  "tiles (spmm, spmm_t with d values, spmm_t, sddmm)"],
                 [[f"{c['in']}->{c['out']}", *[c["block_breakdown"][k] for k in bkeys],
                   c["block_breakdown"]["path"], bsum(c["block_breakdown"]), m(c, "block32_fwdbwd"),
                   " ".join(str(v) for v in c["block_breakdown"]["configs"].values())] for c in cases],
                 note="The kernels read the values in place (CSR order). d values come either from "
                      "the dx kernel, which adds each token block's share into a float32 buffer "
                      "(fused), or from a kernel of their own after dx (separate): the op times both "
                      "once per problem and keeps the faster (and the separate one under "
                      "torch.use_deterministic_algorithms). 'sum': forward, the chosen backward "
                      "path and the low-rank GEMMs; it leaves out the small scalings, the zeroing "
                      "and rounding of the d values buffer and the bias gradient.")
    keys = list(cases[0]["breakdown"])
    report.table("Breakdown of the random support's fwd+bwd on the gather kernels (median ms of "
                 "each part run alone)",
                 ["in->out", *keys, "sum", "gathers fwd+bwd", "tiles (spmm, spmm_t, sddmm)"],
                 [[f"{c['in']}->{c['out']}", *[c["breakdown"][k] for k in keys],
                   sum(c["breakdown"].values()) + c["breakdown"]["transpose x"],
                   m(c, "gathers_fwdbwd"), f"{c['configs']['spmm']} {c['configs']['spmm_t']} {c['configs']['sddmm']}"]
                  for c in cases],
                 note="The op transposes x in the forward and g in the backward (and x again when a "
                      "'gather' sddmm config is chosen); 'sum' counts the transpose twice and leaves "
                      "out the small scalings.")


# ----------------------------------------------------------------------------------
# 3. end to end
# ----------------------------------------------------------------------------------
def llama_stack(layers: int, device, dtype, ffn: int = 5461):
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=ffn, num_attention_heads=16,
                      num_key_value_heads=16, num_hidden_layers=layers, vocab_size=256,
                      max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaModel(cfg).to(device=device, dtype=dtype)


def sparsify(model, rank: int, density: float, init: str = "random", block: int = 1) -> int:
    from structrewrite.nn.sparse_lowrank import SparseLowRankLinear
    names = [n for n, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear) and n.startswith("layers.")]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, attr)
        new = SparseLowRankLinear(lin.in_features, lin.out_features, rank, density, bias=lin.bias is not None,
                                  init=init, key=name, block=block, device=lin.weight.device,
                                  dtype=lin.weight.dtype)
        with torch.no_grad():  # B starts at zero in SLTrain; time on random data instead
            new.B.normal_(0.0, 0.02)
        setattr(parent, attr, new)
    return len(names)


COMPILED_E2E = ("dense", "dense_ffn5504", "sparse_lowrank", "sparse_lowrank_channel", "sparse_lowrank_block32")


def _allocator_counts() -> dict:
    """The caching allocator's counts of device allocations, frees and failed
    allocations (retried after freeing the cache), to tell a run whose steps went to
    ``cudaMalloc`` from one served from the cache."""
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


def sparse_calls(step) -> str:
    """What computed the sparse layers in one call of ``step``, read from the profiler's
    host events: the ``structrewrite::`` ops (the forward and backward entries of the
    torch.library ops, as Inductor's code calls them) and the eager entry
    (``EagerFunction``), with their counts; "" where there are none (dense models)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        if torch.cuda.is_available():
            sync()
    counts: dict = {}
    for ev in prof.events():
        name = ev.name
        if name.startswith("structrewrite::") or name in ("EagerFunction", "EagerFunctionBackward"):
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k.removeprefix('structrewrite::')} x{v}" for k, v in sorted(counts.items()))


E2E_COLUMNS = ["model", "params (M)", "step ms (median)", "tokens/s", "host ms to issue a step",
               "peak memory (GiB)", "sparse calls (one step)"]


def _compiled_table(report: Report, out: dict, mode: str, rows: list, title: str, note: str):
    """The end-to-end table of a compiled ``mode``, with each sparse stack's speed against
    the faster of the two dense stacks (``out[f"{mode}_speedup_vs_best_dense"]``), which
    ``note`` ends by listing."""
    ms = {r[0]: r[2] for r in rows}
    best_dense = min(ms["dense"], ms["dense_ffn5504"])
    speedup = out[f"{mode}_speedup_vs_best_dense"] = {
        v: best_dense / ms[v] for v in ms if v.startswith("sparse")}
    report.table(title, E2E_COLUMNS, rows,
                 note=note + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items()) + ".")


def e2e(report: Report, layers: int, batch: int, seq: int, rank: int, reps: int,
        modes=("eager", "compiled")) -> dict:
    """``modes``: ``eager``, ``compiled`` (``torch.compile(model)``) and ``graphs``
    (``torch.compile(model, mode="reduce-overhead")``, a new CUDA-graph step marked per
    step)."""
    dev, dtype = "cuda", torch.bfloat16
    out = {"layers": layers, "batch": batch, "seq": seq, "tokens_per_step": batch * seq,
           "rank": rank, "density": DENSITY}
    rows = {"eager": [], "compiled": [], "graphs": []}
    variants = ("dense", "dense_ffn5504", "sparse_lowrank", "sparse_lowrank_channel",
                "sparse_lowrank_block32")
    runs = (([(v, "eager") for v in variants] if "eager" in modes else [])
            + [(v, m) for m in ("compiled", "graphs") if m in modes for v in COMPILED_E2E])
    for variant, mode in runs:
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        base = torch.cuda.memory_allocated()
        model = llama_stack(layers, dev, dtype, ffn=5504 if variant == "dense_ffn5504" else 5461)
        if variant.startswith("sparse"):
            out["replaced_linears"] = sparsify(model, rank, DENSITY,
                                               init="lost" if variant.endswith("channel") else "random",
                                               block=32 if variant.endswith("block32") else 1)
        nparams = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        embs = [torch.randn(batch, seq, 2048, device=dev, dtype=dtype) for _ in range(2)]
        run = (model if mode == "eager" else
               torch.compile(model, mode="reduce-overhead" if mode == "graphs" else None))

        def step(i):
            opt.zero_grad(set_to_none=True)
            if mode == "graphs":
                torch.compiler.cudagraph_mark_step_begin()
            h = run(inputs_embeds=embs[i], use_cache=False).last_hidden_state
            h.float().square().mean().backward()
            opt.step()

        key = variant if mode == "eager" else f"{mode}_{variant}"
        try:
            t0 = time.perf_counter()
            for i in range(3):
                step(i % 2)
            sync()
            warm_s = time.perf_counter() - t0
            before = _allocator_counts()
            t = timeit(step, 2, warmup=1, reps=reps)
            sync()
            allocator = {k: v - before[k] for k, v in _allocator_counts().items()}
            # the host's time to issue one step onto an idle device: a step whose issue
            # takes about as long as the step itself is bound by the host, not the device
            issue = timeit(step, 2, warmup=0, reps=6, sync_each=True)
            torch.cuda.reset_peak_memory_stats()
            step(0)
            sync()
            peak = torch.cuda.max_memory_allocated() - base
            calls = sparse_calls(lambda: step(1))
            out[key] = {"step": t, "tokens_per_s": batch * seq / (t["median_ms"] * 1e-3),
                        "peak_bytes": peak, "params": nparams, "first_3_steps_s": warm_s,
                        "sparse_calls": calls, "allocator_during_timed_steps": allocator,
                        "host_issue_ms": issue["host_ms"], "step_synced": issue}
            row = [variant, nparams / 1e6, t["median_ms"], batch * seq / (t["median_ms"] * 1e-3),
                   issue["host_ms"], peak / 2**30, calls or "-"]
            print(f"e2e {key}: {t['median_ms']:.2f} ms/step, peak {peak / 2**30:.2f} GiB", flush=True)
        except Exception as exc:   # a variant that does not compile: reported, the rest still run
            traceback.print_exc()
            out[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            row = [variant, nparams / 1e6, float("nan"), float("nan"), float("nan"), float("nan"), "-"]
        rows[mode].append(row)
        del model, opt, embs, run
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    crows, grows, rows = rows["compiled"], rows["graphs"], rows["eager"]
    if rows:
        ms = {v: out[v].get("step", {}).get("median_ms", float("nan")) for v in variants}
        out["speedup"] = ms["dense"] / ms["sparse_lowrank"]
        out["speedup_channel"] = ms["dense"] / ms["sparse_lowrank_channel"]
        out["speedup_block32"] = ms["dense"] / ms["sparse_lowrank_block32"]
        out["speedup_vs_aligned_dense"] = {v: ms["dense_ffn5504"] / ms[v] for v in variants if v.startswith("sparse")}
        report.table(f"End to end: one training step (fwd, bwd, AdamW) of {layers} LLaMA-1B-shaped decoder layers",
                     E2E_COLUMNS, rows,
                     note=f"transformers LlamaModel layers (d=2048, ffn 5461, 16 heads, sdpa attention), bf16 "
                          f"parameters and AdamW, batch {batch} x seq {seq} = {batch * seq} tokens per step, "
                          f"loss = mean square of the last hidden state; peak memory: the step's peak "
                          f"allocation above what was allocated before the model was built. dense_ffn5504: "
                          f"the same stack with the MLP width rounded up to 5504, so that cuBLAS runs its "
                          f"aligned kernels (eager PyTorch does not pad a 5461-wide GEMM; Inductor does): the "
                          f"dense baseline a careful user would train. sparse_lowrank: all "
                          f"{out.get('replaced_linears')} linears of the layers replaced (rank {rank}, density "
                          f"{DENSITY}; random element-wise support; sparse_lowrank_channel: the channel-wise "
                          f"support of init: lost; sparse_lowrank_block32: random 32 x 32 tiles, block: 32). "
                          f"Dense / sparse_lowrank step time: {out['speedup']:.2f}x; dense / "
                          f"sparse_lowrank_channel: {out['speedup_channel']:.2f}x; dense / "
                          f"sparse_lowrank_block32: {out['speedup_block32']:.2f}x. Against dense_ffn5504: "
                          + ", ".join(f"{k} {v:.2f}x" for k, v in out["speedup_vs_aligned_dense"].items())
                          + ". Host ms to issue a step: median host time of a step started on an idle "
                          "device (6 steps, each synchronised); where it comes close to the step time, "
                          "the step is bound by the host (Python and launches), and a slower host slows "
                          "it. Sparse calls: what computed the sparse layers in one step, counted from "
                          "the profiler's host events (EagerFunction: the eager entry of tile and "
                          "random supports; the channel-wise support runs as plain GEMMs, which leave "
                          "no event of their own, hence '-').")
    if crows:
        _compiled_table(report, out, "compiled", crows,
                        "End to end under torch.compile (default mode): the same steps with the model compiled",
                        "torch.compile(model) (Inductor, no CUDA graphs), AdamW eager, otherwise as "
                        "above. Tile and random supports reach Inductor as torch.library ops (opaque "
                        "kernels; tiles through sparse_lowrank_linear_train, which keeps x Aᵀ for the "
                        "backward; the random support through sparse_lowrank_linear, whose folded "
                        "backward needs none; the last column counts the op calls of one step, from the "
                        "profiler's host events); everything around them is fused by Inductor. A "
                        "channel-wise support reaches it as two GEMMs on widened operands "
                        "(channel_decomposition), which Inductor compiles with the code around them, "
                        "hence no op calls. Best compiled dense / compiled sparse: ")
    if grows:
        _compiled_table(report, out, "graphs", grows,
                        "End to end under torch.compile(mode='reduce-overhead'): compiled and replayed "
                        "as CUDA graphs",
                        "torch.compile(model, mode='reduce-overhead') (Inductor and cudagraph trees; "
                        "torch.compiler.cudagraph_mark_step_begin() before each step's forward), "
                        "AdamW eager, otherwise as above. The forward and backward graphs, the "
                        "sparse ops inside them included, are replayed from CUDA graphs, so Python "
                        "and launch costs no longer bound the step: this is the device's time for "
                        "the step plus AdamW's eager launches. Sparse calls are counted from the "
                        "profiler's host events, which a replayed graph does not emit. Peak memory "
                        "here does not count what the replayed graphs use: their activations live "
                        "in the graphs' private memory pool, reserved at capture, so the column is "
                        "not comparable with the tables above. Best dense / sparse: ")
    return out


# ----------------------------------------------------------------------------------
# plot and main
# ----------------------------------------------------------------------------------
def plot(cases: list[dict], path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{c['in']}->{c['out']}" for c in cases]
    xs = range(len(cases))
    for ax, what, title in ((axes[0], "fwdbwd", "fwd+bwd"), (axes[1], "fwd", "forward")):
        for peer, style in (("ours", "o-"), ("gathers", "o:"), ("channel", "D-"), ("block16", "P-"), ("block32", "X-"),
                            ("dense", "s-"), ("sltrain", "^-"), ("lowrank", "v--")):
            ax.plot(xs, [c[f"{peer}_{what}"]["median_ms"] for c in cases], style,
                    label="ours (random)" if peer == "ours" else peer)
        ax.plot(xs, [c["flop_bound_ms"][f"ours_{what}"] for c in cases], "k:", label="FLOP bound (ours)")
        ax.plot(xs, [c["flop_bound_ms"][f"dense_{what}"] for c in cases], color="gray", ls=":",
                label="FLOP bound (dense)")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{title}, bf16, M={cases[0]['M']}, rank=in/4, density {DENSITY}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks sparse_lowrank")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sets", type=int, default=3, help="input sets cycled (beyond L2)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--e2e-rank", type=int, default=512)
    ap.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES))
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e-modes", default="eager,compiled",
                    help="end-to-end runs, comma-separated: eager, compiled (torch.compile), "
                         "graphs (torch.compile with mode='reduce-overhead')")
    ap.add_argument("--skip-ops", action="store_true", help="no per-shape op timings")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--out", default=None, help="directory for the results (default benchmarks/results)")
    ap.add_argument("--name", default="sparse_lowrank")
    args = ap.parse_args(argv)
    modes = tuple(m for m in args.e2e_modes.split(",") if m)
    unknown = set(modes) - {"eager", "compiled", "graphs"}
    if unknown:
        print(f"unknown --e2e-modes {sorted(unknown)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("sparse_lowrank benchmark needs a CUDA device", file=sys.stderr)
        return 2
    import structrewrite.ops  # noqa: F401
    from structrewrite.codegen import triton as tr
    from structrewrite.codegen.triton import tuning
    from structrewrite.codegen.triton.tuning import tuned_configs
    tuning.CACHE_DIR = None   # time every problem afresh: the JSON keeps the candidates' times
    if not tr.REGISTERED:
        print("Triton kernels not registered", file=sys.stderr)
        return 2
    command = "python -m benchmarks sparse_lowrank " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    report = Report(args.name, command.strip())
    report.env = environment(report.command)
    report.ceilings = ceilings()
    print("ceilings", report.ceilings, flush=True)
    ok = True
    if not args.skip_check:
        ok = check(report)
        ok &= check_modes(report)
        print("check", "passed" if ok else "FAILED", flush=True)
        print(report.markdown(), flush=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    cases = []
    try:
        if shapes and not args.skip_ops:
            cases = op_cases(report, args.tokens, shapes, args.sets, args.reps)
            tables(report, cases)
    except Exception:
        traceback.print_exc()
        ok = False
    report.data["cases"] = cases
    report.write(args.out, plot=(lambda p: plot(cases, p)) if cases else None)   # kept if e2e fails
    if not args.skip_e2e:
        try:
            report.data["e2e"] = e2e(report, args.layers, args.batch, args.seq, args.e2e_rank, max(5, args.reps // 3),
                                     modes=modes)
        except Exception:
            traceback.print_exc()
            ok = False
    report.data["tuning"] = tuned_configs()
    outdir = report.write(args.out, plot=(lambda p: plot(cases, p)) if cases else None)
    print(report.markdown())
    print(f"written to {outdir}")
    return 0 if ok else 1
