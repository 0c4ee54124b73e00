"""``structrewrite::sparse_lowrank_linear``: y = scale * (x Aᵀ) Bᵀ + x Sᵀ + bias.

The weight is never formed. ``S`` (out x in) is given by its support in CSR order
(sorted by output row, then input column) as three int32 tensors:

* ``crow``   (out + 1,)  row pointers: the entries of row ``i`` are ``crow[i]:crow[i+1]``
* ``col``    (nnz,)      input column of each entry
* ``row``    (nnz,)      output row of each entry (the same information as ``crow``,
                         kept so that kernels that walk the entries need no search)

and ``values`` (nnz,) in the parameter dtype. ``A`` is (rank, in), ``B`` is (out, rank).

The eager implementations here are the specification: the Triton kernels in
``structrewrite.codegen.triton`` are tested against them. They accumulate the sparse
part in float32 (float64 for float64 inputs) and process the support in chunks so that neither an out x in matrix
nor a tokens x nnz matrix larger than ``_CHUNK_ELEMS`` elements is ever built.

Every implementation of the op (this default, the CPU and the CUDA kernels) computes in
its inputs' dtype with autocast off (``autocast_off``): under autocast,
``SparseLowRankLinear`` casts its inputs to the autocast dtype itself, and inside the op
autocast would recast the float32 sums of half inputs back to half (and send bf16 to
PyTorch's CPU CSR products, which have no bf16 kernel).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

def autocast_off(fn):
    """``fn(first_tensor, ...)`` run with autocast disabled on the first tensor's device."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = args[0].device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return run


def own(t):
    """``t``, where it is a view of a tensor made inside an implementation (the final
    reshape of a 2-D result), as a tensor of its own (``aten._unsafe_view``, as
    ``F.linear`` hands out its result for a 3-D input). Autograd forbids in-place changes
    to a view made inside a custom op or Function: ``y = layer(x); y += r`` (Falcon's
    decoder layer) failed where nn.Linear's output takes it."""
    if isinstance(t, torch.Tensor) and t._is_view():
        return torch.ops.aten._unsafe_view.default(t, t.shape)
    return t


def own_outputs(fn):
    """``fn`` with its outputs passed through ``own``."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tuple(own(t) for t in out) if isinstance(out, tuple) else own(out)
    return run


# (dx, dA, dB, dvalues): which gradients a backward computes; all of them by default
ALL = (True, True, True, True)


def wanted(needs) -> tuple:
    """The ``need`` of an implementation from a backward op's ``needs`` (None: all)."""
    if needs is None:
        return ALL
    if len(needs) != 4:
        raise ValueError(f"needs takes four booleans (dx, dA, dB, dvalues), got {list(needs)}")
    return tuple(bool(n) for n in needs)


def backward_op(fn, nargs: int, like: tuple):
    """A backward op's implementation from ``fn(*args, need=...)``, which returns None for
    a gradient it was not asked for. The op takes ``needs`` after its ``nargs`` other
    arguments (positionally, by name, or not at all: None), and returns an empty tensor
    in a skipped gradient's place (an op returns tensors only; autograd hands None on),
    of the dtype of the input it stands for (``like``: the positions of x, A, B and
    values among the arguments), as the fake implementation gives it."""
    @functools.wraps(fn)
    def run(*args, needs=None):
        if len(args) > nargs:
            args, needs = args[:nargs], args[nargs]
        grads = fn(*args, need=wanted(needs))
        return tuple(args[i].new_empty(0) if g is None else g for g, i in zip(grads, like))
    return run


# where x, A, B and values sit among a backward op's arguments
LIKE = (1, 2, 3, 4)
LIKE_TRAIN = (1, 3, 4, 5)


# Upper bound on the elements of one gathered (tokens x chunk) temporary.
_CHUNK_ELEMS = 1 << 24


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half types, the input's own for float32/float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _chunks(nnz: int, tokens: int):
    step = max(1, _CHUNK_ELEMS // max(tokens, 1))
    for start in range(0, nnz, step):
        yield start, min(nnz, start + step)


def _entry_product(a2: torch.Tensor, values: torch.Tensor, take: torch.Tensor,
                   put: torch.Tensor, width: int) -> torch.Tensor:
    """(M x width) in ``_acc``: ``out[:, put[k]] += a2[:, take[k]] · values[k]`` over the
    entries k, in chunks of at most ``_CHUNK_ELEMS`` gathered elements."""
    acc = _acc(a2)
    out = a2.new_zeros((a2.shape[0], width), dtype=acc)
    for s, e in _chunks(values.numel(), a2.shape[0]):
        contrib = a2[:, take[s:e].long()].to(acc) * values[s:e].to(acc)
        out.index_add_(1, put[s:e].long(), contrib)
    return out


def sparse_matmul_t(x2: torch.Tensor, values: torch.Tensor, row: torch.Tensor,
                    col: torch.Tensor, out_features: int) -> torch.Tensor:
    """x2 (M x in) @ Sᵀ -> (M x out) accumulated in ``_acc``, S in COO (row, col, values)."""
    return _entry_product(x2, values, col, row, out_features)


def sparse_t_matmul(g2: torch.Tensor, values: torch.Tensor, row: torch.Tensor,
                    col: torch.Tensor, in_features: int) -> torch.Tensor:
    """g2 (M x out) @ S -> (M x in) accumulated in ``_acc``."""
    return _entry_product(g2, values, row, col, in_features)


def sampled_grad(g2: torch.Tensor, x2: torch.Tensor, row: torch.Tensor,
                 col: torch.Tensor) -> torch.Tensor:
    """(g2ᵀ x2) sampled at the support: d values[k] = sum_m g2[m, row[k]] * x2[m, col[k]]."""
    nnz = row.numel()
    acc = _acc(g2)
    out = torch.empty(nnz, dtype=acc, device=g2.device)
    for s, e in _chunks(nnz, g2.shape[0]):
        out[s:e] = (g2[:, row[s:e].long()].to(acc) * x2[:, col[s:e].long()].to(acc)).sum(0)
    return out


@torch.library.custom_op("structrewrite::sparse_lowrank_linear", mutates_args=())
def sparse_lowrank_linear(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    row: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """The op; on every device without an implementation of its own, the reference."""
    return own_outputs(autocast_off(reference))(x, A, B, values, crow, col, row, bias, scale)


def reference(x, A, B, values, crow, col, row, bias, scale: float) -> torch.Tensor:
    """Reference implementation of the forward (the specification of the op)."""
    out_features = B.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(F.linear(x2, A), B).to(_acc(x2)) * scale
    y = y + sparse_matmul_t(x2, values, row, col, out_features)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def _check_widths(x, A, B) -> None:
    """The fakes' shape checks: x's last dim is A's width, A's rank is B's. Under
    ``torch.export`` they also pin the input's feature dim (no dynamic width there)."""
    torch._check(x.shape[-1] == A.shape[1], lambda: f"x has {x.shape[-1]} features, the "
                 f"layer takes {A.shape[1]}")
    torch._check(A.shape[0] == B.shape[1], lambda: f"A has rank {A.shape[0]}, B {B.shape[1]}")


@sparse_lowrank_linear.register_fake
def _(x, A, B, values, crow, col, row, bias, scale):
    _check_widths(x, A, B)
    return x.new_empty((*x.shape[:-1], B.shape[0]))


@torch.library.custom_op("structrewrite::sparse_lowrank_linear_backward", mutates_args=())
def sparse_lowrank_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    row: torch.Tensor,
    scale: float,
    needs: Optional[Sequence[bool]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dA, dB, dvalues) of the op; the bias gradient is a plain sum.

    dx      = scale * (g B) A + g S
    dA      = scale * (g B)ᵀ x
    dB      = scale * gᵀ (x Aᵀ)
    dvalues = (gᵀ x) sampled at the support  (never formed densely)

    ``needs``: which of the four to compute (None: all); the others are not computed and
    come back as empty tensors. The op's autograd asks for those its inputs need: a
    frozen layer (only dx), a layer whose input needs no gradient (no dx), a part frozen
    (A, B or the values) each skip their GEMMs or sparse products.

    On every device without an implementation of its own, the reference.
    """
    impl = backward_op(autocast_off(reference_backward), 9, LIKE)
    return impl(grad, x, A, B, values, crow, col, row, scale, needs)


def reference_backward(grad, x, A, B, values, crow, col, row, scale: float, xa=None,
                       need=ALL):
    """Reference implementation of the backward (the specification of the op).
    ``xa``: x Aᵀ from the forward (``sparse_lowrank_linear_train``), else computed here.
    ``need``: (dx, dA, dB, dvalues) to compute; None in the others' places."""
    in_features = A.shape[1]
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, in_features)
    acc = _acc(g2)
    dx = dA = dB = dv = None
    if need[0] or need[1]:
        gB = g2 @ B                      # M x r
    if need[0]:
        dx = (gB @ A).to(acc) * scale + sparse_t_matmul(g2, values, row, col, in_features)
        dx = dx.to(x.dtype).reshape(x.shape)
    if need[1]:
        dA = ((gB.t() @ x2).to(acc) * scale).to(A.dtype)
    if need[2]:
        xA = x2 @ A.t() if xa is None else xa.reshape(-1, A.shape[0])   # M x r
        dB = ((g2.t() @ xA).to(acc) * scale).to(B.dtype)
    if need[3]:
        dv = sampled_grad(g2, x2, row, col).to(values.dtype)
    return dx, dA, dB, dv


def _grads_like(x, A, B, values, needs=None):
    """Fake outputs of a backward op: (dx, dA, dB, dvalues), contiguous as every
    implementation returns them (``empty_like`` would copy the strides of a transposed or
    permuted x, and Inductor checks the real outputs' strides against these); empty
    where ``needs`` leaves one out."""
    return tuple(t.new_empty(t.shape if n else (0,))
                 for t, n in zip((x, A, B, values), wanted(needs)))


@sparse_lowrank_linear_backward.register_fake
def _(grad, x, A, B, values, crow, col, row, scale, needs=None):
    return _grads_like(x, A, B, values, needs)


def stand_in(shape, dtype, device) -> torch.Tensor:
    """A tensor of this shape, dtype and device holding one element (every stride 0), for a
    backward that reads only the shape and dtype of an input it did not keep."""
    return torch.empty_strided(shape, (0,) * len(shape), dtype=dtype, device=device)


def unread(t: torch.Tensor) -> tuple:
    """What ``keep`` takes in place of a tensor the backward does not read."""
    return (t.shape, t.dtype, t.device)


def keep(ctx, *tensors) -> None:
    """``ctx.save_for_backward(*tensors)``, where a ``(shape, dtype, device)`` triple
    (``unread``) in place of a tensor marks one that the backward does not read: it is not
    saved (a saved-tensor hook that copies, such as ``save_on_cpu`` or a cast, would make
    a full copy even of a stand-in) and ``kept`` puts a stand-in in its place."""
    ctx.unkept = {i: t for i, t in enumerate(tensors) if isinstance(t, tuple)}
    ctx.save_for_backward(*(None if isinstance(t, tuple) else t for t in tensors))


def kept(ctx) -> list:
    """What ``keep`` saved, with stand-ins for what it did not."""
    out = list(ctx.saved_tensors)
    for i, like in getattr(ctx, "unkept", {}).items():
        out[i] = stand_in(*like)
    return out


def _keep(ctx, inputs, xa=None):
    """Save the op's inputs for its backward, and ``xa`` (x Aᵀ from the forward) after x.
    A backward that computes dx alone (A, B and values frozen: adapters beside a frozen
    rewritten layer) reads neither x nor x Aᵀ, and one without dB nor d values reads no
    x Aᵀ: neither is kept then (``keep``), so that a frozen layer keeps no activation, as
    a frozen nn.Linear keeps none."""
    x, A, B, values, crow, col, row, bias, scale = inputs
    needs = ctx.needs_input_grad
    if not any(needs[1:4]):
        x = unread(x)
    saved = () if xa is None else (xa if needs[2] or needs[3] else unread(xa),)
    keep(ctx, x, *saved, A, B, values, crow, col, row)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _setup_context(ctx, inputs, output):
    _keep(ctx, inputs)


def needs_of(ctx) -> Optional[list]:
    """The backward op's ``needs`` for what the inputs x, A, B and values need (None:
    all four, the op's default)."""
    needs = list(ctx.needs_input_grad[:4])
    return None if all(needs) else needs


def _input_grads(ctx, grad, grads):
    """The gradients of the op's nine inputs, from a backward op's (dx, dA, dB, dvalues)."""
    dbias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[7] else None
    grads = tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad[:4]))
    return (*grads, None, None, None, dbias, None)


def _backward(ctx, grad):
    x, A, B, values, crow, col, row = kept(ctx)
    return _input_grads(ctx, grad, torch.ops.structrewrite.sparse_lowrank_linear_backward(
        grad, x, A, B, values, crow, col, row, ctx.scale, needs_of(ctx)))


sparse_lowrank_linear.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------
# The same op for a training step under torch.compile, keeping x Aᵀ for the backward
# ----------------------------------------------------------------------------------
# ``sparse_lowrank_linear``'s autograd sees only its output, so its backward computes
# x Aᵀ (tokens x rank) again: one GEMM of M·r·in, about as long as the sparse part of a
# tile or channel-wise support. In eager mode the layer's own autograd entry keeps it
# (``EagerFunction``); under torch.compile, where the layer has to be the op, it calls
# this pair instead: ``sparse_lowrank_linear_train`` returns x Aᵀ beside y, and
# ``sparse_lowrank_linear_backward_train`` takes it. Tracing and export keep seeing
# ``sparse_lowrank_linear`` (``SparseLowRankLinear._keeps_xa``).
@torch.library.custom_op("structrewrite::sparse_lowrank_linear_train", mutates_args=())
def sparse_lowrank_linear_train(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    row: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x Aᵀ): y as ``sparse_lowrank_linear``, x Aᵀ of shape (..., rank) for the
    backward (not differentiable). On every device without an implementation of its own,
    the reference."""
    return own_outputs(autocast_off(reference_train))(x, A, B, values, crow, col, row, bias, scale)


def reference_train(x, A, B, values, crow, col, row, bias, scale: float):
    """Reference implementation of ``sparse_lowrank_linear_train``."""
    y = reference(x, A, B, values, crow, col, row, bias, scale)
    xa = F.linear(x.reshape(-1, x.shape[-1]), A)
    return y, xa.reshape(*x.shape[:-1], A.shape[0])


@sparse_lowrank_linear_train.register_fake
def _(x, A, B, values, crow, col, row, bias, scale):
    _check_widths(x, A, B)
    return x.new_empty((*x.shape[:-1], B.shape[0])), x.new_empty((*x.shape[:-1], A.shape[0]))


@torch.library.custom_op("structrewrite::sparse_lowrank_linear_backward_train", mutates_args=())
def sparse_lowrank_linear_backward_train(
    grad: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    row: torch.Tensor,
    scale: float,
    needs: Optional[Sequence[bool]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sparse_lowrank_linear_backward`` given ``xa`` = x Aᵀ from the forward."""
    impl = backward_op(autocast_off(reference_backward_train), 10, LIKE_TRAIN)
    return impl(grad, x, xa, A, B, values, crow, col, row, scale, needs)


def reference_backward_train(grad, x, xa, A, B, values, crow, col, row, scale: float, need=ALL):
    return reference_backward(grad, x, A, B, values, crow, col, row, scale, xa=xa, need=need)


@sparse_lowrank_linear_backward_train.register_fake
def _(grad, x, xa, A, B, values, crow, col, row, scale, needs=None):
    return _grads_like(x, A, B, values, needs)


def _setup_context_train(ctx, inputs, output):
    xa = output[1]
    ctx.mark_non_differentiable(xa)
    _keep(ctx, inputs, xa)


def _backward_train(ctx, grad, _grad_xa):
    x, xa, A, B, values, crow, col, row = kept(ctx)
    return _input_grads(ctx, grad, torch.ops.structrewrite.sparse_lowrank_linear_backward_train(
        grad, x, xa, A, B, values, crow, col, row, ctx.scale, needs_of(ctx)))


sparse_lowrank_linear_train.register_autograd(_backward_train, setup_context=_setup_context_train)


def _no_second_derivative(ctx, *grads):
    raise NotImplementedError(
        "structrewrite::sparse_lowrank_linear has no second derivative: a backward through "
        "a backward of SparseLowRankLinear (create_graph=True, then a gradient of the "
        "gradients) is not supported")


def _setup_nothing(ctx, inputs, output):
    pass


# The backward ops are differentiable only in name: a first backward with create_graph=True
# works (as for parts of a model that need second derivatives elsewhere), and a second
# one that reaches them says why it fails instead of "no autograd formula registered".
for _op in (sparse_lowrank_linear_backward, sparse_lowrank_linear_backward_train):
    _op.register_autograd(_no_second_derivative, setup_context=_setup_nothing)


# ----------------------------------------------------------------------------------
# autocast
# ----------------------------------------------------------------------------------
# ``SparseLowRankLinear`` casts its operands itself where it runs eagerly. Where it is
# traced (the compile backend's graphs, torch.export), or where an exported program runs
# under autocast, the op meets autocast on its own: these kernels cast its floating
# inputs to the autocast dtype as autocast casts those of F.linear (float64 ones are left
# alone), then call the op with autocast off. Without them a traced layer computed in
# float32 beside bf16 layers, or failed on mixed dtypes.
_AUTOCAST_LIB = torch.library.Library("structrewrite", "IMPL")


def _autocast_kernel(op, device_type: str):
    def run(*args):
        dt = torch.get_autocast_dtype(device_type)
        args = [a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point()
                and a.dtype != torch.float64 else a for a in args]
        with torch.autocast(device_type, enabled=False):
            return op(*args)
    return run


for _name, _op in (("sparse_lowrank_linear", sparse_lowrank_linear),
                   ("sparse_lowrank_linear_train", sparse_lowrank_linear_train)):
    for _key, _device in (("AutocastCPU", "cpu"), ("AutocastCUDA", "cuda")):
        _AUTOCAST_LIB.impl(_name, _autocast_kernel(_op, _device), _key)


# ----------------------------------------------------------------------------------
# channel-wise supports under torch.compile
# ----------------------------------------------------------------------------------
def channel_count(crow: torch.Tensor, col: torch.Tensor, out_features: int) -> int:
    """k where every output row of the support holds the same k input channels (LOST's
    channel-wise support; the entries of a row come in ascending column order), else 0.
    Reads the support's values: run it where the support is set or loaded, not while
    tracing."""
    nnz = col.numel()
    if out_features == 0 or nnz == 0 or nnz % out_features or col.device.type == "meta":
        return 0
    k = nnz // out_features
    if not torch.equal(crow.long().cpu(), torch.arange(out_features + 1, device="cpu") * k):
        return 0
    grid = col.view(out_features, k)
    return k if bool((grid == grid[:1]).all()) else 0


def channel_width(n: int) -> int:
    """The inner GEMM width r + k of a channel-wise layer rounded up to a multiple of 64:
    cuBLAS runs its fast (aligned) kernels only when the leading dimensions are
    multiples of 16 bytes."""
    return -(-n // 64) * 64


def channel_decomposition(x, A, B, values, cols, bias, scale: float) -> torch.Tensor:
    """The op for a channel-wise support as plain differentiable torch ops, for
    ``torch.compile``: with ``cols`` the k channels every row holds (``values`` row by
    row, ``values.view(out, k)``),

        y = (x A'ᵀ) W'ᵀ + bias,   A' = [A; E; 0],   W' = [s·B, V, 0]

    where E (k x in) has a one in each row at its channel; the inner width r + k is
    rounded up to a multiple of 64 with zeros, so that cuBLAS gets aligned operands.
    Inductor sees two GEMMs and the small concatenations, fuses the latter and derives
    the backward; no custom op is called. The same computation as the CUDA
    implementation's ``sparse_lowrank_channel`` (which runs it on cuBLAS per call from
    Python, whose host time bounds compiled steps of small layers); it never builds an
    out x in matrix."""
    r, in_features = A.shape
    out_features, k = B.shape[0], cols.numel()
    inner = channel_width(r + k)
    one_hot = A.new_zeros(inner - r, in_features).index_put(
        (torch.arange(k, device=A.device), cols.long()), A.new_ones(()))
    Aw = torch.cat([A, one_hot], dim=0)
    Ww = torch.cat([B * scale, values.view(out_features, k),
                    B.new_zeros(out_features, inner - r - k)], dim=1)
    return F.linear(F.linear(x, Aw), Ww, bias)


# ----------------------------------------------------------------------------------
# FLOP counts (torch.utils.flop_counter.FlopCounterMode, and tools built on it)
# ----------------------------------------------------------------------------------
def _tokens(x_shape) -> int:
    return math.prod(x_shape[:-1])


def forward_flops(x_shape, A_shape, B_shape, values_shape) -> int:
    """The op's useful FLOPs: the two low-rank GEMMs and 2·M·nnz for the sparse product
    (what the op's specification computes, not what a path spends: the folded path's
    dense products, the padding of misaligned widths)."""
    M, (r, n), m = _tokens(x_shape), A_shape, B_shape[0]
    return 2 * M * r * (n + m) + 2 * M * values_shape[0]


def backward_flops(x_shape, A_shape, B_shape, values_shape, needs, keeps_xa: bool) -> int:
    """The backward's useful FLOPs for the gradients in ``needs`` (dx, dA, dB, d values;
    None: all): g B for dx or dA, then (g B) A + the sparse product for dx, (g B)ᵀ x for
    dA, gᵀ (x Aᵀ) for dB (x Aᵀ recomputed unless the forward kept it) and 2·M·nnz for
    d values."""
    dx, dA, dB, dv = needs if needs is not None else ALL
    M, (r, n), m, nnz = _tokens(x_shape), A_shape, B_shape[0], values_shape[0]
    flops = 2 * M * m * r if dx or dA else 0
    flops += (2 * M * r * n + 2 * M * nnz) if dx else 0
    flops += 2 * M * r * n if dA else 0
    flops += (2 * M * m * r + (0 if keeps_xa else 2 * M * n * r)) if dB else 0
    return flops + (2 * M * nnz if dv else 0)


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula
    ops = torch.ops.structrewrite

    @register_flop_formula([ops.sparse_lowrank_linear, ops.sparse_lowrank_linear_train])
    def _fwd(x, A, B, values, *_, out_shape=None, **__):
        return forward_flops(x, A, B, values)

    @register_flop_formula(ops.sparse_lowrank_linear_backward)
    def _bwd(grad, x, A, B, values, crow, col, row, scale, needs=None, *_, out_shape=None, **__):
        return backward_flops(x, A, B, values, needs, keeps_xa=False)

    @register_flop_formula(ops.sparse_lowrank_linear_backward_train)
    def _bwd_train(grad, x, xa, A, B, values, crow, col, row, scale, needs=None, *_,
                   out_shape=None, **__):
        return backward_flops(x, A, B, values, needs, keeps_xa=True)


_register_flop_formulas()
