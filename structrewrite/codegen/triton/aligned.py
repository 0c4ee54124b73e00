"""Aligned leading dimensions for the cuBLAS GEMMs of the CUDA implementations.

cuBLAS runs its fast kernels only when every matrix's leading dimension is a multiple of
16 bytes. A layer with a width that is not (LLaMA-1B's MLP: 5461 features, 10922 bytes a
row in bf16) makes every GEMM that reads or writes a tokens x 5461 matrix fall back to
slow kernels: on the H200, dense ``F.linear`` fwd+bwd at 16384 x 2048 -> 5461 took 8.8-8.9
ms in eager mode, 1.77-2.0 ms with its rows padded by hand and 1.8-1.9 ms under Inductor,
which pads (``benchmarks/results/sparse_lowrank.md`` and earlier runs). The implementations here pad the same way:

* an operand whose rows are misaligned is copied once into a zero-padded buffer
  (``pad_cols``; tokens x width, one read and one write of the matrix);
* a product whose output would be misaligned is computed into a padded buffer, which
  the sparse epilogue kernels read as their ``base`` while writing the real, contiguous
  output (no extra pass), or which is sliced into a contiguous copy where no epilogue
  follows;
* the small weight operands are padded per call (rank x width), and so is the rank
  itself where it is misaligned (``lowrank``): A gains zero rows and B zero columns, so
  the tokens x rank products (x Aᵀ, g B) have aligned rows too. At 16384 x 5461 -> 2048,
  rank 1365 (in/4), the six low-rank GEMMs of a fwd+bwd took 8.8 ms on the H200
  unpadded and 1.9 ms padded to 1368 (``benchmarks/results/sparse_lowrank_mlp.md``).

Zero padding keeps every sum exact: the extra columns of one operand meet zero columns
of the other. Nothing is padded when the widths are aligned.

The copies themselves (``pad_cols``, and ``cols`` where it slices) run as one Triton
kernel, ``copy_cols``, for tokens-sized matrices. ATen's ``F.pad`` fills the whole
output and then copies through its generic strided kernel. Timed on the H200
(``triton.testing.do_bench``, 16384 x 5461 bf16 padded to 5464 columns and back):
``F.pad`` 261 us, ``copy_cols`` 116 us; the slice as ``t[:, :n].contiguous()`` 205 us,
``copy_cols`` 139 us; a contiguous copy of the same bytes 88 us. The kernel writes each
output element once, and reads or writes 16-byte vectors on the side whose rows are
aligned. Where autograd records the call (the eager channel-wise path, the benchmarks'
padded peers), the backward of a pad is the slice and that of a slice the pad, both
through the same kernel. Launching it from Python costs more host time than ATen's call;
a layer whose eager calls are bound by the host can keep ATen's copies with
``STRUCTREWRITE_PAD_KERNEL=0`` (or ``copies_by(kernel=False)``).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from structrewrite.codegen.triton.support_cache import outside_graph_pools

try:
    import triton
    import triton.language as tl
except ImportError:   # Triton is optional: the CPU implementation reads this module too
    triton = None
else:
    from structrewrite.codegen.triton.tuning import cdiv, interpreting, next_power_of_2

ALIGN_BYTES = 16
# matrices with fewer elements are copied by ATen (no Triton launch: host time matters more)
KERNEL_MIN_ELEMENTS = 1 << 20
# whether pads and slices of large matrices go through ``copy_cols`` at all
KERNEL_COPIES = os.environ.get("STRUCTREWRITE_PAD_KERNEL", "1") != "0"


@contextlib.contextmanager
def copies_by(kernel: bool):
    """Within the block, pads and slices go through ``copy_cols`` (``kernel=True``) or
    ATen's ``F.pad`` and slice (``False``). Process-wide, like the environment variable;
    a backward run after the block uses the setting of its own time."""
    global KERNEL_COPIES
    before, KERNEL_COPIES = KERNEL_COPIES, kernel
    try:
        yield
    finally:
        KERNEL_COPIES = before


def width(n: int, dtype: torch.dtype) -> int:
    """``n`` rounded up so that ``n`` elements of ``dtype`` fill whole 16-byte units."""
    per = max(1, ALIGN_BYTES // dtype.itemsize)
    return -(-n // per) * per


def widths(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> tuple[int, int]:
    """(in, out) of a layer with ``A`` (r x in) and ``B`` (out x r), each rounded up by ``width``."""
    return width(A.shape[1], dtype), width(B.shape[0], dtype)


def lowrank(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B'): ``A`` (r x in) and ``B`` (out x r) with zeros appended so that the rank,
    in and out are all ``width`` multiples: A' is r' x in', B' is out' x r'. Products
    through them equal those through A and B on the real rows and columns, and are zero
    on the padding (x A'ᵀ has zero columns r:r', g B' too). Nothing is copied where the
    sizes are aligned already."""
    (r, in_features), out_features = A.shape, B.shape[0]
    r_p, (in_p, out_p) = width(r, dtype), widths(A, B, dtype)
    Ap = A if (r_p, in_p) == (r, in_features) else F.pad(A, (0, in_p - in_features, 0, r_p - r))
    Bp = B if (out_p, r_p) == (out_features, r) else F.pad(B, (0, r_p - r, 0, out_p - out_features))
    return Ap, Bp


def lowrank_grads(ga: torch.Tensor, xa: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  scale: float, xA: "torch.Tensor | None" = None, need=(True,) * 4):
    """The low-rank part of the backward on padded operands: (g B'·s, A', dA, dB).

    ``ga``, ``xa``: the incoming gradient and the input, 2-D, with widths padded as by
    ``widths``; ``xA``: x Aᵀ kept from the forward, at the rank's width or padded (else
    computed from ``xa``). ``g B'·s`` (M x r', scale folded in) and A' are what the sparse
    dx kernels take as their dense part (``dx = (g B'·s) A' + g S``). dA (r x in) and dB
    (out x r) come back at the real sizes, contiguous. ``need``: the backward's (dx, dA,
    dB, dvalues); g B'·s is formed for dx or dA, each of dA and dB where needed (None
    otherwise)."""
    (r, in_features), out_features = A.shape, B.shape[0]
    Ap, Bp = lowrank(A, B, ga.dtype)   # xa: None where neither dA nor dB reads it
    gBs = mm(ga, Bp, scale) if need[0] or need[1] else None   # M x r'
    dA = cols((gBs.t() @ xa)[:r], in_features) if need[1] else None
    dB = None
    if need[2]:
        xA = xa @ Ap.t() if xA is None else pad_cols(xA, Ap.shape[0])
        dB = cols(mm(ga.t(), xA, scale)[:out_features], r)
    return gBs, Ap, dA, dB


if triton is not None:
    @triton.jit
    def _copy_cols_kernel(src_ptr, dst_ptr, R, K, N, stride_s, stride_d,
                          K_MULT: tl.constexpr, N_MULT: tl.constexpr, SS_MULT: tl.constexpr,
                          SD_MULT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        """dst[r, c] = src[r, c] for c < K, 0 for K <= c < N (r < R, c < N). Each of K, N and
        the two row strides arrives divided by its ``*_MULT`` (16 bytes in elements where it
        is a multiple, else 1), so that the compiler knows the aligned side's rows and
        masks come in whole 16-byte vectors."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        offs = tl.program_id(1) * BC + tl.arange(0, BC)
        live = (rows < R)[:, None]
        r64 = rows.to(tl.int64)[:, None]
        v = tl.load(src_ptr + r64 * (stride_s * SS_MULT) + offs[None, :],
                    mask=live & (offs < K * K_MULT)[None, :], other=0.0)
        tl.store(dst_ptr + r64 * (stride_d * SD_MULT) + offs[None, :], v,
                 mask=live & (offs < N * N_MULT)[None, :])


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of ``copy_cols``' output (the tests replace it to poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _split(v: int, per: int) -> tuple[int, int]:
    """(v / m, m) with m = ``per`` where ``per`` divides v, else 1."""
    return (v // per, per) if v % per == 0 else (v, 1)


def copy_cols(t: torch.Tensor, n: int) -> torch.Tensor:
    """A new contiguous (..., n) matrix holding ``t``'s first min(k, n) columns and zeros
    after them: the pad (k < n) and the slice (k > n) in one kernel. ``t``'s last
    dimension must have unit stride (leading dimensions that do not flatten to one are
    copied by ``reshape`` first)."""
    k = t.shape[-1]
    t2 = t.reshape(-1, k)
    R = t2.shape[0]
    out = _empty((R, n), t.dtype, t.device)
    if R and n:
        per = max(1, ALIGN_BYTES // t.element_size())
        # a slice reads whole source rows (aligned where the source is) and stores n columns
        (kk, km), (nn_, nm) = _split(k, per), _split(n, per)
        (ss, sm), (sd, dm) = _split(t2.stride(0), per), _split(out.stride(0), per)
        BC = 512 if n >= 512 else next_power_of_2(n)
        BR = max(1, 4096 // BC)
        _copy_cols_kernel[(cdiv(R, BR), cdiv(n, BC))](
            t2, out, R, kk, nn_, ss, sd, K_MULT=km, N_MULT=nm, SS_MULT=sm, SD_MULT=dm,
            BR=BR, BC=BC, num_warps=4)
    return out.reshape(*t.shape[:-1], n)


class _CopyCols(torch.autograd.Function):
    """``copy_cols`` under autograd: the gradient of a pad is its slice and back."""

    @staticmethod
    def forward(ctx, t, n):
        ctx.k = t.shape[-1]
        return copy_cols(t, n)

    @staticmethod
    def backward(ctx, grad):   # through the Function again: differentiable twice
        return _copy(grad.contiguous(), ctx.k), None


def _kernel_copies(t: torch.Tensor) -> bool:
    """Whether ``copy_cols`` does this copy: where Triton is installed, unless switched
    off (``KERNEL_COPIES``), plain tensors (not traced) with unit stride
    along the row, CUDA tensors of at least ``KERNEL_MIN_ELEMENTS`` elements, or any
    size under Triton's CPU interpreter (where the tests run the kernel)."""
    if not KERNEL_COPIES or triton is None or type(t) not in (torch.Tensor, torch.nn.Parameter) \
            or torch.compiler.is_compiling():
        return False
    if t.dim() < 1 or t.stride(-1) != 1 or t.numel() == 0:
        return False
    return interpreting() or (t.is_cuda and t.numel() >= KERNEL_MIN_ELEMENTS)


def _copy(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.requires_grad and torch.is_grad_enabled():
        return _CopyCols.apply(t, n)
    return copy_cols(t, n)


def pad_cols(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` (..., k) with zero columns appended up to ``n`` (``t`` itself when k == n)."""
    k = t.shape[-1]
    if k == n:
        return t
    return _copy(t, n) if _kernel_copies(t) else F.pad(t, (0, n - k))


def pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` (k, c) with zero rows appended up to ``n`` (``t`` itself when k == n)."""
    k = t.shape[0]
    return t if k == n else F.pad(t, (0, 0, 0, n - k))


_ZEROS: dict = {}


def mm(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, out=None) -> torch.Tensor:
    """``alpha · (a @ b)`` in one cuBLAS call: the scale is applied to the float32 sum in
    the GEMM's epilogue (``addmm`` with ``beta = 0``, which reads no input), so a scaled
    product costs no extra pass over its output and is rounded once. ``out``: written in
    place (a slice with unit column stride is fine)."""
    if alpha == 1.0:
        return torch.mm(a, b, out=out)
    key = (a.dtype, a.device)
    zero = _ZEROS.get(key)
    if zero is None:   # kept for good: made outside CUDA-graph pools
        zero = _ZEROS[key] = outside_graph_pools(
            a.device, lambda: torch.zeros((), dtype=a.dtype, device=a.device))
    return torch.addmm(zero, a, b, beta=0, alpha=alpha, out=out)


def cols(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` columns of a padded result, contiguous (``t`` itself when unpadded)."""
    if t.shape[-1] == n:
        return t
    return _copy(t, n) if _kernel_copies(t) else t[..., :n].contiguous()
