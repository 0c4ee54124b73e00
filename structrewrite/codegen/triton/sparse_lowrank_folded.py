"""Element-wise supports on the tensor cores: the weight built a chunk of rows at a time.

The gather kernels of ``sparse_lowrank.py`` do one FMA per gathered element on the CUDA
cores. On the H200 they run at about 1/80 of cuBLAS's bf16 rate (``GATHER_RATE``), so
once a random support is dense enough it is cheaper to multiply by the dense weight
``W = s·B A + S`` on the tensor cores, which is what SLTrain's own implementation does
with the whole out x in ``W`` and its whole gradient. Here at most one chunk of ``W`` and
one chunk of its gradient exist at a time, each of at most ``CHUNK_ELEMS`` elements
(C rows of in, or C columns of out; 16 MiB in bf16), so the memory they take is bounded
whatever the layer's size. A layer of at most ``CHUNK_ELEMS`` weights (2048 x 2048 has
2^22) is a single chunk: its whole ``W`` and gradient are built, one after the other,
as SLTrain does. Splitting it in two each way costs launches and bought nothing in
memory: on the H200 at 2048 x 2048, 16384 tokens, bf16, fwd+bwd took 0.81-0.85 ms
whole and 1.17-1.30 ms in halves (0.572 against 0.650 ms replayed from a CUDA graph),
with a peak of 140 against 143 MiB (``benchmarks/README.md``). With one chunk the
backward takes ``dx = g W`` from a ``W`` built as in the forward, without the column
chunks. The low-rank GEMMs vanish into the chunk builds (out·r·in multiply-adds each,
against M·r·(in + out) for the low-rank products).

Per row chunk R (rows r0:r1 of W) and column chunk J (columns j0:j1):

    forward    W_R  = s·B_R A, plus S_R scattered in       y[:, R]  = x W_Rᵀ + bias_R
    backward   dW_R = g[:, R]ᵀ x                          d values = dW_R at the support
               dB_R = s·dW_R Aᵀ                           dA      += s·B_Rᵀ dW_R
               Wᵀ_J = s·A_Jᵀ Bᵀ, plus Sᵀ_J scattered in   dx[:, J] = g Wᵀ_Jᵀ

Each product writes its slice of the output in place (cuBLAS takes the row stride), so
``y`` and ``dx`` are written once with a single rounding, as are ``dB`` and ``d values``;
``dA`` sums its chunks' bf16/fp16 products in float32 and is rounded once more.

When (``pays``)
---------------
Counting multiply-adds of a fwd+bwd, with the gathers' rate a fraction ``GATHER_RATE``
of the GEMMs':

    gathers  3·M·r·(in + out) + 3·M·nnz / GATHER_RATE
    folded   3·M·in·out + 4·out·r·in

The folded path is taken where it is the smaller. On the H200 the rate of the three
sparse products (the ``gathers`` peer less the ``lowrank`` peer, against ``dense``; bf16,
M = 16384) was 0.012-0.013 at the three aligned shapes in the benchmark's run of
2026-11-28 13:34 UTC, 0.010-0.013 in that of 14:55 UTC and 0.012-0.014 in that of
15:52 UTC (``benchmarks/results/sparse_lowrank.md``); ``GATHER_RATE`` takes 0.0125.
With rank in/4 at 4096 x 4096 the crossover density is about 0.7%, so SLTrain's 3% runs
folded. Small token counts (decoding) stay on the gathers: the chunk builds' out·r·in
does not shrink with M.
``STRUCTREWRITE_FOLD=always`` or ``never`` overrides the model (also ``MODE``).

The CPU implementation (``codegen/cpu/sparse_lowrank.py``) uses the same path for
float32/float64 element-wise supports, against PyTorch's CSR products. There the rate is
not one number: measured on 2 threads in float32 at the three shapes of the CPU
benchmark at 1% and 3% density, the CSR products ran at 0.004-0.029 of the GEMMs' rate,
with fixed costs that make it rise with the density. ``GATHER_RATE["cpu"] = 0.01``
picks the faster path in five of those six cases; in the sixth (2048 tokens, 1024 ->
2752, 1%) the folded path took 142 ms against 126 ms for CSR.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from structrewrite.codegen.triton import aligned
from structrewrite.codegen.triton.support_cache import cached, outside_graph_pools
from structrewrite.codegen.triton.support_plan import csc_of

CHUNK_ELEMS = 1 << 23
# the sparse products' multiply-add rate as a fraction of the dense GEMMs', by implementation
# (measured; see the module docstring)
GATHER_RATE = {"cuda": 0.0125, "cpu": 0.01}
MODE = os.environ.get("STRUCTREWRITE_FOLD", "auto")


def pays(M: int, in_features: int, out_features: int, rank: int, nnz: int,
         implementation: Optional[str]) -> bool:
    """Whether the folded path is the cheaper for this call (see the module docstring).
    ``implementation``: whose sparse products it competes with, "cuda" (the gather
    kernels) or "cpu" (the CSR products); None: no measured rate, never folded."""
    if MODE in ("always", "never"):
        return MODE == "always"
    rate = GATHER_RATE.get(implementation)
    if rate is None or nnz == 0 or M == 0:
        return False
    gathers = 3 * M * rank * (in_features + out_features) + 3 * M * nnz / rate
    folded = 3 * M * in_features * out_features + 4 * out_features * rank * in_features
    return folded < gathers


def folds(x, A, B, values, implementation: Optional[str]) -> bool:
    """``pays`` for one call of the op on these operands (M = the tokens of ``x``)."""
    in_features = A.shape[1]
    return x.numel() > 0 and pays(x.numel() // in_features, in_features, B.shape[0],
                                  A.shape[0], values.numel(), implementation)


@contextlib.contextmanager
def forced(mode: str):
    """``MODE`` set to ``mode`` ("auto", "always" or "never") inside the block. An eager
    layer's backward follows what its forward chose."""
    global MODE
    old, MODE = MODE, mode
    try:
        yield
    finally:
        MODE = old


def chunk(n: int, width: int) -> int:
    """Rows per chunk of a (n x width) matrix: at most ``CHUNK_ELEMS`` elements, a multiple
    of 64 rows (so that the chunks' output columns start 16-byte aligned), at least 64."""
    return min(n, max(64, CHUNK_ELEMS // max(width, 1) // 64 * 64))


def _row_chunks(crow, col, row, out_features: int, out_p: int, in_p: int, c: int):
    """[(r0, r1, e0, e1, flat)]: chunks of c rows over the padded height ``out_p``; the
    CSR entries e0:e1 of rows r0:r1 and their flat positions in a (r1 - r0) x in_p chunk
    of W (int64)."""
    ptr = crow.tolist()
    chunks = []
    for r0 in range(0, out_p, c):
        r1 = min(out_p, r0 + c)
        e0, e1 = ptr[min(r0, out_features)], ptr[min(r1, out_features)]
        flat = (row[e0:e1].long() - r0) * in_p + col[e0:e1].long()
        chunks.append((r0, r1, e0, e1, flat))
    return chunks


def _col_chunks(col, row, in_features: int, in_p: int, out_p: int, c: int):
    """(perm, [(j0, j1, p0, p1, flat)]): ``perm`` sorts the entries by column (the
    support's ``csc_of``); chunks of c columns over the padded width ``in_p``; the sorted
    entries p0:p1 are those of columns j0:j1, at ``flat`` in a (j1 - j0) x out_p chunk of
    Wᵀ."""
    cptr, crows, perm, ccols = csc_of(col, row, in_features)
    ptr = cptr.tolist()
    rows_s, cols_s = crows.long(), ccols.long()
    chunks = []
    for j0 in range(0, in_p, c):
        j1 = min(in_p, j0 + c)
        p0, p1 = ptr[min(j0, in_features)], ptr[min(j1, in_features)]
        chunks.append((j0, j1, p0, p1, (cols_s[p0:p1] - j0) * out_p + rows_s[p0:p1]))
    return perm, chunks


class Layout:
    """Where a support's entries go in the chunks of W, at given padded widths.

    ``rows``: the row chunks of the forward and of the gradient (``_row_chunks``);
    ``cols``: the column chunks of dx (``_col_chunks``), or None when W is a single
    chunk of rows: the backward then builds the whole W as the forward does and takes
    ``dx = g W`` from it, without the transposed build."""
    __slots__ = ("rows", "cols")

    def __init__(self, rows, cols):
        self.rows, self.cols = rows, cols


def layout(crow, col, row, out_features: int, in_features: int, in_p: int, out_p: int,
           memo: Optional[dict] = None) -> Layout:
    """The support's ``Layout`` at these widths, made once. ``memo``: the dict of the
    support's ``Plan`` (``support_plan``), which the callers have already looked up;
    without it, the support cache (one more lookup)."""
    key = (out_features, in_features, in_p, out_p, CHUNK_ELEMS)

    def build():
        rows = _row_chunks(crow, col, row, out_features, out_p, in_p, chunk(out_p, in_p))
        cols = None if len(rows) == 1 else _col_chunks(col, row, in_features, in_p, out_p,
                                                        chunk(in_p, out_p))
        return Layout(rows, cols)
    if memo is None:
        return cached("folded", (crow, col, row), (*key, col.device), build)
    hit = memo.get(("folded", key))
    if hit is None:
        hit = memo[("folded", key)] = outside_graph_pools(col.device, build)
    return hit


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of the outputs (the tests replace it to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows_of_w(Bp, Ap, scale, r0, r1, flat, v):
    """Rows r0:r1 of W = s·B A + S (padded widths), S's entries ``v`` added at ``flat``."""
    W = aligned.mm(Bp[r0:r1], Ap, scale)
    W.view(-1).index_add_(0, flat, v)
    return W


@torch.no_grad()   # an implementation (the op's autograd is its own); products write in place
def forward(x, A, B, values, crow, col, row, bias, scale, memo: Optional[dict] = None):
    """``memo``: the support ``Plan``'s dict (``layout``)."""
    in_features, out_features = A.shape[1], B.shape[0]
    x2 = x.reshape(-1, in_features)
    M = x2.shape[0]
    # misaligned widths: every product runs on zero-padded operands, so that cuBLAS sees
    # 16-byte multiples in every size and leading dimension (``aligned``)
    in_p, out_p = aligned.widths(A, B, x.dtype)
    xa = aligned.pad_cols(x2, in_p)
    Ap, Bp = aligned.lowrank(A, B, x.dtype)     # the rank padded too: r' x in_p, out_p x r'
    if bias is not None:
        bias = aligned.pad_cols(bias.to(x.dtype), out_p)
    v = values.to(x.dtype)
    y = _empty((M, out_p), x.dtype, x.device)
    for r0, r1, e0, e1, flat in layout(crow, col, row, out_features, in_features, in_p, out_p,
                                       memo).rows:
        W = _rows_of_w(Bp, Ap, scale, r0, r1, flat, v[e0:e1])
        if bias is None:
            torch.mm(xa, W.t(), out=y[:, r0:r1])
        else:
            torch.addmm(bias[r0:r1], xa, W.t(), out=y[:, r0:r1])
    return aligned.cols(y, out_features).reshape(*x.shape[:-1], out_features)


@torch.no_grad()
def backward(grad, x, A, B, values, crow, col, row, scale, memo: Optional[dict] = None,
             need=(True,) * 4):
    """``memo``: the support ``Plan``'s dict (``layout``). ``need``: which of (dx, dA, dB,
    dvalues) to compute (None in the others' places): the row chunks' ``dW`` are formed
    for dA, dB or d values, the column chunks of W for dx."""
    in_features, out_features = A.shape[1], B.shape[0]
    g2 = grad.reshape(-1, out_features)
    x2 = x.reshape(-1, in_features)
    M = x2.shape[0]
    in_p, out_p = aligned.widths(A, B, x.dtype)
    ga = aligned.pad_cols(g2, out_p)
    Ap, Bp = aligned.lowrank(A, B, x.dtype)
    r = A.shape[0]
    v = values.to(x.dtype)
    same = values.dtype == x.dtype
    dv = _empty(values.shape, values.dtype, values.device) if need[3] else None
    dB = _empty((out_p, Bp.shape[1]), B.dtype, B.device) if need[2] else None
    dA = None
    lay = layout(crow, col, row, out_features, in_features, in_p, out_p, memo)
    if need[1] or need[2] or need[3]:
        xa = aligned.pad_cols(x2, in_p)
        for r0, r1, e0, e1, flat in lay.rows:
            dW = ga[:, r0:r1].t() @ xa                           # (r1 - r0) x in_p
            if need[3] and same:
                torch.index_select(dW.view(-1), 0, flat, out=dv[e0:e1])
            elif need[3]:
                dv[e0:e1] = dW.view(-1).index_select(0, flat)
            if need[2]:
                aligned.mm(dW, Ap.t(), scale, out=dB[r0:r1])
            part = aligned.mm(Bp[r0:r1].t(), dW, scale) if need[1] else None   # r' x in_p
            del dW
            if part is None:
                continue
            if len(lay.rows) == 1:
                dA = part
            elif dA is None:   # several chunks: summed in float32 (or wider), rounded once
                dA = part.to(torch.promote_types(part.dtype, torch.float32))
            else:
                dA += part
        # where x is misaligned, its padded copy goes before dx and its unpadded copy exist
        del xa
    if need[1]:
        dA = aligned.cols(dA[:r].to(A.dtype), in_features)
    if need[2]:
        dB = aligned.cols(dB[:out_features], r)
    if not need[0]:
        return None, dA, dB, dv
    dx = _empty((M, in_p), x.dtype, x.device)
    if lay.cols is None:   # W is one chunk: built again as in the forward, dx = g W
        (r0, r1, e0, e1, flat), = lay.rows
        torch.mm(ga, _rows_of_w(Bp, Ap, scale, r0, r1, flat, v[e0:e1]), out=dx)
    else:
        perm, cchunks = lay.cols
        vc = v[perm]
        for j0, j1, p0, p1, flat in cchunks:
            Wt = aligned.mm(Ap[:, j0:j1].t(), Bp.t(), scale)      # (j1 - j0) x out_p
            Wt.view(-1).index_add_(0, flat, vc[p0:p1])
            torch.mm(ga, Wt.t(), out=dx[:, j0:j1])
    return aligned.cols(dx, in_features).reshape(x.shape), dA, dB, dv
