"""Channel-structured supports of ``structrewrite::sparse_lowrank_linear``: dense GEMMs only.

When every output row of ``S`` holds the same k input channels (LOST's channel-wise
sparse component, ``init: lost``), ``x Sᵀ = x[:, cols] Vᵀ`` with ``V = values.view(out, k)``
(values are stored row by row, columns ascending). The op then folds the sparse part
into the low-rank GEMMs by widening the rank from r to r + k:

    t  = [x Aᵀ, x[:, cols]]            M x (r+k)   (one GEMM and a k-column gather)
    W' = [s·B, V]                      out x (r+k) (never out x in)
    y  = t W'ᵀ + bias

and the backward, with ``dt = g W'``:

    dA = dt[:, :r]ᵀ x          dx = dt[:, :r] A, plus dt[:, r:] added at the columns
    dB = s · gᵀ t[:, :r]       d values = (gᵀ x[:, cols]).flatten()

so the whole op runs on the tensor cores (cuBLAS) at the FLOPs of a rank-(r+k) layer,
with no gathers over the support. Unstructured supports (SLTrain's random support) keep
the Triton gather/SDDMM kernels of ``sparse_lowrank.py``; the CUDA implementation picks
per support, once, with the detection below cached on the support buffers.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

_CACHE: dict = {}
_CACHE_MAX = 1024


def channel_columns(crow: torch.Tensor, col: torch.Tensor, out_features: int) -> Optional[torch.Tensor]:
    """The k shared input channels (int64) if every row of the support holds exactly the
    same columns, else None. Cached on the identity and version of the buffers."""
    key = (crow.data_ptr(), col.data_ptr(), crow._version, col._version, col.numel(),
           out_features, col.device)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is crow and hit[1]() is col:
        return hit[2]
    cols = _detect(crow, col, out_features)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (weakref.ref(crow), weakref.ref(col), cols)
    return cols


def _detect(crow, col, out_features) -> Optional[torch.Tensor]:
    nnz = col.numel()
    if out_features == 0 or nnz == 0 or nnz % out_features:
        return None
    k = nnz // out_features
    expected = torch.arange(out_features + 1, device=crow.device, dtype=crow.dtype) * k
    if not torch.equal(crow, expected):
        return None
    grid = col.view(out_features, k)
    if not bool((grid == grid[:1]).all()):
        return None
    return grid[0].long().contiguous()


def forward(x, A, B, values, cols, bias, scale):
    in_features, out_features, r = A.shape[1], B.shape[0], A.shape[0]
    x2 = x.reshape(-1, in_features)
    t = torch.cat([x2 @ A.t(), x2.index_select(1, cols)], dim=1)
    w = torch.cat([B * scale, values.view(out_features, -1)], dim=1)
    y = torch.addmm(bias, t, w.t()) if bias is not None else t @ w.t()
    return y.reshape(*x.shape[:-1], out_features)


def backward(grad, x, A, B, values, cols, scale):
    in_features, out_features, r = A.shape[1], B.shape[0], A.shape[0]
    g2 = grad.reshape(-1, out_features)
    x2 = x.reshape(-1, in_features)
    w = torch.cat([B * scale, values.view(out_features, -1)], dim=1)
    dt = g2 @ w                                           # M x (r+k)
    dA = dt[:, :r].t() @ x2
    dx = dt[:, :r] @ A
    dx.index_add_(1, cols, dt[:, r:])
    t = torch.cat([x2 @ A.t(), x2.index_select(1, cols)], dim=1)
    dw = g2.t() @ t                                       # out x (r+k)
    dB = dw[:, :r] * scale
    dv = dw[:, r:].reshape(-1)
    return dx.reshape(x.shape), dA.to(A.dtype), dB.to(B.dtype), dv.to(values.dtype)
