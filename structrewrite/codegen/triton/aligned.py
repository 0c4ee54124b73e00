"""Aligned leading dimensions for the cuBLAS GEMMs of the CUDA implementations.

cuBLAS runs its fast kernels only when every matrix's leading dimension is a multiple of
16 bytes. A layer with a width that is not (LLaMA-1B's MLP: 5461 features, 10922 bytes a
row in bf16) makes every GEMM that reads or writes a tokens x 5461 matrix fall back to
slow kernels: on the H200, dense ``F.linear`` fwd+bwd at 16384 x 2048 -> 5461 took 8.8
ms in eager mode, 2.0 ms with its rows padded by hand and 1.9 ms under Inductor, which
pads (``benchmarks/results/sparse_lowrank.md``). The implementations here pad the same way:

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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from structrewrite.codegen.triton.support_cache import outside_graph_pools

ALIGN_BYTES = 16


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
                  scale: float, xA: "torch.Tensor | None" = None):
    """The low-rank part of the backward on padded operands: (g B'·s, A', dA, dB).

    ``ga``, ``xa``: the incoming gradient and the input, 2-D, with widths padded as by
    ``widths``; ``xA``: x Aᵀ kept from the forward, at the rank's width or padded (else
    computed from ``xa``). ``g B'·s`` (M x r', scale folded in) and A' are what the sparse
    dx kernels take as their dense part (``dx = (g B'·s) A' + g S``). dA (r x in) and dB
    (out x r) come back at the real sizes, contiguous."""
    (r, in_features), out_features = A.shape, B.shape[0]
    Ap, Bp = lowrank(A, B, xa.dtype)
    gBs = mm(ga, Bp, scale)                               # M x r'
    dA = cols((gBs.t() @ xa)[:r], in_features)
    xA = xa @ Ap.t() if xA is None else pad_cols(xA, Ap.shape[0])
    dB = cols(mm(ga.t(), xA, scale)[:out_features], r)
    return gBs, Ap, dA, dB


def pad_cols(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` (..., k) with zero columns appended up to ``n`` (``t`` itself when k == n)."""
    k = t.shape[-1]
    return t if k == n else F.pad(t, (0, n - k))


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
    return t if t.shape[-1] == n else t[..., :n].contiguous()
