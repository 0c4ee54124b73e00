"""CPU implementation of ``structrewrite::sparse_lowrank_linear`` (forward and backward).

The low-rank part is two GEMMs each way. The sparse part takes one of four paths,
decided once per support as on CUDA (``codegen/triton/support_plan.py``, cached on the
buffers):

* **Element-wise support, float32/float64, dense enough** (``_folds``): the folded path
  of ``codegen/triton/sparse_lowrank_folded.py`` (plain torch): W = s·B A + S built a
  chunk of rows (or columns) at a time and multiplied with dense GEMMs, where its cost
  model says that beats the CSR products.
* **Element-wise support** otherwise (SLTrain's random one): ``S`` becomes a
  ``torch.sparse_csr_tensor`` over the layer's own buffers and values (no copy: ``crow``,
  ``col`` and ``values`` are already CSR), and the three products run on PyTorch's CSR
  kernels (MKL where PyTorch has it):

      y       = s·(x Aᵀ) Bᵀ + bias + (S xᵀ)ᵀ      sparse x dense
      dx      = s·(g B) A + g S                    dense x sparse
      dvalues = (gᵀ x) at the support             ``torch.sparse.sampled_addmm``

* **Whole b x b tiles** (``block: 16/32/64``; detected and laid out by
  ``codegen/triton/block_layout.py``, plain torch): each product is a batched GEMM over
  the tiles. The b-wide column blocks of x (or g) that the tiles read are gathered, in
  token chunks of at most ``_TILE_CHUNK`` elements, multiplied with every tile at once
  (``bmm``) and added into the output's blocks (``index_add_``); the tiles' gradients
  are ``g[:, I]ᵀ x[:, J]``, accumulated over the chunks.
* **Channel-wise support** (LOST, ``init: lost``: every row holds the same k input
  channels): folded into the low-rank GEMMs at rank r + k, as on CUDA
  (``codegen/triton/sparse_lowrank_channel.py``, plain torch).

None of them forms an out x in matrix of more than 2^23 elements (the folded path holds
chunks of at most 2^23 elements; a smaller layer's W is one chunk) or a tokens x nnz
gather (the reference's chunked gathers do the latter, in bounded chunks). Sums
accumulate as in the reference: in the input dtype for float32/float64, in float32 for
bf16/fp16 (the sparse products run on float32 copies of their operands, the low-rank
GEMMs in the input dtype, rounded once; the channel path rounds like the CUDA one).
Mixed dtypes go to the reference.

Measured fwd+bwd on 2 CPU threads (``benchmarks/results/sparse_lowrank_cpu.md``, float32,
rank in/4, density 0.03, 2048 tokens, 1024 -> 2752): dense ``nn.Linear`` 112 ms; random
support 132 ms folded, 138 ms on the CSR products (the reference: 3.6 s); 32x32 tiles
82 ms; channel-wise 59 ms.
"""
from __future__ import annotations

import warnings

import torch

from structrewrite.codegen.triton import sparse_lowrank_channel as channel   # plain torch, no Triton
from structrewrite.codegen.triton import sparse_lowrank_folded as folded     # plain torch, no Triton
from structrewrite.codegen.triton.support_cache import cached
from structrewrite.codegen.triton.support_plan import contiguous, forward_keeping_xa, plan  # plain torch
from structrewrite.ops import sparse_lowrank_linear as ref

OP = "structrewrite::sparse_lowrank_linear"
OP_BACKWARD = "structrewrite::sparse_lowrank_linear_backward"
OP_TRAIN = "structrewrite::sparse_lowrank_linear_train"
OP_BACKWARD_TRAIN = "structrewrite::sparse_lowrank_linear_backward_train"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# torch.sparse_csr_tensor warns once per process that CSR support is in beta; this module
# uses the CSR products that PyTorch has shipped since 1.13 (matmul, sampled_addmm)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta",
                        category=UserWarning)


def _covered(*tensors) -> bool:
    dtype = tensors[0].dtype
    return dtype in DTYPES and all(t is None or t.dtype == dtype for t in tensors)


def _csr(values, crow, col, out_features, in_features) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, (out_features, in_features),
                                   check_invariants=False)


# Upper bound on the elements of one gathered (tokens x tiles x b) block of the tile
# path: the reference's bound on its gathered temporaries.
_TILE_CHUNK = ref._CHUNK_ELEMS


def _tile_index(lay) -> torch.Tensor:
    """(nt, b, b): where each tile's entries sit in ``values`` (made once per support)."""
    def build():
        d = torch.arange(lay.b, device=lay.base.device)
        return (lay.base.view(-1, 1, 1) + d.view(1, -1, 1) * lay.stride.long().view(-1, 1, 1)
                + d.view(1, 1, -1))
    return cached("cpu_tile_index", (lay.base,), (lay.b,), build)


def _tile_view(t: torch.Tensor, b: int) -> torch.Tensor:
    """(M, n) -> (M, n // b, b): the whole b-wide column blocks, a view."""
    return t[:, : t.shape[1] // b * b].unflatten(1, (-1, b))


def _token_step(M: int, lay) -> int:
    return max(1, min(M, _TILE_CHUNK // max(1, lay.nt * lay.b)))


def _tiles_forward(y, x2, V, lay):
    """``y += x Sᵀ`` tile by tile: the x column blocks of every tile gathered (tokens in
    bounded chunks), one batched GEMM with the tiles, added into y's row blocks."""
    xin, yout = _tile_view(x2, lay.b), _tile_view(y, lay.b)
    ti, tj = lay.ti.long(), lay.tj.long()
    step = _token_step(x2.shape[0], lay)
    for m in range(0, x2.shape[0], step):
        xg = xin[m:m + step].index_select(1, tj).transpose(0, 1)       # nt x tokens x b
        yout[m:m + step].index_add_(1, ti, torch.bmm(xg, V.transpose(1, 2)).transpose(0, 1))


def _tiles_backward(dx, g2, x2, V, lay, want_dv=True):
    """``dx += g S`` (where ``dx`` is given) and the tiles' gradients
    ``g[:, I]ᵀ x[:, J]`` (nt x b x b; where ``want_dv``), sharing the gathered blocks of g."""
    gin = _tile_view(g2, lay.b)
    xin = _tile_view(x2, lay.b) if want_dv else None
    dxout = _tile_view(dx, lay.b) if dx is not None else None
    ti, tj = lay.ti.long(), lay.tj.long()
    dV = torch.zeros_like(V) if want_dv else None
    step = _token_step(g2.shape[0], lay)
    for m in range(0, g2.shape[0], step):
        gg = gin[m:m + step].index_select(1, ti).transpose(0, 1)       # nt x tokens x b
        if dxout is not None:
            dxout[m:m + step].index_add_(1, tj, torch.bmm(gg, V).transpose(0, 1))
        if want_dv:
            xg = xin[m:m + step].index_select(1, tj).transpose(0, 1)
            dV.baddbmm_(gg.transpose(1, 2), xg)
    return dV


def _folds(how, x, A, B, values) -> bool:
    """An element-wise float32/float64 support dense enough for the folded path
    (``sparse_lowrank_folded.pays``, with the CPU's measured rate)."""
    return (how.kind == "gather" and x.dtype in (torch.float32, torch.float64)
            and folded.folds(x, A, B, values, "cpu"))


def forward(x, A, B, values, crow, col, row, bias, scale, saved=None):
    """``saved``: a list that receives what the backward can reuse (``support_plan.kept_xa``)."""
    values, crow, col, row, bias = contiguous(values, crow, col, row, bias)
    if not _covered(x, A, B, values, bias):
        return ref.reference(x, A, B, values, crow, col, row, bias, scale)
    in_features, out_features = A.shape[1], B.shape[0]
    how = plan(crow, col, row, out_features, in_features)
    if how.kind == "channel":   # dense GEMMs at rank r + k, no CSR product
        return channel.forward(x, A, B, values, how.cols, bias, scale, saved=saved)
    if _folds(how, x, A, B, values):   # W a chunk at a time, dense GEMMs
        return folded.forward(x, A, B, values, crow, col, row, bias, scale, memo=how.memo)
    acc = ref._acc(x)
    x2 = x.reshape(-1, in_features)
    t = x2 @ A.t()
    if saved is not None:
        saved.append(t)
    if bias is not None and acc == x.dtype:
        y = torch.addmm(bias, t, B.t(), alpha=scale)
    else:   # half types: the low-rank product rounded once, then sums in float32
        y = (t @ B.t()).to(acc).mul_(scale)
        if bias is not None:
            y += bias.to(acc)
    if values.numel() and x2.shape[0]:
        if how.kind == "block":   # whole b x b tiles: batched dense GEMMs
            _tiles_forward(y, x2.to(acc), values.to(acc)[_tile_index(how.layout)], how.layout)
        else:
            S = _csr(values.to(acc), crow, col, out_features, in_features)
            y += (S @ x2.to(acc).t()).t()
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def backward(grad, x, A, B, values, crow, col, row, scale, xa=None, need=ref.ALL):
    """``xa``: x Aᵀ from the forward (``sparse_lowrank_linear_train``), else recomputed.
    ``need``: which of (dx, dA, dB, dvalues) to compute (None in the others' places)."""
    values, crow, col, row = contiguous(values, crow, col, row)
    if not _covered(grad, x, A, B, values) or (xa is not None and xa.dtype != x.dtype):
        return ref.reference_backward(grad, x, A, B, values, crow, col, row, scale, xa=xa,
                                      need=need)
    in_features, out_features = A.shape[1], B.shape[0]
    xa = None if xa is None else xa.reshape(-1, A.shape[0])
    how = plan(crow, col, row, out_features, in_features)
    if how.kind == "channel":
        return channel.backward(grad, x, A, B, values, how.cols, scale, xa=xa, need=need)
    if _folds(how, x, A, B, values):
        return folded.backward(grad, x, A, B, values, crow, col, row, scale, memo=how.memo,
                               need=need)
    acc = ref._acc(x)
    g2 = grad.reshape(-1, out_features)
    x2 = x.reshape(-1, in_features)
    dx = dA = dB = dv = None
    if need[0] or need[1]:
        gB = g2 @ B
    if need[0]:
        dx = (gB @ A).to(acc).mul_(scale)
    if need[1]:
        dA = (gB.t() @ x2).to(acc).mul_(scale).to(A.dtype)
    if need[2]:
        dB = (g2.t() @ (x2 @ A.t() if xa is None else xa)).to(acc).mul_(scale).to(B.dtype)
    sparse = values.numel() and x2.shape[0]
    if sparse and how.kind == "block" and (need[0] or need[3]):
        index = _tile_index(how.layout)
        dV = _tiles_backward(dx, g2.to(acc), x2.to(acc) if need[3] else None,
                             values.to(acc)[index], how.layout, want_dv=need[3])
        if need[3]:
            dv = values.new_empty(values.shape, dtype=acc)
            dv[index.flatten()] = dV.flatten()
    elif sparse and (need[0] or need[3]):
        S = _csr(values.to(acc), crow, col, out_features, in_features)
        ga = g2.to(acc)
        if need[0]:
            dx += ga @ S
        if need[3]:
            dv = torch.sparse.sampled_addmm(S, ga.t(), x2.to(acc), beta=0.0).values()
    elif need[3]:
        dv = torch.zeros_like(values)
    return (None if dx is None else dx.to(x.dtype).reshape(x.shape), dA, dB,
            None if dv is None else dv.to(values.dtype))


def forward_train(x, A, B, values, crow, col, row, bias, scale):
    """``sparse_lowrank_linear_train``: (y, x Aᵀ), x Aᵀ taken from the forward's own work."""
    return forward_keeping_xa(forward, x, A, B, values, crow, col, row, bias, scale)


def backward_train(grad, x, xa, A, B, values, crow, col, row, scale, need=ref.ALL):
    return backward(grad, x, A, B, values, crow, col, row, scale, xa=xa, need=need)


def register() -> list[str]:
    """Register these as the ops' CPU implementations (called by the package)."""
    torch.library.register_kernel(OP, "cpu", ref.own_outputs(ref.autocast_off(forward)))
    torch.library.register_kernel(OP_BACKWARD, "cpu",
                                  ref.backward_op(ref.autocast_off(backward), 9, ref.LIKE))
    torch.library.register_kernel(OP_TRAIN, "cpu", ref.own_outputs(ref.autocast_off(forward_train)))
    torch.library.register_kernel(OP_BACKWARD_TRAIN, "cpu",
                                  ref.backward_op(ref.autocast_off(backward_train), 10,
                                                  ref.LIKE_TRAIN))
    return [OP, OP_BACKWARD, OP_TRAIN, OP_BACKWARD_TRAIN]
