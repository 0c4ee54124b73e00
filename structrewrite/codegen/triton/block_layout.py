"""Block-structured supports: detection and the tile lists, in plain torch.

A support made of whole, aligned ``b x b`` tiles of the out x in grid (``block: 16/32/64``
of the pass) is detected once per support and described by a ``Layout``: the tiles in
block-CSR and block-CSC order and where each tile's values sit in the element-CSR
``values``. The CUDA kernels (``sparse_lowrank_block.py``) and the CPU implementation
(``codegen/cpu/sparse_lowrank.py``) both read it. No Triton here.
"""
from __future__ import annotations

from typing import Optional

import torch

from structrewrite.codegen.triton.support_cache import cached

BLOCKS = (64, 32, 16)   # detection order: the largest tile that the support is made of


# ----------------------------------------------------------------------------------
# detection and layout (once per support)
# ----------------------------------------------------------------------------------
def block_size(crow: torch.Tensor, col: torch.Tensor, row: torch.Tensor, out_features: int,
               in_features: int) -> Optional[int]:
    """The tile size b if the support is exactly a union of whole aligned b x b tiles
    (the largest such b of 64, 32, 16), else None. Cached per support."""
    return cached("block_size", (crow, col, row), (out_features, in_features, col.device),
                  lambda: _detect(col, row, in_features))


def _detect(col, row, in_features) -> Optional[int]:
    nnz = col.numel()
    if nnz == 0:
        return None
    r64, c64 = row.long(), col.long()
    for b in BLOCKS:
        if nnz % (b * b):
            continue
        per_row = -(-in_features // b)
        tiles = torch.unique((r64 // b) * per_row + c64 // b)
        # entries are distinct positions: nnz = (touched tiles) · b² means every touched tile is full
        if tiles.numel() * b * b == nnz:
            return b
    return None


class Layout:
    """Block CSR and CSC lists of the tiles, and where each tile's values are.

    ``rptr`` (tile rows + 1), ``rcol``: tiles in (row, column) order, their index ``t``;
    ``cptr`` (tile columns + 1), ``crow``, ``cidx``: the same tiles by column, with their
    index ``t``; ``base``/``stride`` (nt,): tile ``t``'s entry ``(i, j)`` is
    ``values[base[t] + i·stride[t] + j]``; ``ti``/``tj``: each tile's row and column;
    ``max_row``: the most tiles in one tile row."""

    def __init__(self, crow, col, row, b: int, out_features: int, in_features: int):
        dev = col.device
        r64, c64 = row.long(), col.long()
        nbr, nbc = -(-out_features // b), -(-in_features // b)
        # each tile's entry (0, 0); CSR order sorts them by (tile row, tile column)
        base = torch.nonzero((r64 % b == 0) & (c64 % b == 0)).flatten()
        nt = base.numel()
        ti, tj = r64[base] // b, c64[base] // b
        per_row = torch.bincount(ti, minlength=nbr)
        rptr = torch.zeros(nbr + 1, dtype=torch.int64, device=dev)
        rptr[1:] = torch.cumsum(per_row, 0)
        stride = (rptr[ti + 1] - rptr[ti]) * b            # entries per row of the tile row
        order = torch.argsort(tj * nbr + ti)              # by (column, row)
        cptr = torch.zeros(nbc + 1, dtype=torch.int64, device=dev)
        cptr[1:] = torch.cumsum(torch.bincount(tj, minlength=nbc), 0)
        self.b, self.nt = b, nt
        self.max_row = int(per_row.max()) if nbr else 0   # most tiles in one tile row
        self.rptr, self.rcol = rptr.int(), tj.int()
        self.cptr, self.crow, self.cidx = cptr.int(), ti[order].int(), order.int()
        self.ti, self.tj = ti.int(), tj.int()
        self.base, self.stride = base.contiguous(), stride.int()


def layout(crow, col, row, b: int, out_features: int, in_features: int) -> Layout:
    return cached("block_layout", (crow, col, row), (b, out_features, in_features, col.device),
                  lambda: Layout(crow, col, row, b, out_features, in_features))
