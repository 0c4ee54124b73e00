"""Triton kernels for ``structrewrite::sparse_lowrank_linear`` (forward and backward).

The op computes ``y = s·(x Aᵀ) Bᵀ + x Sᵀ + bias`` with ``x`` (M x in), ``A`` (r x in),
``B`` (out x r) and ``S`` (out x in) sparse in CSR by output row (``crow``, ``col``,
``row``, ``values``). The gather kernels never form an out x in matrix, in forward or
backward.

Split of the work
-----------------
(For an element-wise support the op first asks ``sparse_lowrank_folded.pays`` whether
the folded path, W built a chunk at a time and multiplied on cuBLAS, is cheaper for the
call; what follows is the other path, the gather kernels.)
The six low-rank products (plus ``x Aᵀ`` again in the backward where the forward did
not keep it: ``EagerFunction`` and ``sparse_lowrank_linear_train`` do) are dense GEMMs
with ``r`` = 8..in/2 on one side; cuBLAS (``torch.matmul``) runs them. Triton runs the
rest, as three kernels:

``gather_spmm``  ``out = s·base + P Qᵀ + bias`` for a sparse ``Q`` walked row by row.
    Forward: ``base = (x Aᵀ) Bᵀ`` from cuBLAS, ``P = x``, ``Q = S``. Fused: the scale, the
    whole sparse product and the bias, in one pass that reads ``base`` once and writes
    ``y`` once (the epilogue of the second GEMM, as a kernel of its own).
    Backward, dx: ``base = (g B) A`` (scale folded into ``g B``), ``P = g``, ``Q = Sᵀ``
    walked through a cached CSC copy of the support (below); fused likewise.
``sddmm``  ``d values[k] = sum_m g[m, row[k]] · x[m, col[k]]``, the gradient ``gᵀ x``
    at the support only. Two implementations, picked by timing per shape:
    ``mm``: the tensor cores compute each (BR x BC) tile of ``gᵀ x`` over all tokens in
    registers and the epilogue reads off the tile's entries (ELL walk over the rows'
    entries in that column chunk); the tile is never stored. Costs one dense GEMM's
    FLOPs whatever the density, and wins at 3% on aligned shapes.
    ``gather``: blocks of entries times token ranges, dot products of gathered rows of
    ``gᵀ`` and ``xᵀ``; wins at low density and on shapes cuBLAS-style tiles handle badly.
``transpose``  ``xᵀ`` and ``gᵀ`` (features x tokens, contiguous along tokens).

Layout
------
``gather_spmm`` reads the dense operand transposed, so that gathering feature ``c`` for
a tile of BM tokens is one contiguous, vectorised load of BM elements. The grid is
(``nsplit`` output-row ranges) x (token tiles), row ranges varying fastest, so that the
programs in flight share few token tiles and their gathers hit L2. A program takes its
rows BN at a time in ELL fashion: a step loads the next ``unroll`` entries of each of
the BN rows, gathers the (BN x BM) blocks of ``Pᵀ`` and accumulates ``value · block`` in
float32. A row that has run out reads a valid feature with value 0, so the gathers
need no mask. Optionally (``CB`` > 0) a row's entries are taken feature chunk by feature
chunk (``segments``: per row, the offsets where each CB-wide feature chunk starts), so
that a program's gathers stay within a CB x BM slice (L1); on the H200 this cut L2
traffic 3x but cost more instructions than it saved, and the tuner rarely picks it.

The CSC copy of the support used for dx (column pointers, the row of each entry, the
permutation into ``values`` and the column of each entry) and the chunk offsets are
derived once from ``crow``/``col``/``row`` and cached, keyed on the buffers' identity,
data pointers and versions (never an out x in index map). The values are permuted
into CSC order at each backward (nnz elements), so training updates need no rebuild.

Precision
---------
bf16, fp16 or fp32 operands; every sum accumulates in float32 and is rounded once to the
output dtype, except that the low-rank part arrives from cuBLAS already rounded to the
operand dtype (one extra rounding of ``base``). ``sddmm`` ``mm`` uses bf16/fp16 tensor-core
products (exact) with float32 accumulation, and IEEE float32 products for fp32 inputs.
Tested tolerances (relative Frobenius error against the reference op): float32 1e-5 on
the CPU interpreter and 1e-4 on the GPU; bf16 1e-2; fp16 5e-3 (GPU). Measured on the
H200: bf16 ~2-3e-3, fp16 ~3e-4, fp32 ~3e-7 (``benchmarks/results/sparse_lowrank.md``).

Tiles
-----
On CUDA the tiles of each kernel are picked by timing the candidate configs once per
(kind, token bucket, shape, nnz, dtype) (``tuning.pick``; ``STRUCTREWRITE_TUNE=0`` uses
the defaults). The first call at a new shape therefore takes longer, mostly for Triton's
compilation of each candidate; these run in a pool of threads before the timing
(``STRUCTREWRITE_COMPILE_THREADS``, ``tuning.py``). On the H200 the first three steps of
the benchmark's four-layer 32x32-tile stack (three shapes), compiled with CUDA graphs on
a fresh machine, took 40.3 s with the pool (2026-11-29 03:35 UTC,
``benchmarks/results/sparse_lowrank_e2e_graphs.md``) against 114 s one by one (02:07
UTC; the pool alone is measured in ``tuning.py``). The timing must not
happen inside CUDA-graph capture. The choices are kept on disk for later processes on
the same machine (``STRUCTREWRITE_TUNE_CACHE``), which then skip it: a fresh process's
first fwd+bwd of a 4096x4096 tile layer took 0.80 s with the choices read from disk
(before the TMA candidates). Tests and callers can pass configs explicitly.

Structured supports
-------------------
A support in which every output row holds the same input channels (LOST, ``init: lost``)
does not go through these kernels: ``sparse_lowrank_channel.py`` folds it into the
low-rank GEMMs (rank r -> r + k) and the op runs on cuBLAS alone. A support made of whole
aligned b x b tiles (``block: 16/32/64``) goes to the tensor-core block-sparse kernels of
``sparse_lowrank_block.py``. The CUDA implementation detects either structure once per
support (cached on the buffers).

Eager entry
-----------
``eager`` is what ``SparseLowRankLinear`` calls in eager mode on plain CUDA tensors. It
looks the support's ``Plan`` up once (channel, tiles or gather; cached on the buffers)
and calls ``EagerFunction`` (below), the same implementations as an
``autograd.Function``: no dispatcher layers, and the backward reuses the forward's
``x Aᵀ``. A channel-wise support instead runs as plain differentiable GEMMs
(``channel.differentiable``), so that autograd's engine does its backward without
Python: these layers are the cheapest, and the host time is what limits them at 2048
wide (``benchmarks/results/sparse_lowrank.md``).

Speed (H200, bf16, M=16384, rank in/4, density 3%; see benchmarks/README.md)
---------------------------------------------------------------------------
The gather kernels, random support, fwd+bwd at 4096x4096: 6.4-6.7 ms, against dense
cuBLAS 2.4 ms and the SLTrain path 2.7-3.0 ms (runs of 14:55 and 15:52 UTC). The
gathers are the cost: ``x Sᵀ`` and ``g S`` each move nnz·M gathered elements (8.2e9 at
this shape) through L2 with one FMA each, about 2 ms apiece; ncu showed L2 throughput
at 50-85% of peak and instruction issue at 55-75%, so they are limited by L2 bandwidth
and latency, not by arithmetic. A tensor-core SpMM
that built tiles of ``Sᵀ`` in registers from the entries was correct but 4x to 150x
slower than the gather and is not included (benchmarks/README.md lists what was tried).
So at this density and token count the op does not use them: the cost model of
``sparse_lowrank_folded.py`` sends the call to the folded path (W built a chunk at a
time, cuBLAS products), 2.3-2.8 ms. The gathers remain the path for sparser supports
and few tokens. Tile supports (32 x 32) run at 0.67-0.76x dense at 4096x4096 and
channel-wise supports at 0.53-0.58x (runs up to 2026-11-29 02:13 UTC).

Misaligned widths
-----------------
Where ``in`` or ``out`` is not a multiple of 16 bytes, the cuBLAS GEMMs run on
zero-padded copies (``aligned.py``) and the epilogue kernels read the padded low-rank
result while writing the real output.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from structrewrite.codegen.triton import aligned
from structrewrite.codegen.triton import sparse_lowrank_block as block
from structrewrite.codegen.triton import sparse_lowrank_channel as channel
from structrewrite.codegen.triton import sparse_lowrank_folded as folded
from structrewrite.codegen.triton.support_cache import cached
from structrewrite.codegen.triton.support_plan import Plan, contiguous, csc_of, forward_keeping_xa, plan  # noqa: F401  (re-exported)
from structrewrite.codegen.triton.tuning import bucket, cdiv, dot, interpreting, lazily, pick, sm_count
from structrewrite.ops.sparse_lowrank_linear import (ALL, LIKE, LIKE_TRAIN, autocast_off, backward_op,
                                                     keep, kept, needs_of, own, own_outputs,
                                                     unread)


def on_own_device(fn):
    """``fn(first_tensor, ...)`` run with the first tensor's CUDA device current. Triton
    launches a kernel on the current device and stream, and the tuning times there;
    ATen's operators set the device of their operands themselves, Python kernels get no
    such guard from the dispatcher. Without this, a layer on ``cuda:1`` called while
    ``cuda:0`` is current (a model spread over GPUs, e.g. an HF ``device_map``) would have
    its kernels launched on ``cuda:0``. One integer comparison where the device is current
    already."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        index = args[0].device.index
        if index is not None and index != torch.cuda.current_device():
            with torch.cuda.device(index):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return run

OP = "structrewrite::sparse_lowrank_linear"
OP_BACKWARD = "structrewrite::sparse_lowrank_linear_backward"
OP_TRAIN = "structrewrite::sparse_lowrank_linear_train"
OP_BACKWARD_TRAIN = "structrewrite::sparse_lowrank_linear_backward_train"


# ----------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------
@triton.jit
def _gather_spmm_kernel(
    pt_ptr, stride_pf,                     # dense operand, transposed: (feature, token), tokens contiguous
    seg_ptr, NCH, CHUNK,                   # (NROWS, NCH + 1) entry offsets per row and CHUNK-wide feature chunk
    idx_ptr, val_ptr, perm_ptr,            # feature per entry, values[, perm into values]
    base_ptr, stride_bm,                   # optional dense term (rows contiguous), scaled by `scale`
    bias_ptr,                              # optional (NROWS,)
    out_ptr, stride_om,                    # (M, NROWS), rows contiguous
    M, NROWS, scale,
    BM: tl.constexpr, BN: tl.constexpr, EVEN_M: tl.constexpr, UNROLL: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    nsplit = tl.num_programs(0)
    blocks = tl.cdiv(NROWS, BN)
    rows_per = tl.cdiv(blocks, nsplit) * BN
    row_lo = pid_s * rows_per
    row_hi = tl.minimum(row_lo + rows_per, NROWS)

    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    for n0 in range(row_lo, row_hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < row_hi
        offs_n64 = offs_n.to(tl.int64)
        seg_row = seg_ptr + offs_n64 * (NCH + 1)
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        # feature chunk by chunk: the gathers of one chunk touch NCH-th of the tile (L1)
        for cc in range(0, NCH):
            start = tl.load(seg_row + cc, mask=mask_n, other=0)
            stop = tl.load(seg_row + cc + 1, mask=mask_n, other=0)
            lens = stop - start
            longest = tl.max(lens, axis=0)
            # UNROLL entries of every row per step: more gathers in flight per warp
            for j0 in range(0, longest, UNROLL):
                for u in tl.static_range(UNROLL):
                    j = j0 + u
                    live = j < lens
                    k = start + j
                    # a row that has run out reads the chunk's first feature with value 0:
                    # its gather needs no mask (and hits L1); only the scalar loads are masked
                    f = tl.load(idx_ptr + k, mask=live, other=cc * CHUNK).to(tl.int64)
                    if HAS_PERM:
                        kv = tl.load(perm_ptr + k, mask=live, other=0)
                        v = tl.load(val_ptr + kv, mask=live, other=0.0).to(tl.float32)
                    else:
                        v = tl.load(val_ptr + k, mask=live, other=0.0).to(tl.float32)
                    # int32 token offsets added last keep the loads vectorised along tokens
                    src = (pt_ptr + f * stride_pf)[:, None] + offs_m[None, :]
                    if EVEN_M:
                        blk = tl.load(src, eviction_policy="evict_last")
                    else:
                        blk = tl.load(src, mask=mask_m[None, :], other=0.0, eviction_policy="evict_last")
                    acc += v[:, None] * blk.to(tl.float32)
        mask = mask_n[:, None] & mask_m[None, :]
        if HAS_BASE:
            b = tl.load((base_ptr + offs_m64 * stride_bm)[None, :] + offs_n[:, None],
                        mask=mask, other=0.0, eviction_policy="evict_first")
            acc += scale * b.to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store((out_ptr + offs_m64 * stride_om)[None, :] + offs_n[:, None],
                 acc.to(out_ptr.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _sddmm_mm_kernel(
    g_ptr, stride_gm, stride_gr,           # g (M, out)
    x_ptr, stride_xm, stride_xc,           # x (M, in)
    seg_ptr, NCH,                          # (out, NCH + 1): CSR offsets per row and BC-wide column chunk
    col_ptr, dv_ptr,                       # (nnz,) columns, float32 output
    M, NOUT, NIN,
    BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    nr = tl.cdiv(NOUT, BR)
    nc = tl.cdiv(NIN, BC)
    # grouped order: GROUP row blocks share their column blocks while in flight (L2)
    width = GROUP * nc
    first = (pid // width) * GROUP
    rows_in_group = tl.minimum(nr - first, GROUP)
    rb = first + (pid % width) % rows_in_group
    cb = (pid % width) // rows_in_group

    offs_r = rb * BR + tl.arange(0, BR)
    offs_c = cb * BC + tl.arange(0, BC)
    mask_r = offs_r < NOUT
    mask_c = offs_c < NIN
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for m0 in range(0, M, BK):
        offs_k = m0 + tl.arange(0, BK)
        mk = offs_k < M
        a = tl.load(g_ptr + offs_k[None, :].to(tl.int64) * stride_gm + offs_r[:, None] * stride_gr,
                    mask=mask_r[:, None] & mk[None, :], other=0.0)
        b = tl.load(x_ptr + offs_k[:, None].to(tl.int64) * stride_xm + offs_c[None, :] * stride_xc,
                    mask=mk[:, None] & mask_c[None, :], other=0.0)
        acc = dot(a, b, acc, IEEE)   # IEEE: float32 operands (or any, under the interpreter)
    # sample the tile at the support: the entries of row r in this column chunk
    seg_row = seg_ptr + offs_r.to(tl.int64) * (NCH + 1) + cb
    start = tl.load(seg_row, mask=mask_r, other=0)
    stop = tl.load(seg_row + 1, mask=mask_r, other=0)
    lens = stop - start
    longest = tl.max(lens, axis=0)
    local = tl.arange(0, BC)
    for j in range(0, longest):
        live = j < lens
        k = start + j
        c = tl.load(col_ptr + k, mask=live, other=0) - cb * BC
        val = tl.sum(tl.where(local[None, :] == c[:, None], acc, 0.0), axis=1)
        tl.store(dv_ptr + k, val, mask=live)


@triton.jit
def _sddmm_kernel(
    gt_ptr, stride_gf,                     # gᵀ (out, M), tokens contiguous
    xt_ptr, stride_xf,                     # xᵀ (in, M), tokens contiguous
    row_ptr, col_ptr,                      # entries (nnz,)
    part_ptr,                              # (nchunk, nnz) float32
    NNZ, M,
    BK: tl.constexpr, BM: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    nchunk = tl.num_programs(1)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mask_k = offs_k < NNZ
    r = tl.load(row_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    c = tl.load(col_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    per = tl.cdiv(tl.cdiv(M, BM), nchunk) * BM
    m_lo = pid_c * per
    m_hi = tl.minimum(m_lo + per, M)
    acc = tl.zeros([BK, BM], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask = mask_k[:, None] & (offs_m < m_hi)[None, :]
        a = tl.load((gt_ptr + r * stride_gf)[:, None] + offs_m[None, :], mask=mask, other=0.0)
        b = tl.load((xt_ptr + c * stride_xf)[:, None] + offs_m[None, :], mask=mask, other=0.0)
        acc += a.to(tl.float32) * b.to(tl.float32)
    tl.store(part_ptr + pid_c.to(tl.int64) * NNZ + offs_k, tl.sum(acc, axis=1), mask=mask_k)


# ----------------------------------------------------------------------------------
# launchers (CPU tensors work under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------
# gather_spmm config: (BM, BN, CB, nsplit, num_warps[, unroll]). CB: width of the feature
# chunks (0: one chunk); nsplit: row ranges of the grid (0: chosen from the grid size);
# unroll: entries of each row taken per step (default 1).
SPMM_CANDIDATES = [
    (64, 32, 0, 32, 4, 4), (64, 32, 0, 32, 4, 2), (128, 16, 0, 32, 4, 4), (128, 32, 0, 32, 8, 2),
    (128, 32, 0, 32, 8, 4), (256, 16, 0, 32, 8, 2), (128, 8, 0, 64, 2, 4), (64, 64, 0, 32, 8, 2),
    (32, 32, 0, 32, 4, 4), (128, 16, 1024, 32, 4, 2), (64, 32, 512, 32, 4, 2),
    # few tokens (decoding, small batches): the rows split over enough programs to fill the
    # device (nsplit 0) in small token tiles. On the H200 at 1 to 256 tokens, bf16, 3%:
    # 4096x4096 forward 121 -> 39 us at 1 token, 128 -> 36 at 64, 114 -> 50 at 256 (dx
    # alike); 2048->5461 forward 97 -> 19 us and dx 82 -> 30 at 1 token; the list's own
    # configs stay the faster from 1024 tokens (benchmarks/README.md, "What was tried")
    (64, 16, 0, 0, 4, 4), (64, 32, 0, 0, 4, 4), (16, 32, 0, 0, 4, 4), (16, 16, 0, 0, 4, 4),
    (16, 4, 0, 0, 1, 4),
]
SPMM_DEFAULT = (64, 32, 0, 32, 4, 4)
# sddmm configs: ("gather", BK, BM, nchunk, num_warps): entries x tokens, from xᵀ and gᵀ;
# ("mm", BR, BC, BK, num_warps, num_stages): the dense gᵀ x tile on the tensor cores,
# sampled at the support in the epilogue (cost independent of the density).
SDDMM_CANDIDATES = [
    ("gather", 32, 64, 0, 4), ("gather", 64, 32, 0, 4),
    ("mm", 128, 128, 64, 8, 3), ("mm", 128, 128, 64, 4, 4), ("mm", 128, 256, 64, 8, 3),
    ("mm", 64, 128, 64, 4, 4), ("mm", 128, 64, 64, 4, 4),
    # few tokens: on the H200 at 4096x4096, 35.5 -> 14.9 us at 1 token, 37.3 -> 21.6 at 8
    ("gather", 64, 16, 0, 2),
]
SDDMM_DEFAULT = ("mm", 128, 128, 64, 8, 3)


def _spmm_nsplit(cfg, M: int, nrows: int, device) -> int:
    BM, BN, _, nsplit, _ = cfg[:5]
    if nsplit:
        return nsplit
    tiles = cdiv(max(M, 1), BM)
    want = 4 * sm_count(device)
    return max(1, min(cdiv(nrows, BN), cdiv(want, tiles) if tiles < want else 8))


def segments(ptr: torch.Tensor, idx: torch.Tensor, owner: torch.Tensor, nfeat: int,
             width: int) -> torch.Tensor:
    """(nrows, nch + 1) int32: entry offsets of each row at each ``width``-wide feature
    chunk (chunk ``c`` of row ``n`` is ``seg[n, c]:seg[n, c + 1]``); ``owner`` is the row of
    each entry. Entries are sorted by feature inside a row, so chunks are contiguous.
    Made once per support (``support_cache``)."""
    nrows = ptr.numel() - 1
    nch = max(1, cdiv(nfeat, width)) if width else 1

    def build():
        if nch == 1:
            return torch.stack((ptr[:-1], ptr[1:]), 1).contiguous()
        chunk = torch.div(idx.long(), width, rounding_mode="floor")
        counts = torch.bincount(owner.long() * nch + chunk, minlength=nrows * nch).view(nrows, nch)
        seg = torch.zeros((nrows, nch + 1), dtype=torch.int64, device=ptr.device)
        seg[:, 1:] = torch.cumsum(counts, 1)
        return (seg + ptr[:-1].long().unsqueeze(1)).int()
    # keyed by the width: two widths can give the same number of chunks at other offsets
    return cached("segments", (ptr, idx), (nfeat, nch, width if nch > 1 else 0), build)


def gather_spmm(pt: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor, values: torch.Tensor,
                nrows: int, out: torch.Tensor, perm: Optional[torch.Tensor] = None,
                base: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                scale: float = 1.0, config=None, owner: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[m, n] = scale·base[m, n] + sum_{k in row n} values[perm[k]]·pt[idx[k], m] + bias[n].

    ``pt`` is (features, M), ``ptr`` (nrows + 1), ``idx``/``perm`` (nnz) int32, ``out``
    (M, nrows); ``owner`` (the row of each entry) is needed when the config chunks the
    features. Every element of ``out`` is written."""
    M = pt.shape[1]
    if M == 0 or nrows == 0:
        return out
    assert pt.stride(1) == 1 and out.stride(1) == 1 and (base is None or base.stride(1) == 1)
    cfg = config or SPMM_DEFAULT
    BM, BN, CB, _, warps = cfg[:5]
    unroll = cfg[5] if len(cfg) > 5 else 1
    if owner is None:
        CB = 0
    seg = segments(ptr, idx, owner, pt.shape[0], CB)
    nsplit = _spmm_nsplit(cfg, M, nrows, pt.device)
    grid = (nsplit, cdiv(M, BM))
    dummy = out
    _gather_spmm_kernel[grid](
        pt, pt.stride(0),
        seg, seg.shape[1] - 1, CB if seg.shape[1] > 2 else 0,
        idx, values, perm if perm is not None else idx,
        base if base is not None else dummy,
        base.stride(0) if base is not None else 0,
        bias if bias is not None else dummy,
        out, out.stride(0),
        M, nrows, float(scale),
        BM=BM, BN=BN, EVEN_M=M % BM == 0, UNROLL=unroll, HAS_PERM=perm is not None, HAS_BASE=base is not None,
        HAS_BIAS=bias is not None, num_warps=warps,
    )
    return out


def _sddmm_nchunk(cfg, M: int, nnz: int, nfeat: int, device) -> int:
    _, BK, BM, nchunk, _ = cfg
    if nchunk:
        return nchunk
    blocks = cdiv(nnz, BK)
    # Token ranges sized so that the gathered slices of gᵀ and xᵀ stay in L2 (~24 MB),
    # and enough of them to fill the device when there are few entry blocks.
    by_cache = cdiv(M * nfeat * 2, 24 << 20)
    by_fill = cdiv(4 * sm_count(device), blocks)
    return max(1, min(cdiv(M, BM), max(by_cache, by_fill)))


def sddmm(g: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
          row: torch.Tensor, config=None, gt: Optional[torch.Tensor] = None,
          xt: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dv[k] = sum_m g[m, row[k]]·x[m, col[k]] (g: M x out, x: M x in), float32 (nnz,).

    The "gather" configs read gᵀ and xᵀ (made here unless given)."""
    nnz = row.numel()
    M, nout = g.shape
    nin = x.shape[1]
    if nnz == 0:
        return torch.zeros(0, dtype=torch.float32, device=g.device)
    if M == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=g.device)
    cfg = config or SDDMM_DEFAULT
    if cfg[0] == "mm":
        _, BR, BC, BK, warps, stages = cfg
        seg = segments(crow, col, row, nin, BC)
        dv = _empty((nnz,), torch.float32, g.device)
        grid = (cdiv(nout, BR) * cdiv(nin, BC),)
        _sddmm_mm_kernel[grid](
            g, g.stride(0), g.stride(1), x, x.stride(0), x.stride(1),
            seg, seg.shape[1] - 1, col, dv, M, nout, nin,
            BR=BR, BC=BC, BK=BK, GROUP=8, IEEE=g.dtype == torch.float32 or interpreting(),
            num_warps=warps, num_stages=stages,
        )
        return dv
    _, BK, BM, _, warps = cfg
    gt = transpose(g) if gt is None else gt
    xt = transpose(x) if xt is None else xt
    assert gt.stride(1) == 1 and xt.stride(1) == 1
    nchunk = _sddmm_nchunk(cfg, M, nnz, nout + nin, g.device)
    part = _empty((nchunk, nnz), torch.float32, g.device)
    _sddmm_kernel[(cdiv(nnz, BK), nchunk)](
        gt, gt.stride(0), xt, xt.stride(0),
        row, col, part, nnz, M, BK=BK, BM=BM, num_warps=warps,
    )
    return part[0] if nchunk == 1 else part.sum(0)


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, R, C, stride_sr, stride_sc, stride_dc, stride_dr,
                      TR: tl.constexpr, TC: tl.constexpr):
    offs_r = tl.program_id(0) * TR + tl.arange(0, TR)
    offs_c = tl.program_id(1) * TC + tl.arange(0, TC)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    r64 = offs_r.to(tl.int64)[:, None]
    c64 = offs_c.to(tl.int64)[None, :]
    tile = tl.load(src_ptr + r64 * stride_sr + c64 * stride_sc, mask=mask)
    tl.store(dst_ptr + c64 * stride_dc + r64 * stride_dr, tile, mask=mask)


def transpose(a: torch.Tensor) -> torch.Tensor:
    """a (R x C) -> contiguous aᵀ (C x R), by tiles."""
    R, C = a.shape
    out = torch.empty((C, R), dtype=a.dtype, device=a.device)
    if R and C:
        _transpose_kernel[(cdiv(R, 64), cdiv(C, 64))](
            a, out, R, C, a.stride(0), a.stride(1), out.stride(0), out.stride(1),
            TR=64, TC=64, num_warps=4)
    return out


# ----------------------------------------------------------------------------------
# the op's CUDA implementation
# ----------------------------------------------------------------------------------
def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of the kernels' outputs (the tests replace it to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def forward(x, A, B, values, crow, col, row, bias, scale, config=None, saved=None):
    """The forward op; ``config`` fixes the gather_spmm tiles (else chosen by timing).
    ``saved``: a list that receives ``x Aᵀ`` for ``backward`` (the eager autograd path)."""
    in_features, out_features = A.shape[1], B.shape[0]
    x2 = x.reshape(-1, in_features)
    M = x2.shape[0]
    y = _empty((M, out_features), x.dtype, x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], out_features)
    in_p, out_p = aligned.widths(A, B, x.dtype)
    Ap, Bp = aligned.lowrank(A, B, x.dtype)
    t = aligned.pad_cols(x2, in_p) @ Ap.t()          # M x r' (zero columns past the rank)
    if saved is not None:
        saved.append(t)
    base = t @ Bp.t()                                 # cuBLAS, M x out_p; scaled in the epilogue
    xt = transpose(x2)

    def run(c):
        return gather_spmm(xt, crow, col, values, out_features, y, base=base, bias=bias,
                           scale=scale, config=c, owner=row)

    if config is None:
        config = pick("spmm", (bucket(M), out_features, in_features, values.numel(), x.dtype),
                      SPMM_CANDIDATES, run, SPMM_DEFAULT)
    run(config)
    return y.reshape(*x.shape[:-1], out_features)


def backward(grad, x, A, B, values, crow, col, row, scale, spmm_config=None, sddmm_config=None,
             saved=(), need=(True,) * 4):
    """The backward op: (dx, dA, dB, dvalues); dA and dB are plain cuBLAS GEMMs.
    ``saved``: what ``forward`` put in its ``saved`` list (else ``x Aᵀ`` is recomputed).
    ``need``: which of the four to compute (None in the others' places)."""
    in_features, out_features = A.shape[1], B.shape[0]
    g2 = grad.reshape(-1, out_features)
    x2 = x.reshape(-1, in_features)
    M = x2.shape[0]
    if M == 0:
        zeros = (_empty(x.shape, x.dtype, x.device).zero_(), torch.zeros_like(A),
                 torch.zeros_like(B), torch.zeros_like(values))
        return tuple(z if n else None for z, n in zip(zeros, need))
    # the cuBLAS GEMMs take copies with aligned rows where a width is misaligned (``aligned``)
    in_p, out_p = aligned.widths(A, B, x.dtype)
    # the padded copies of a misaligned x and g are read there only, and go with the call
    # x is read for dA, dB and d values only (a frozen layer keeps a stand-in)
    xp = aligned.pad_cols(x2, in_p) if need[1] or need[2] else None
    gBs, Ap, dA, dB = aligned.lowrank_grads(aligned.pad_cols(g2, out_p), xp,
                                            A, B, scale, saved[0] if saved else None, need=need)
    del xp
    dA = None if dA is None else dA.to(A.dtype)
    dB = None if dB is None else dB.to(B.dtype)
    dx = dv = None
    nnz = values.numel()
    if not (need[0] or need[3]):
        return dx, dA, dB, dv
    gt = transpose(g2)
    if need[0]:
        dx = _empty(x2.shape, x.dtype, x.device)
        base = gBs @ Ap                               # M x in_p
        cptr, cidx, cperm, cowner = csc_of(col, row, in_features)
        values_csc = values[cperm]                    # nnz elements: cheaper than a perm load per step

        def run_dx(c):
            return gather_spmm(gt, cptr, cidx, values_csc, in_features, dx, base=base,
                               config=c, owner=cowner)

        if spmm_config is None:
            spmm_config = pick("spmm_t", (bucket(M), in_features, out_features, nnz, x.dtype),
                               SPMM_CANDIDATES, run_dx, SPMM_DEFAULT)
        run_dx(spmm_config)
        dx = dx.reshape(x.shape)
    if not need[3]:
        return dx, dA, dB, dv
    if nnz:
        xt = lazily(lambda: transpose(x2))           # made once, only for "gather" configs

        def run_dv(c):
            return sddmm(g2, x2, crow, col, row, config=c, gt=gt,
                         xt=xt() if c[0] == "gather" else None)

        if sddmm_config is None:
            sddmm_config = pick("sddmm", (bucket(M), out_features, in_features, nnz, x.dtype),
                                SDDMM_CANDIDATES, run_dv, SDDMM_DEFAULT)
        dv = run_dv(sddmm_config).to(values.dtype)
    else:
        dv = torch.zeros_like(values)
    return dx, dA, dB, dv


def _folds(x, A, B, values) -> bool:
    """Whether an element-wise support takes the folded path (``sparse_lowrank_folded``).
    On CPU tensors (the kernels under Triton's interpreter) the model has no gather rate
    and keeps the gathers."""
    return folded.folds(x, A, B, values, "cuda" if x.is_cuda else None)


def _wide(x) -> bool:
    """float64: the gather and tile kernels accumulate in float32, so element-wise and tile
    supports take the folded path (float64 GEMMs on cuBLAS), as channel-wise ones take
    float64 GEMMs: float64 results as the op's specification computes them."""
    return x.dtype == torch.float64


def _forward_cuda(x, A, B, values, crow, col, row, bias, scale, saved=None, how=None, fold=None):
    """``fold``: whether an element-wise support takes the folded path (None: ``_folds``)."""
    values, crow, col, row, bias = contiguous(values, crow, col, row, bias)
    how = how or plan(crow, col, row, B.shape[0], A.shape[1])
    if how.kind == "channel":     # channel-wise support (LOST): all dense GEMMs
        return channel.forward(x, A, B, values, how.cols, bias, scale, saved=saved)
    wide = _wide(x)
    if how.kind == "block" and not wide:   # tiles of b x b: tensor-core block-sparse kernels
        return block.forward(x, A, B, values, crow, col, row, bias, scale, how.layout.b,
                             saved=saved, lay=how.layout)
    if wide or (_folds(x, A, B, values) if fold is None else fold):   # W by chunks on cuBLAS
        return folded.forward(x, A, B, values, crow, col, row, bias, scale, memo=how.memo)
    return forward(x, A, B, values, crow, col, row, bias, scale, saved=saved)


def _backward_cuda(grad, x, A, B, values, crow, col, row, scale, saved=(), how=None, fold=None,
                   xa=None, need=ALL):
    """``saved``: what the forward kept (``EagerFunction``); ``xa``: x Aᵀ from the
    forward (``sparse_lowrank_linear_train``); without either, x Aᵀ is computed again.
    ``need``: which of (dx, dA, dB, dvalues) to compute (None in the others' places)."""
    values, crow, col, row = contiguous(values, crow, col, row)
    how = how or plan(crow, col, row, B.shape[0], A.shape[1])
    if xa is not None:
        xa = xa.reshape(-1, A.shape[0])
    if how.kind == "channel":
        return channel.backward(grad, x, A, B, values, how.cols, scale, saved=saved, xa=xa,
                                need=need)
    if not saved and xa is not None:   # what the gather and tile backward passes take
        saved = [xa]
    wide = _wide(x)
    if how.kind == "block" and not wide:
        return block.backward(grad, x, A, B, values, crow, col, row, scale, how.layout.b,
                              saved=saved, lay=how.layout, need=need)
    if wide or (_folds(x, A, B, values) if fold is None else fold):
        return folded.backward(grad, x, A, B, values, crow, col, row, scale, memo=how.memo,
                               need=need)
    return backward(grad, x, A, B, values, crow, col, row, scale, saved=saved, need=need)


def _backward_op_cuda(grad, x, A, B, values, crow, col, row, scale, need=ALL):
    """``sparse_lowrank_linear_backward``."""
    return _backward_cuda(grad, x, A, B, values, crow, col, row, scale, need=need)


def _forward_train_cuda(x, A, B, values, crow, col, row, bias, scale):
    """``sparse_lowrank_linear_train``: (y, x Aᵀ), x Aᵀ taken from the forward's own work
    (``forward_keeping_xa``; the folded path has none and computes it)."""
    return forward_keeping_xa(_forward_cuda, x, A, B, values, crow, col, row, bias, scale)


def _backward_train_cuda(grad, x, xa, A, B, values, crow, col, row, scale, need=ALL):
    """``sparse_lowrank_linear_backward_train``: the backward with x Aᵀ given."""
    return _backward_cuda(grad, x, A, B, values, crow, col, row, scale, xa=xa, need=need)


class EagerFunction(torch.autograd.Function):
    """The same kernels as the op's CUDA implementation, called without the dispatcher.

    ``SparseLowRankLinear`` uses this in eager mode on plain CUDA tensors; tracing,
    export, ``torch.compile`` and every other device see the op. Two differences: no
    Python dispatch layers of ``torch.library.custom_op``, and the backward reuses the
    forward's ``x Aᵀ`` (M x r, kept like the input of any linear layer) instead of
    recomputing it, one GEMM fewer. On the H200 (``benchmarks/results/sparse_lowrank.md``,
    table of the ways of running a layer: ``block32`` against ``block32_op``) this is
    faster than the op at every shape, most where the host time dominates. Channel-wise
    supports skip it (``eager``)."""

    @staticmethod
    def forward(ctx, x, A, B, values, crow, col, row, bias, scale, how):
        saved: list = []
        fold = how.kind == "gather" and _folds(x, A, B, values)   # the backward does the same
        y = _forward_cuda(x, A, B, values, crow, col, row, bias, scale, saved=saved, how=how,
                          fold=fold)
        needs = ctx.needs_input_grad
        if not any(needs[1:4]):   # dx alone reads no x: a frozen layer keeps no activation
            x = unread(x)
        if not needs[2]:          # x Aᵀ is kept for dB
            saved = []
        keep(ctx, x, A, B, values, crow, col, row, *saved)
        ctx.scale, ctx.has_bias, ctx.how, ctx.fold = scale, bias is not None, how, fold
        return own(y)   # not a view: in-place changes to y are allowed

    @staticmethod
    def backward(ctx, grad):
        x, A, B, values, crow, col, row, *saved = kept(ctx)
        needs = ctx.needs_input_grad
        dbias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and needs[7] else None
        if torch.is_grad_enabled():
            # create_graph=True: the kernels' outputs carry no autograd history, so a second
            # derivative through them would miss terms (hvp and autograd.grad with
            # allow_unused gave zeros). The backward op's autograd node is on the path to
            # every input, and refuses a second backward that reaches it.
            grads = torch.ops.structrewrite.sparse_lowrank_linear_backward(
                grad, x, A, B, values, crow, col, row, ctx.scale, needs_of(ctx))
            dx, dA, dB, dv = (g if n else None for g, n in zip(grads, needs[:4]))
        else:
            dx, dA, dB, dv = _backward_cuda(grad.contiguous(), x, A, B, values, crow, col, row,
                                            ctx.scale, saved=saved, how=ctx.how, fold=ctx.fold,
                                            need=needs[:4])
        return dx, dA, dB, dv, None, None, None, dbias, None, None


@on_own_device
def eager(x, A, B, values, crow, col, row, bias, scale: float) -> torch.Tensor:
    """``sparse_lowrank_linear`` in eager mode: one plan lookup, then ``EagerFunction``, or
    for a channel-wise support plain differentiable GEMMs (``channel.differentiable``),
    whose backward autograd runs without Python."""
    crow, col, row = contiguous(crow, col, row)
    how = plan(crow, col, row, B.shape[0], A.shape[1])
    if how.kind == "channel":
        return channel.differentiable(x, A, B, values.contiguous(), how.cols, bias, scale)
    return EagerFunction.apply(x, A, B, values, crow, col, row, bias, scale, how)


def register() -> list[str]:
    """Register the kernels as the op's CUDA implementation (called by the package)."""
    for op, fn in ((OP, own_outputs(_forward_cuda)),
                   (OP_BACKWARD, backward_op(_backward_op_cuda, 9, LIKE)),
                   (OP_TRAIN, own_outputs(_forward_train_cuda)),
                   (OP_BACKWARD_TRAIN, backward_op(_backward_train_cuda, 10, LIKE_TRAIN))):
        torch.library.register_kernel(op, "cuda", on_own_device(autocast_off(fn)))
    return [OP, OP_BACKWARD, OP_TRAIN, OP_BACKWARD_TRAIN]
