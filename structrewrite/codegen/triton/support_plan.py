"""How a sparse support is computed, decided once per support (plain torch, no Triton).

Both the CUDA implementation (``sparse_lowrank.py``) and the CPU implementation
(``codegen/cpu/sparse_lowrank.py``) classify a support the same way: channel-wise
(every output row holds the same input channels: dense GEMMs at a widened rank), whole
b x b tiles (batched tile products), or element-wise (gather kernels on CUDA, CSR
products on the CPU). The ``Plan`` is cached on the support buffers, and so is
``csc_of``, the support's entries in column order (for the gather kernels' dx and the
folded path's column chunks). ``forward_keeping_xa`` runs either implementation's
forward for ``sparse_lowrank_linear_train`` and reads x Aᵀ out of what it kept.
"""
from __future__ import annotations

import torch

from structrewrite.codegen.triton import aligned, block_layout
from structrewrite.codegen.triton import sparse_lowrank_channel as channel
from structrewrite.codegen.triton.support_cache import cached


def contiguous(*tensors):
    """The kernels and the CSR products index values, bias and the support by position,
    as stored: strided views (a sliced ``values`` or ``sparse_col``, an expanded bias) are
    made contiguous (no copy where they are; None stays None)."""
    return [t.contiguous() if t is not None else None for t in tensors]


class Plan:
    """``kind`` is ``"channel"`` (``cols``: the shared input channels), ``"block"``
    (``layout``: the tile lists of ``block_layout``) or ``"gather"`` (element-wise).
    ``memo``: what an implementation derives from the support at a given shape (the
    folded path's chunk lists), kept with the plan so that a call looks the support up
    once; it lives and dies with the plan's cache entry."""
    __slots__ = ("kind", "cols", "layout", "memo")

    def __init__(self, kind: str, cols=None, layout=None):
        self.kind, self.cols, self.layout, self.memo = kind, cols, layout, {}


def plan(crow, col, row, out_features: int, in_features: int) -> Plan:
    """The support's ``Plan`` (cached on the buffers: one lookup per call). A support is
    checked (``check_support``) before its first plan is made: an eager layer checks the
    supports it did not build itself, but compiled and exported code calls the op with
    whatever the buffers hold, and a kernel would read past its operands on a bad index."""
    def build():
        from structrewrite.nn.sparse_lowrank import check_support
        try:
            check_support(crow, col, row, out_features, in_features)
        except ValueError as exc:
            raise ValueError(
                f"structrewrite::sparse_lowrank_linear: the sparse support is not valid "
                f"({exc}); a layer's support buffers are set by reset_parameters() or loaded "
                "whole from a state dict (to_empty() leaves them unset)") from None
        cols = channel.channel_columns(crow, col, out_features)
        if cols is not None:
            return Plan("channel", cols=cols)
        b = block_layout.block_size(crow, col, row, out_features, in_features)
        if b is not None:
            return Plan("block", layout=block_layout.layout(crow, col, row, b, out_features, in_features))
        return Plan("gather")
    return cached("plan", (crow, col, row), (out_features, in_features, col.device), build)


def csc_of(col: torch.Tensor, row: torch.Tensor, in_features: int):
    """(col_ptr (in+1), row of each entry, perm into values, column of each entry), all
    int32, for the support given in CSR order: the same entries sorted by column, then
    row. Made once per support (``support_cache``)."""
    def build():
        colv = col.long()
        perm = torch.sort(colv, stable=True).indices        # rows stay ascending inside a column
        counts = torch.bincount(colv, minlength=in_features)
        ptr = torch.zeros(in_features + 1, dtype=torch.int32, device=col.device)
        ptr[1:] = torch.cumsum(counts, 0)
        return ptr, row[perm].contiguous(), perm.int(), col[perm].contiguous()
    return cached("csc", (col, row), (in_features, col.device), build)


def forward_keeping_xa(forward, x, A, B, values, crow, col, row, bias, scale):
    """(y, x Aᵀ) for ``sparse_lowrank_linear_train``: ``forward`` (an implementation's, with
    a ``saved`` list argument) and x Aᵀ out of what it kept for its backward."""
    saved: list = []
    y = forward(x, A, B, values, crow, col, row, bias, scale, saved=saved)
    return y, kept_xa(saved, x, A)


def kept_xa(saved: list, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """x Aᵀ, shaped (..., rank), from what an implementation's forward kept for its
    backward in ``saved`` (``sparse_lowrank_linear_train``): ``[x Aᵀ]`` (gather and tile
    paths), ``[x, x A'ᵀ, A', W']`` (channel path: A's rows come first in A'), or nothing
    (folded path, the reference: computed here)."""
    r = A.shape[0]
    if len(saved) == 1:   # x A'ᵀ, wider than r where the rank is padded (``aligned.lowrank``)
        t = aligned.cols(saved[0], r)
    elif saved:
        t = aligned.cols(saved[1], r)
    else:
        t = x.reshape(-1, A.shape[1]) @ A.t()
    return t.reshape(*x.shape[:-1], r)
