"""Channel-structured supports of ``structrewrite::sparse_lowrank_linear``: dense GEMMs only.

When every output row of ``S`` holds the same k input channels (LOST's channel-wise
sparse component, ``init: lost``), ``x Sᵀ = x[:, cols] Vᵀ`` with ``V = values.view(out, k)``
(values are stored row by row, columns ascending). The op then folds the sparse part
into the low-rank GEMMs by widening the rank from r to r + k:

    A' = [A; E; 0]                     R x in   (E: one-hot rows picking the k channels)
    W' = [s·B, V, 0]                   out x R  (never out x in)
    t  = x A'ᵀ = [x Aᵀ, x[:, cols], 0]
    y  = t W'ᵀ + bias

and the backward, with ``dt = g W'``:

    dx = dt A'                 (the one-hot rows add dt's channel columns at cols)
    dA = dt[:, :r]ᵀ x          dB = s · (gᵀ t)[:, :r]      d values = (gᵀ t)[:, r:r+k]

Where the scale goes: ``differentiable`` (eager mode) scales B inside W' as written. The
op's implementation (``forward``/``backward``) gives E's rows the value 1/s and applies
s as the cuBLAS alpha of the second GEMM, of ``g W'`` and of ``gᵀ t`` (``split_scale``;
B then enters W' unscaled), one pass fewer each way, wherever 1/s is a power of two
(``split_scale``: then e·x is exact; not in float16, where it could overflow).

R = r + k rounded up to a multiple of 64 (zero padding), because cuBLAS is only fast on
aligned leading dimensions (benchmarks/README.md has the times of each version).
The whole op runs on the tensor cores at the FLOPs of a rank-R layer, with no gathers
over the support. Unstructured supports (SLTrain's random support) keep
the Triton gather/SDDMM kernels of ``sparse_lowrank.py``; the CUDA implementation picks
per support, once, with the detection below cached on the support buffers.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from structrewrite.codegen.triton import aligned
from structrewrite.codegen.triton.support_cache import cached
from structrewrite.ops.sparse_lowrank_linear import channel_count, channel_width


def channel_columns(crow: torch.Tensor, col: torch.Tensor, out_features: int) -> Optional[torch.Tensor]:
    """The k shared input channels (int64) if every row of the support holds exactly the
    same columns, else None. Detected once per support (``support_cache``)."""
    return cached("channels", (crow, col), (out_features, col.device),
                  lambda: _detect(crow, col, out_features))


def _detect(crow, col, out_features) -> Optional[torch.Tensor]:
    k = channel_count(crow, col, out_features)
    return col[:k].long().contiguous() if k else None


@functools.lru_cache(maxsize=None)
def split_scale(scale: float, dtype: torch.dtype) -> tuple[float, float, float]:
    """Where the scale s goes: (alpha, beta, e) with alpha·beta = s and alpha·e = 1.

    ``y = alpha · t W'ᵀ`` with ``W' = [beta·B, V, 0]`` and the one-hot rows of A' equal to
    ``e``. When 1/s = rank/alpha is a power of two (the common ranks and alphas), input
    channels times 1/s are exact, so the rows carry 1/s and s rides on the GEMMs' alpha
    (``aligned.mm``): no pass scales B. Otherwise B is scaled (one small pass) and the
    rows carry 1: where 1/s is not a power of two (x·1/s would be rounded once more in
    t), in float16 (input channels times 1/s above 65504 would overflow t: at rank 1024
    and alpha 32, inputs above 2047), and at s = 0. ``dtype`` stays in the key of the
    cache."""
    if scale == 0.0 or dtype == torch.float16:
        return 1.0, scale, 1.0
    inv = 1.0 / scale
    if math.isfinite(inv) and math.frexp(inv)[0] == 0.5:
        return scale, 1.0, inv
    return 1.0, scale, 1.0


def _constant_blocks(cols: torch.Tensor, in_p: int, out_features: int, r: int, dtype, e: float):
    """The parts of A' and W' that do not change while training, made once per support:
    E (k + pad rows: rows with ``e`` at the k channels, then zero rows; ``in_p`` columns)
    and the zero columns that pad W'. Keeping them leaves fewer launches per call (fwd+bwd
    at 4096x4096 on the H200: 2.15 ms with them built per call, 1.79 ms cached)."""
    k = cols.numel()
    pad = channel_width(r + k) - r - k

    def build():
        E = torch.zeros(k + pad, in_p, dtype=dtype, device=cols.device)
        E[torch.arange(k, device=cols.device), cols] = e
        return E, torch.zeros(out_features, pad, dtype=dtype, device=cols.device)
    return cached("channel_blocks", (cols,), (in_p, out_features, pad, dtype, e, cols.device), build)


def _widened(A, B, values, cols, split, in_p, out_p):
    """A' = [A; e·E] (R x in_p) and W' = [beta·B, V, 0] (out_p x R), R = r + k rounded up
    to 64, for ``split`` = (alpha, beta, e) (``split_scale``); ``in_p``/``out_p``: the
    widths padded for cuBLAS (``aligned``; zero columns of A', zero rows of W')."""
    r = A.shape[0]
    out_features = B.shape[0]
    _, beta, e = split
    E, Z = _constant_blocks(cols, in_p, out_features, r, A.dtype, e)
    Aw = torch.cat([aligned.pad_cols(A, in_p), E], dim=0)
    V = values.view(out_features, -1).to(B.dtype)   # values may come in another dtype (the op's)
    Ww = torch.cat([B if beta == 1.0 else B * beta, V, Z], dim=1)
    return Aw, aligned.pad_rows(Ww, out_p)


# Up to this many tokens a call computes the three products directly (``direct``)
# instead of building A' and W': at 1 token, 1024 -> 2752, rank 256, 31 channels, the
# build alone took longer than the dense layer's whole product on the CPU.
DIRECT_TOKENS = 16


def takes_direct(x, in_features: int) -> bool:
    """Whether a call of ``x`` takes ``direct`` (few tokens)."""
    return x.numel() <= DIRECT_TOKENS * in_features


def direct(x, A, B, values, cols, bias, scale):
    """``y = s·(x Aᵀ) Bᵀ + x[:, cols] Vᵀ + bias`` as three products on the layer's own
    operands, differentiable: no A' or W' is built, which costs more than the products
    themselves for a few tokens (decoding). In bf16 and fp16 y is rounded twice, once
    after the low-rank product and once after the channel one (the widened GEMM rounds
    once)."""
    in_features, out_features = A.shape[1], B.shape[0]
    x2 = x.reshape(-1, in_features)
    t = x2 @ A.t()
    bias = bias.to(t.dtype) if bias is not None else None
    y = torch.addmm(bias, t, B.t(), alpha=scale) if bias is not None else (t @ B.t()) * scale
    V = values.view(out_features, -1).to(t.dtype)
    y = torch.addmm(y, x2.index_select(1, cols), V.t())
    return y.reshape(*x.shape[:-1], out_features)


def differentiable(x, A, B, values, cols, bias, scale):
    """The same computation as plain differentiable torch ops, for eager mode:
    ``y = F.linear(F.linear(x, A'), W', bias)`` with ``W' = [s·B, V, 0]`` (autograd has no
    GEMM with a free scale: ``addmm``'s alpha costs a pass in its backward). Autograd's
    engine runs the backward without any Python, which on the H200 host issues the call
    faster than ``forward``/``backward`` below wrapped in an ``autograd.Function`` (host
    time per fwd+bwd at 16384 x 2048 -> 2048: 0.57-0.59 ms against 0.75-0.77 ms, although
    the Function issues two launches fewer; a Function that keeps only x, t, A' and W'
    and calls ``forward``/``backward`` directly: 0.690 ms against 0.639 ms, timed in
    alternating rounds). The cost is that it computes the whole
    (R x in) gradient of A' (the rows of E and the padding too, 64 of 576 rows at
    2048x2048) where ``backward`` computes only A's r rows. Misaligned widths: x and the
    bias are padded here, and the output's slice pads the incoming gradient in the
    backward. A call of few tokens takes ``direct``."""
    if takes_direct(x, A.shape[1]):
        return direct(x, A, B, values, cols, bias, scale)
    in_p, out_p = aligned.widths(A, B, x.dtype)
    Aw, Ww = _widened(A, B, values, cols, (1.0, scale, 1.0), in_p, out_p)
    # values and bias may come in another dtype than x (the op's), as in forward()
    bias = aligned.pad_cols(bias.to(Ww.dtype), out_p) if bias is not None else None
    y = F.linear(F.linear(aligned.pad_cols(x, in_p), Aw), Ww, bias)
    return aligned.cols(y, B.shape[0])


def forward(x, A, B, values, cols, bias, scale, saved=None):
    """``saved``: a list that receives (x, t, A', W') for ``backward``; ``x`` there is the
    input as the GEMMs read it (2-D, padded where misaligned). Without ``saved`` (the
    op's forward, whose backward is an op of its own), a call of few tokens takes
    ``direct``."""
    if saved is None and takes_direct(x, A.shape[1]):
        with torch.no_grad():
            return direct(x, A, B, values, cols, bias, scale)
    in_features, out_features = A.shape[1], B.shape[0]
    in_p, out_p = aligned.widths(A, B, x.dtype)
    split = split_scale(scale, A.dtype)
    alpha = split[0]
    Aw, Ww = _widened(A, B, values, cols, split, in_p, out_p)
    x2 = aligned.pad_cols(x.reshape(-1, in_features), in_p)
    t = x2 @ Aw.t()                                      # [x Aᵀ, e·x[:, cols], 0]
    if saved is not None:
        saved += [x2, t, Aw, Ww]
    if bias is not None:
        y = torch.addmm(aligned.pad_cols(bias.to(t.dtype), out_p), t, Ww.t(), alpha=alpha)
    else:
        y = aligned.mm(t, Ww.t(), alpha)
    return aligned.cols(y, out_features).reshape(*x.shape[:-1], out_features)


def _widened_input(x2, xa, cols, e: float, R: int):
    """t = x2 A'ᵀ = [x Aᵀ, e·x[:, cols], 0] (M x R) from ``xa`` = x Aᵀ: a gather of k
    columns instead of the GEMM (e·x is exact, as in the GEMM's one-hot rows)."""
    picked = x2.index_select(1, cols)
    if e != 1.0:
        picked = picked * e
    pad = R - xa.shape[1] - cols.numel()
    parts = [xa, picked] + ([x2.new_zeros(x2.shape[0], pad)] if pad else [])
    return torch.cat(parts, dim=1)


def backward(grad, x, A, B, values, cols, scale, saved=(), xa=None, need=(True,) * 4):
    """``saved``: what ``forward`` put in its list; else ``xa`` = x Aᵀ (M x r) from the
    forward (``sparse_lowrank_linear_train``), from which t is put together without a
    GEMM; else t is recomputed (``x`` is then only read through it). With
    ``y = alpha · t W'ᵀ``: ``dt = alpha · g W'``, ``dx = dt A'``, ``dA = dt[:, :r]ᵀ x`` and
    ``alpha · gᵀ t`` holds dB (times beta) and d values (alpha·e = 1). ``need``: which of
    (dx, dA, dB, dvalues) to compute (None in the others' places): dt is formed for dx
    or dA, and ``gᵀ t`` (and t) for dB or d values only."""
    in_features, out_features = A.shape[1], B.shape[0]
    in_p, out_p = aligned.widths(A, B, x.dtype)
    r, k = A.shape[0], cols.numel()
    split = split_scale(scale, A.dtype)
    alpha, beta, _ = split
    dx = dA = dB = dv = None
    if saved:
        x2, t, Aw, Ww = saved
    else:
        Aw, Ww = _widened(A, B, values, cols, split, in_p, out_p)
        # x is read for dA, dB and d values only (a frozen layer keeps a stand-in)
        x2 = aligned.pad_cols(x.reshape(-1, in_features), in_p) if any(need[1:]) else None
        if not (need[2] or need[3]):
            t = None
        elif xa is None:
            t = x2 @ Aw.t()
        else:
            t = _widened_input(x2, xa, cols, split[2], Aw.shape[0])
    g2 = aligned.pad_cols(grad.reshape(-1, out_features), out_p)
    if need[0] or need[1]:
        dt = aligned.mm(g2, Ww, alpha)                   # M x R
    if need[0]:   # the rows of E add dt's channel columns at cols
        dx = aligned.cols(dt @ Aw, in_features).reshape(*grad.shape[:-1], in_features)
    if need[1]:
        dA = aligned.cols(dt[:, :r].t() @ x2, in_features).to(A.dtype)
    if need[2] or need[3]:
        dw = aligned.mm(g2.t(), t, alpha)[:out_features]     # out x R
        if need[2]:
            dB = (aligned.cols(dw, r) if beta == 1.0 else dw[:, :r] * beta).to(B.dtype)
        if need[3]:
            dv = dw[:, r:r + k].reshape(-1).contiguous().to(values.dtype)   # strided when k == 1
    return dx, dA, dB, dv

