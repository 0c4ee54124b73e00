"""Block-structured supports of ``structrewrite::sparse_lowrank_linear``: tensor-core kernels.

When the support is a set of whole, aligned ``b x b`` tiles of the out x in grid
(``block: 16/32/64`` of the pass; b is detected from the support itself), the sparse
part is a block-sparse matrix, and each of its three products is a sum of small dense
GEMMs that run on the tensor cores:

    forward    y[:, I]  = s·base[:, I] + bias[I] + Σ_{(I,J)} x[:, J] · V_IJᵀ
    dx         dx[:, J] = base'[:, J]            + Σ_{(I,J)} g[:, I] · V_IJ
    d values   dV_IJ    = g[:, I]ᵀ · x[:, J]     (over all tokens)

with ``I``/``J`` the row/column ranges of a tile, ``base = (x Aᵀ) Bᵀ`` and ``base' =
s·(g B) A`` from cuBLAS. ``bsr_spmm`` computes the first two: one program per (tile row
of the output, BM tokens) walks the tiles of that row (a block-CSR list, or its block-CSC
transpose for dx), one tile or G tiles per step (a tuning choice: G tiles make one
product of reduction depth G·b, where one 16x16 tile is a single tensor-core step; on
Hopper the one-tile walk can also move its blocks with the tensor memory accelerator,
TMA, instead of per-thread loads and stores, another tuning choice),
accumulates in float32 and adds the epilogue in place on ``base``, so
the output is written once and no buffer beyond ``base`` is allocated. ``bsr_sddmm``
computes the third: one program per (tile, token range), float32 partial sums reduced
over the ranges (or one program per G tiles of a tile row, which share their block of
the gradient: one product of G·b x b per token step). d values can also come out of the
dx pass itself (``bsr_spmm`` with
``dv``): a program there loads x[:, J] of its tile column once and, for every tile (I, J)
it walks, adds its token block's g[:, I]ᵀ x[:, J] to a float32 buffer with atomic
additions, from the block of g it loads for dx anyway. The backward times both ways once
per problem and keeps the faster (``_dv_path``); under
``torch.use_deterministic_algorithms`` it keeps the separate kernel, whose sums come in
a fixed order. The kernels read and write the values in the element-CSR order of the
module (the order of the state dict and of every other implementation): with whole
tiles, every row of tile row ``I`` holds ``n_I·b`` entries, so tile ``(I, J)`` is a
strided ``b x b`` block of ``values`` (its first entry ``base_t``, row stride
``n_I·b``), and no packing or scattering of values happens per call.

Nothing forms an out x in matrix; the work of the sparse part is 3 · 2·M·nnz FLOPs on
the tensor cores, plus reading each input tile once per tile in its row.

Precision: bf16/fp16 tile products on the tensor cores with float32 accumulation; float32
inputs use IEEE float32 products (also under the CPU interpreter, whose bf16 dots are
wrong in Triton 3.9). As in the gather kernels, ``base`` arrives from cuBLAS rounded to
the operand dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from structrewrite.codegen.triton import aligned
from structrewrite.codegen.triton.tuning import (bucket, cdiv, dot, has_tma, interpreting, lazily,
                                                 pick, sm_count)

# detection and layout live in ``block_layout`` (plain torch, also used by the CPU
# implementation); re-exported here for the kernels' callers
from structrewrite.codegen.triton.block_layout import BLOCKS, Layout, block_size, layout  # noqa: E402,F401


# ----------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------
@triton.jit
def _bsr_spmm_kernel(
    in_ptr, stride_im,                     # dense operand (M, K), features contiguous
    ptr_ptr, other_ptr, tidx_ptr,          # per output tile row: list of (input tile column, tile index)
    v_ptr, tbase_ptr, tstride_ptr,         # values (CSR order); tile t's entry (i, j) at base + i·stride + j
    base_ptr, stride_bm,                   # dense term (M, N), scaled by `scale`; may alias out
    bias_ptr,
    out_ptr, stride_om,
    x_ptr, stride_xm, dv_ptr,              # DV: x (M, N) and the float32 d values (CSR order) it adds to
    M, N, scale,
    B: tl.constexpr, BM: tl.constexpr, TRANS: tl.constexpr, HAS_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, DV: tl.constexpr, G: tl.constexpr,
    DESC_IN: tl.constexpr, DESC_X: tl.constexpr, DESC_IO: tl.constexpr,
):
    """``DESC_IN`` / ``DESC_X`` / ``DESC_IO``: ``in_ptr`` / ``x_ptr`` / ``base_ptr`` and
    ``out_ptr`` are tensor descriptors with (BM, B) blocks, loaded and stored by the
    Hopper tensor memory accelerator (TMA; rows and columns past the tensor read as zeros
    and are not written), not pointers; only with the one-tile walk (G = 1)."""
    p = tl.program_id(0)                   # output tile row (fastest: neighbours share tokens)
    mt = tl.program_id(1)
    offs_m = mt * BM + tl.arange(0, BM)
    offs_m64 = offs_m.to(tl.int64)
    mask_m = offs_m < M
    offs_b = tl.arange(0, B)
    offs_n = p * B + offs_b
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    # the dense term first: its load is in flight while the tiles are fetched
    if HAS_BASE:
        if DESC_IO:
            bse = base_ptr.load([mt * BM, p * B])
        else:
            bse = tl.load((base_ptr + offs_m64 * stride_bm)[:, None] + offs_n[None, :], mask=mask,
                          other=0.0)
        acc = scale * bse.to(tl.float32)
    else:
        acc = tl.zeros([BM, B], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if DV:   # x[:, J] of this tile column, for every tile's gᵀ x below
        if DESC_X:
            xb = x_ptr.load([mt * BM, p * B])
        else:
            xb = tl.load((x_ptr + offs_m64 * stride_xm)[:, None] + offs_n[None, :], mask=mask,
                         other=0.0)
        if IEEE:
            xb = xb.to(tl.float32)
    else:
        xb = acc   # a placeholder: the grouped walk takes xb as an argument, unread without DV
    start = tl.load(ptr_ptr + p)
    stop = tl.load(ptr_ptr + p + 1)
    if G > 1:   # G tiles per step: one (BM x G·B) @ (G·B x B) product
        acc = _bsr_spmm_grouped(acc, in_ptr, stride_im, other_ptr, tidx_ptr, v_ptr, tbase_ptr,
                                tstride_ptr, xb, dv_ptr, offs_m64, mask_m, start, stop,
                                B, BM, TRANS, IEEE, DV, G)
    else:
        for e in range(start, stop):   # one tile per step
            q = tl.load(other_ptr + e)
            if TRANS:
                t = tl.load(tidx_ptr + e)
            else:
                t = e
            if DESC_IN:
                a = in_ptr.load([mt * BM, q * B])
            else:
                a = tl.load((in_ptr + offs_m64 * stride_im)[:, None] + (q * B + offs_b)[None, :],
                            mask=mask_m[:, None], other=0.0)
            tb = tl.load(tbase_ptr + t)
            ts = tl.load(tstride_ptr + t)
            if TRANS:    # operand element [k, n] = S_t[k, n]
                w = tl.load(v_ptr + tb + offs_b[:, None] * ts + offs_b[None, :])
            else:        # operand element [k, n] = S_t[n, k]
                w = tl.load(v_ptr + tb + offs_b[:, None] + offs_b[None, :] * ts)
            acc = dot(a, w, acc, IEEE)
            if DV:   # this token block's share of d values of tile t: g[:, I]ᵀ x[:, J], summed in place
                part = dot(tl.trans(a), xb, None, IEEE)
                tl.atomic_add(dv_ptr + tb + offs_b[:, None] * ts + offs_b[None, :], part, sem="relaxed")
    if DESC_IO:
        out_ptr.store([mt * BM, p * B], acc.to(out_ptr.dtype))
    else:
        tl.store((out_ptr + offs_m64 * stride_om)[:, None] + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bsr_spmm_grouped(acc, in_ptr, stride_im, other_ptr, tidx_ptr, v_ptr, tbase_ptr, tstride_ptr,
                      xb, dv_ptr, offs_m64, mask_m, start, stop,
                      B: tl.constexpr, BM: tl.constexpr, TRANS: tl.constexpr,
                      IEEE: tl.constexpr, DV: tl.constexpr, G: tl.constexpr):
    """The tile walk of ``_bsr_spmm_kernel`` G tiles at a time. The G input blocks are
    loaded as one (BM, G, B) gather (contiguous along B) and laid side by side into a
    (BM, G·B) operand; the G value tiles stack into (G·B, B). One product then has
    reduction depth G·B instead of B (16 for 16x16 tiles, a single tensor-core step).
    Entries past the row's end load as zeros and are not written."""
    offs_b = tl.arange(0, B)
    offs_g = tl.arange(0, G)
    for e0 in range(start, stop, G):
        eg = e0 + offs_g
        live = eg < stop
        q = tl.load(other_ptr + eg, mask=live, other=0)
        if TRANS:
            t = tl.load(tidx_ptr + eg, mask=live, other=0)
        else:
            t = eg
        tb = tl.load(tbase_ptr + t, mask=live, other=0)[:, None, None]
        ts = tl.load(tstride_ptr + t, mask=live, other=0)[:, None, None]
        a3 = tl.load((in_ptr + offs_m64 * stride_im)[:, None, None]
                     + (q * B)[None, :, None] + offs_b[None, None, :],
                     mask=mask_m[:, None, None] & live[None, :, None], other=0.0)
        a = tl.reshape(a3, (BM, G * B))
        if TRANS:    # operand element [(g, k), n] = S_t[k, n]
            w3 = tl.load(v_ptr + tb + offs_b[None, :, None] * ts + offs_b[None, None, :],
                         mask=live[:, None, None], other=0.0)
        else:        # operand element [(g, k), n] = S_t[n, k]
            w3 = tl.load(v_ptr + tb + offs_b[None, :, None] + offs_b[None, None, :] * ts,
                         mask=live[:, None, None], other=0.0)
        w = tl.reshape(w3, (G * B, B))
        acc = dot(a, w, acc, IEEE)
        if DV:   # the G tiles' shares of d values: (G·B x BM) @ (BM x B), one product
            part = dot(tl.trans(a), xb, None, IEEE)
            part3 = tl.reshape(part, (G, B, B))
            tl.atomic_add(dv_ptr + tb + offs_b[None, :, None] * ts + offs_b[None, None, :], part3,
                          mask=live[:, None, None], sem="relaxed")
    return acc


@triton.jit
def _token_range(sp, CHUNK, M):
    """The tokens [m_lo, m_hi) of split ``sp`` of the d values kernels: CHUNK per split."""
    m_lo = sp * CHUNK
    return m_lo, tl.minimum(m_lo + CHUNK, M)


@triton.jit
def _token_step(m0, m_hi, BK: tl.constexpr):
    """The BK tokens from ``m0`` of a token range ending at ``m_hi``: (which are in range,
    their 64-bit row indices)."""
    offs_k = m0 + tl.arange(0, BK)
    return offs_k < m_hi, offs_k.to(tl.int64)


@triton.jit
def _bsr_sddmm_kernel(
    g_ptr, stride_gm,                      # g (M, out), features contiguous
    x_ptr, stride_xm,                      # x (M, in)
    ti_ptr, tj_ptr,                        # each tile's row and column (nt,)
    tbase_ptr, tstride_ptr,                # where tile t's entries are in values (CSR order)
    part_ptr,                              # (nsplit, nnz) float32, CSR order
    M, NNZ, CHUNK,
    B: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    t = tl.program_id(0)
    sp = tl.program_id(1)
    ti = tl.load(ti_ptr + t)
    tj = tl.load(tj_ptr + t)
    offs_b = tl.arange(0, B)
    acc = tl.zeros([B, B], dtype=tl.float32)
    m_lo, m_hi = _token_range(sp, CHUNK, M)
    for m0 in range(m_lo, m_hi, BK):
        mk, k64 = _token_step(m0, m_hi, BK)
        a = tl.load(g_ptr + k64[None, :] * stride_gm + (ti * B + offs_b)[:, None],
                    mask=mk[None, :], other=0.0)          # gᵀ tile (B, BK)
        w = tl.load(x_ptr + k64[:, None] * stride_xm + (tj * B + offs_b)[None, :],
                    mask=mk[:, None], other=0.0)          # x tile (BK, B)
        acc = dot(a, w, acc, IEEE)
    tb = tl.load(tbase_ptr + t)
    ts = tl.load(tstride_ptr + t)
    out = part_ptr + sp.to(tl.int64) * NNZ + tb
    tl.store(out + offs_b[:, None] * ts + offs_b[None, :], acc)


@triton.jit
def _bsr_sddmm_grouped_kernel(
    g_ptr, stride_gm, x_ptr, stride_xm,
    rptr_ptr, rcol_ptr,                    # tiles by row (CSR order: tile t is entry t)
    tbase_ptr, tstride_ptr, part_ptr,
    M, NNZ, CHUNK, MAXG,
    B: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, G: tl.constexpr,
):
    """``_bsr_sddmm_kernel`` for G tiles of one tile row I per program: g[:, I] is loaded
    once for all G, their x[:, J] blocks are gathered side by side, and one product
    x[:, J_1..J_G]ᵀ g[:, I] (G·B x B) holds the G tiles, transposed. Program p takes the
    (p mod MAXG)-th group of G tiles of tile row p / MAXG (none where the row has fewer)."""
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    ti = pid // MAXG
    lo = tl.load(rptr_ptr + ti)
    hi = tl.load(rptr_ptr + ti + 1)
    e0 = lo + (pid % MAXG) * G
    if e0 < hi:
        offs_b = tl.arange(0, B)
        eg = e0 + tl.arange(0, G)
        live = eg < hi
        q = tl.load(rcol_ptr + eg, mask=live, other=0)
        acc = tl.zeros([G * B, B], dtype=tl.float32)
        m_lo, m_hi = _token_range(sp, CHUNK, M)
        for m0 in range(m_lo, m_hi, BK):
            mk, k64 = _token_step(m0, m_hi, BK)
            w3 = tl.load((x_ptr + k64 * stride_xm)[:, None, None] + (q * B)[None, :, None]
                         + offs_b[None, None, :],
                         mask=mk[:, None, None] & live[None, :, None], other=0.0)   # (BK, G, B)
            w = tl.trans(tl.reshape(w3, (BK, G * B)))                               # (G·B, BK)
            a = tl.load((g_ptr + k64 * stride_gm)[:, None] + (ti * B + offs_b)[None, :],
                        mask=mk[:, None], other=0.0)                                # g tile (BK, B)
            acc = dot(w, a, acc, IEEE)
        acc3 = tl.reshape(acc, (G, B, B))      # [g, j, i]: tile g's entry (i, j)
        tb = tl.load(tbase_ptr + eg, mask=live, other=0)[:, None, None]
        ts = tl.load(tstride_ptr + eg, mask=live, other=0)[:, None, None]
        out = part_ptr + sp.to(tl.int64) * NNZ
        tl.store(out + tb + offs_b[None, None, :] * ts + offs_b[None, :, None], acc3,
                 mask=live[:, None, None])


# ----------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------
SPMM_CANDIDATES = [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 4), (128, 4, 4),
                   (128, 4, 5), (256, 8, 4), (256, 4, 3), (64, 2, 4),
                   # fewer stages or warps: 4-10% faster in one process on the H200 for the
                   # forward and dx with d values at 2048->5461 and for 16x16 tiles
                   # (benchmarks/README.md, "What was tried", the tile candidates)
                   (128, 4, 2), (128, 2, 3), (256, 2, 2),
                   # G = 2 or 4 tiles per step (the fourth entry; ``_bsr_spmm_grouped``): on
                   # the H200 the dx pass with d values for 16x16 tiles 0.680 -> 0.609 ms
                   # at 4096x4096 and 1.61 -> 1.21 ms at 4096->11008, and 18-48% off
                   # several passes at the 5461-wide MLP shapes; slower for 32x32 tiles at
                   # 4096 wide, where the one-tile walk stays (benchmarks/README.md)
                   (128, 4, 2, 4), (128, 4, 3, 2), (256, 4, 3, 4),
                   # "tma": the one-tile walk with its blocks moved by the TMA (Hopper; by
                   # pointer elsewhere, and for a tensor whose rows are not 16-byte aligned):
                   # on the H200 17-20% off the forward and dx of 32x32 tiles at 4096 wide
                   # (dx 0.357 -> 0.287 ms at 4096->11008), 5-15% at 2048 wide and for
                   # 16x16 tiles; about 30 us more host time per launch, which the timing
                   # of device time does not weigh (benchmarks/README.md)
                   (128, 4, 2, "tma"), (128, 4, 6, "tma"), (256, 4, 2, "tma"),
                   (256, 4, 6, "tma")]
SPMM_DEFAULT = (128, 4, 3)   # (BM, warps, stages[, G tiles per step (default 1) or "tma"])
SDDMM_CANDIDATES = [(64, 0, 4, 3), (128, 0, 4, 3), (128, 0, 8, 3), (64, 0, 4, 4), (256, 0, 8, 3),
                    (128, 0, 4, 4), (64, 0, 2, 4), (256, 0, 4, 3),
                    # 32-token steps on 2 warps, or a fixed number of token splits: 9-28%
                    # faster on the H200 at six of the eight benchmark problems (same section)
                    (32, 0, 2, 3), (64, 4, 4, 3), (128, 8, 4, 3),
                    # G = 4 or 2 tiles of a tile row per program (the fifth entry;
                    # ``_bsr_sddmm_grouped_kernel``): on the H200, 16x16 tiles 0.474 -> 0.352
                    # ms at 4096x4096 and 1.21 -> 0.823 at 4096->11008, 18-21% off at the
                    # 5461-wide shapes; slower for 32x32 tiles except at 5461->2048
                    (128, 8, 4, 3, 4), (128, 8, 4, 3, 2)]
SDDMM_DEFAULT = (64, 0, 4, 3)         # (BK, token splits (0: enough programs for the device), warps, stages[, G])


def spmm_candidates(device) -> list:
    """``SPMM_CANDIDATES`` less the "tma" walks where the device has no TMA (there they
    would run the pointer walk again under another name)."""
    return [c for c in SPMM_CANDIDATES if c[-1] != "tma" or has_tma(device)]


def _ieee(dtype) -> bool:
    return dtype == torch.float32 or interpreting()


def bsr_spmm(inp: torch.Tensor, lay: Layout, values: torch.Tensor, n_out: int, out: torch.Tensor,
             transposed: bool, base: Optional[torch.Tensor] = None, bias=None, scale: float = 1.0,
             config=None, x: Optional[torch.Tensor] = None,
             dv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out = scale·base + bias + inp · op(S)``: ``op(S) = Sᵀ`` (forward, tiles by row) or
    ``S`` (``transposed``: dx, tiles by column). ``values`` in CSR order, of inp's dtype.
    ``out`` may be ``base`` itself. ``dv`` (transposed only): a float32 (nnz,) buffer in CSR
    order to which the same pass adds ``inpᵀ x`` at the support (d values, with ``inp`` the
    incoming gradient and ``x`` the layer's input, M x n_out), from the blocks of the
    gradient it loads anyway; the order of the additions varies from run to run.
    ``config``: (BM tokens, warps, stages[, walk]), the walk G tiles per step or "tma" (one
    tile per step, each operand whose rows are 16-byte aligned moved by the TMA where the
    device has it, the others by pointer)."""
    if dv is not None and not transposed:
        raise ValueError("d values ride on the transposed product (dx) only")
    BM, warps, stages, *walk = config or SPMM_DEFAULT
    walk = walk[0] if walk else 1
    M = inp.shape[0]
    b = lay.b
    if transposed:   # dx[:, J] += g[:, I] · S_IJ
        ptr, other, tidx = lay.cptr, lay.crow, lay.cidx
    else:            # y[:, I] += x[:, J] · S_IJᵀ
        ptr, other, tidx = lay.rptr, lay.rcol, lay.rptr
    # "tma": the one-tile walk with its blocks moved by the TMA, each tensor that it can read
    # (else by pointer, as everywhere off Hopper)
    tma = walk == "tma" and M > 0 and n_out > 0 and has_tma(inp.device)
    in_d = _desc(inp, inp.shape[1], BM, b) if tma else None
    x_d = _desc(x, n_out, BM, b) if tma and dv is not None else None
    out_d = _desc(out, n_out, BM, b) if tma else None
    # in place (base is out, as the op calls it on aligned widths) one descriptor serves both
    base_d = out_d if base is None or base is out or out_d is None else _desc(base, n_out, BM, b)
    io = out_d is not None and base_d is not None
    base_arg = base if base is not None else out
    grid = (cdiv(n_out, b), cdiv(M, BM))
    _bsr_spmm_kernel[grid](
        in_d if in_d is not None else inp, inp.stride(0), ptr, other, tidx, values, lay.base,
        lay.stride, base_d if io else base_arg, base_arg.stride(0),
        bias if bias is not None else out, out_d if io else out, out.stride(0),
        x_d if x_d is not None else (x if dv is not None else inp),
        x.stride(0) if dv is not None else 0, dv if dv is not None else out,
        M, n_out, float(scale),
        B=b, BM=BM, TRANS=transposed, HAS_BASE=base is not None,
        HAS_BIAS=bias is not None, IEEE=_ieee(inp.dtype), DV=dv is not None,
        G=1 if walk == "tma" else walk, DESC_IN=in_d is not None, DESC_X=x_d is not None,
        DESC_IO=io, num_warps=warps, num_stages=stages)
    return out


def _desc(t: torch.Tensor, width: int, rows: int, cols: int):
    """A TMA descriptor of the first ``width`` columns of the 2-D tensor ``t``, in
    (rows, cols) blocks, or None where the TMA cannot address it (it needs unit column
    stride and a 16-byte aligned start and row stride)."""
    if (width <= 0 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16
            or t.data_ptr() % 16):
        return None
    return TensorDescriptor(t, [t.shape[0], width], [t.stride(0), 1], [rows, cols])


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of the gradient kernel's output (the tests replace it to poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _nsplit(M: int, nt: int, BK: int, splits: int, device) -> int:
    if splits:
        return splits
    want = 4 * sm_count(device)
    return max(1, min(cdiv(M, BK), cdiv(want, max(nt, 1))))


def bsr_sddmm(g: torch.Tensor, x: torch.Tensor, lay: Layout, config=None) -> torch.Tensor:
    """``gᵀ x`` at the support: float32 (nnz,), in the values' CSR order."""
    BK, splits, warps, stages, *grouped = config or SDDMM_DEFAULT
    G = grouped[0] if grouped else 1
    M = g.shape[0]
    b, nt = lay.b, lay.nt
    nnz = nt * b * b
    nsplit = _nsplit(M, cdiv(nt, G), BK, splits, g.device)
    chunk = cdiv(cdiv(max(M, 1), nsplit), BK) * BK
    nsplit = max(1, cdiv(M, chunk))
    part = _empty((nsplit, nnz), torch.float32, g.device)
    if G == 1:
        _bsr_sddmm_kernel[(nt, nsplit)](
            g, g.stride(0), x, x.stride(0), lay.ti, lay.tj, lay.base, lay.stride, part, M, nnz,
            chunk, B=b, BK=BK, IEEE=_ieee(g.dtype), num_warps=warps, num_stages=stages)
    elif nt:
        maxg = cdiv(lay.max_row, G)
        _bsr_sddmm_grouped_kernel[((lay.rptr.numel() - 1) * maxg, nsplit)](
            g, g.stride(0), x, x.stride(0), lay.rptr, lay.rcol, lay.base, lay.stride, part, M,
            nnz, chunk, maxg, B=b, BK=BK, IEEE=_ieee(g.dtype), G=G, num_warps=warps,
            num_stages=stages)
    return part[0] if nsplit == 1 else part.sum(0)


# ----------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------
def forward(x, A, B, values, crow, col, row, bias, scale, b: int, config=None, saved=None,
            lay: Optional[Layout] = None):
    """``saved``: a list that receives ``x Aᵀ`` for ``backward``; ``lay``: the support's
    layout where the caller has it (else looked up). Misaligned widths are padded for
    cuBLAS (``aligned``)."""
    in_features, out_features = A.shape[1], B.shape[0]
    in_p, out_p = aligned.widths(A, B, x.dtype)
    lay = lay or layout(crow, col, row, b, out_features, in_features)
    x2 = x.reshape(-1, in_features).contiguous()
    M = x2.shape[0]
    Ap, Bp = aligned.lowrank(A, B, x.dtype)
    t = aligned.pad_cols(x2, in_p) @ Ap.t()              # M x r' (zero columns past the rank)
    if saved is not None:
        saved.append(t)
    base = t @ Bp.t()                                     # cuBLAS, M x out_p; scaled in the epilogue
    if M == 0:
        return aligned.cols(base, out_features).reshape(*x.shape[:-1], out_features)
    inplace = out_p == out_features                      # the epilogue then runs in place on base
    y = base if inplace else _empty((M, out_features), x.dtype, x.device)
    vals = values.to(x.dtype)
    if config is None:   # time on a scratch output (in place: on a copy of base), then run once for real
        key = (bucket(M), out_features, in_features, lay.nt, b, x.dtype)
        scratch = lazily(lambda: base.clone() if inplace else torch.empty_like(y))

        def trial(c):
            out = scratch()
            return bsr_spmm(x2, lay, vals, out_features, out, False,
                            base=out if inplace else base, bias=bias, scale=scale, config=c)
        config = pick("bsr_spmm", key, spmm_candidates(x.device), trial, SPMM_DEFAULT)
    bsr_spmm(x2, lay, vals, out_features, y, False, base=base, bias=bias, scale=scale, config=config)
    return y.reshape(*x.shape[:-1], out_features)


# d values from the dx kernel's own loads of the gradient (``bsr_spmm(dv=...)``) instead of
# a kernel of their own, where that was the faster when timed (``_dv_path``); the separate
# kernel is kept where the additions must come in a fixed order
# (``torch.use_deterministic_algorithms``) and everywhere when this is False
FUSE_DV = True


def fuses_dv() -> bool:
    """Whether the fused d values may run (the timing in ``_dv_path`` then decides)."""
    return FUSE_DV and not torch.are_deterministic_algorithms_enabled()


def _trial_buffers(g2, in_features: int, vals):
    """A function that returns (dx-shaped output, float32 d values) for the timing trials,
    made on its first call only (``tuning.lazily``): once every choice is cached, no trial
    runs and nothing is allocated."""
    return lazily(lambda: (_empty((g2.shape[0], in_features), g2.dtype, g2.device),
                           torch.zeros(vals.shape, dtype=torch.float32, device=vals.device)))


def _dv_path(key, g2, x2, xk, lay, vals, in_features, cfg_td, cfg_t, cfg_d, scratch) -> str:
    """"fused" (d values inside the dx kernel) or "separate" (dx, then ``bsr_sddmm``),
    whichever ran faster for this problem, timed once with each side's own tiles. On the
    H200 (bf16, 16384 tokens, density 3%; the tuning log of
    ``benchmarks/results/sparse_lowrank.json``, run of 2026-11-29 02:13 UTC, with the
    TMA walk among the tiles) the fused kernel was the faster for 16x16 tiles at all four
    benchmark shapes (0.538 against 0.635 ms at 4096x4096, 1.16 against 1.52 at
    4096->11008) and for 32x32 tiles at 2048->5461 (0.198 against 0.284 ms) and 2048x2048
    (0.099 against 0.175 ms; level in the run of 00:59 UTC, 0.114 and 0.115), the separate
    pair for 32x32 tiles at 4096x4096 (0.253 against 0.289 ms), 4096->11008 (0.588 against
    0.701 ms) and, by a close call, 5461->2048 (0.320 against 0.328 ms). ``scratch``:
    ``_trial_buffers``."""
    def run(path):
        out, dv = scratch()
        if path == "fused":
            return bsr_spmm(g2, lay, vals, in_features, out, True, config=cfg_td, x=xk, dv=dv)
        bsr_spmm(g2, lay, vals, in_features, out, True, config=cfg_t)
        return bsr_sddmm(g2, x2, lay, config=cfg_d)
    return pick("bsr_dv_path", key, ("fused", "separate"), run, "fused")


def backward(grad, x, A, B, values, crow, col, row, scale, b: int, spmm_config=None,
             sddmm_config=None, saved=(), lay: Optional[Layout] = None, need=(True,) * 4):
    """``saved``: what ``forward`` put in its list (else ``x Aᵀ`` is recomputed).
    ``spmm_config``: tiles of the dx kernel (with or without d values); ``sddmm_config``:
    those of the separate d values kernel. Given tiles skip the timing: d values are then
    fused wherever ``fuses_dv``. ``need``: which of (dx, dA, dB, dvalues) to compute (None
    in the others' places): without dx, d values come from ``bsr_sddmm`` alone; without d
    values, the dx kernel runs unfused."""
    in_features, out_features = A.shape[1], B.shape[0]
    in_p, out_p = aligned.widths(A, B, x.dtype)
    lay = lay or layout(crow, col, row, b, out_features, in_features)
    g2 = aligned.pad_cols(grad.reshape(-1, out_features), out_p).contiguous()   # M x out_p
    # x is read for dA, dB and d values only (a frozen layer keeps a stand-in)
    x2 = aligned.pad_cols(x.reshape(-1, in_features), in_p).contiguous() if any(need[1:]) \
        else None                                                                 # M x in_p
    M = g2.shape[0]
    if M == 0:
        zeros = (torch.zeros_like(x), torch.zeros_like(A), torch.zeros_like(B),
                 torch.zeros_like(values))
        return tuple(z if n else None for z, n in zip(zeros, need))
    gBs, Ap, dA, dB = aligned.lowrank_grads(g2, x2, A, B, scale, saved[0] if saved else None,
                                            need=need)
    dA = None if dA is None else dA.to(A.dtype)
    dB = None if dB is None else dB.to(B.dtype)
    if not need[0]:   # d values alone, or nothing of the sparse part
        dv = bsr_sddmm(g2, x2, lay, config=sddmm_config or _sddmm_tiles(
            (bucket(M), in_features, out_features, lay.nt, b, x.dtype), g2, x2, lay)
        ).to(values.dtype) if need[3] else None
        return None, dA, dB, dv
    vals = values.to(x.dtype)
    # the fused kernel reads x's real columns only: it needs no padded copy
    xk = None
    if need[3]:
        xk = x2 if in_p == in_features else x.reshape(-1, in_features)
        xk = xk if xk.stride(-1) == 1 else xk.contiguous()
    key = (bucket(M), in_features, out_features, lay.nt, b, x.dtype)
    fuse = fuses_dv() and need[3]
    if not need[3]:   # dx alone: the unfused kernel, no d values
        if spmm_config is None:
            scratch = _trial_buffers(g2, in_features, vals)
            spmm_config = pick("bsr_spmm_t", key, spmm_candidates(g2.device),
                               lambda c: bsr_spmm(g2, lay, vals, in_features, scratch()[0],
                                                  True, config=c),
                               SPMM_DEFAULT)
        del x2
        base = gBs @ Ap
        dx = base if in_p == in_features else _empty((M, in_features), x.dtype, x.device)
        bsr_spmm(g2, lay, vals, in_features, dx, True, base=base, config=spmm_config)
        return dx.reshape(x.shape), dA, dB, None
    if spmm_config is None or (not fuse and sddmm_config is None):
        scratch = _trial_buffers(g2, in_features, vals)
        cfg_t, cfg_td, cfg_d = _tiles(key, g2, x2, xk, lay, vals, in_features, fuse, scratch)
        if fuse:
            fuse = _dv_path(key, g2, x2, xk, lay, vals, in_features, cfg_td, cfg_t, cfg_d,
                            scratch) == "fused"
        spmm_config = spmm_config or (cfg_td if fuse else cfg_t)
        sddmm_config = sddmm_config or cfg_d
    if not fuse:
        dv = bsr_sddmm(g2, x2, lay, config=sddmm_config).to(values.dtype)
    del x2   # the last read of x2: where x is misaligned, its padded copy goes before dx exists
    base = gBs @ Ap                                        # cuBLAS, M x in_p
    inplace = in_p == in_features                          # the sparse part then added in place
    dx = base if inplace else _empty((M, in_features), x.dtype, x.device)
    if fuse:
        dv32 = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
        bsr_spmm(g2, lay, vals, in_features, dx, True, base=base, config=spmm_config, x=xk, dv=dv32)
        dv = dv32.to(values.dtype)
    else:
        bsr_spmm(g2, lay, vals, in_features, dx, True, base=base, config=spmm_config)
    return dx.reshape(x.shape), dA, dB, dv


def _sddmm_tiles(key, g2, x2, lay):
    """The tiles of ``bsr_sddmm`` for this problem, as ``_tiles`` picks them."""
    return pick("bsr_sddmm", key, SDDMM_CANDIDATES, lambda c: bsr_sddmm(g2, x2, lay, config=c),
                SDDMM_DEFAULT)


def _tiles(key, g2, x2, xk, lay, vals, in_features, fuse, out):
    """(dx tiles, dx-with-d-values tiles or None, d values tiles), each timed once per
    problem (``tuning.pick``) on the scratch outputs of ``out`` (``_trial_buffers``)."""
    cands = spmm_candidates(g2.device)
    cfg_t = pick("bsr_spmm_t", key, cands,
                 lambda c: bsr_spmm(g2, lay, vals, in_features, out()[0], True, config=c),
                 SPMM_DEFAULT)
    cfg_td = pick("bsr_spmm_t_dv", key, cands,
                  lambda c: bsr_spmm(g2, lay, vals, in_features, out()[0], True, config=c, x=xk,
                                     dv=out()[1]),
                  SPMM_DEFAULT) if fuse else None
    return cfg_t, cfg_td, _sddmm_tiles(key, g2, x2, lay)
