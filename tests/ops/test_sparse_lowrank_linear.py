"""The reference op: forward against a dense reconstruction, gradients against autograd
through the dense reconstruction, fake implementation, and no dense weight in backward."""
import pytest
import torch
import torch.nn.functional as F

import structrewrite  # noqa: F401  (registers the ops)
from structrewrite.nn.sparse_lowrank import csr_from_flat
from structrewrite.ops import sparse_lowrank_linear as mod

op = torch.ops.structrewrite.sparse_lowrank_linear


def make(out_f, in_f, rank, density, dtype=torch.float32, bias=True, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))
    nnz = int(round(density * out_f * in_f))
    flat = torch.randperm(out_f * in_f, generator=g)[:nnz]
    crow, col, row = csr_from_flat(flat, out_f, in_f)
    A = torch.randn(rank, in_f, generator=g).to(dtype)
    B = torch.randn(out_f, rank, generator=g).to(dtype) * 0.1
    values = torch.randn(nnz, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    return A, B, values, crow, col, row, b


def dense(A, B, values, row, col, scale, out_f, in_f):
    S = torch.zeros(out_f, in_f, dtype=torch.float64).index_put((row.long(), col.long()), values.double(),
                                                                 accumulate=True)
    return scale * B.double() @ A.double() + S


@pytest.mark.parametrize("shape", [(2, 7, 24), (5, 24), (24,)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_reconstruction(shape, bias):
    out_f, in_f, rank = 40, 24, 6
    A, B, v, crow, col, row, b = make(out_f, in_f, rank, 0.1, bias=bias)
    x = torch.randn(*shape)
    y = op(x, A, B, v, crow, col, row, b, 0.5)
    W = dense(A, B, v, row, col, 0.5, out_f, in_f)
    ref = F.linear(x.double(), W, None if b is None else b.double())
    assert y.shape == (*shape[:-1], out_f) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_forward_bf16_against_fp64():
    out_f, in_f = 48, 32
    A, B, v, crow, col, row, b = make(out_f, in_f, 8, 0.05, dtype=torch.bfloat16)
    x = torch.randn(9, in_f).bfloat16()
    y = op(x, A, B, v, crow, col, row, b, 2.0)
    ref = F.linear(x.double(), dense(A, B, v, row, col, 2.0, out_f, in_f), b.double())
    rel = (y.double() - ref).norm() / ref.norm()
    assert y.dtype == torch.bfloat16 and rel < 1e-2


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_autograd_through_dense(bias):
    out_f, in_f, rank, scale = 30, 20, 5, 0.7
    A, B, v, crow, col, row, b = make(out_f, in_f, rank, 0.08, dtype=torch.float64, bias=bias)
    params = [A, B, v] + ([b] if bias else [])
    for p in params:
        p.requires_grad_()
    x = torch.randn(3, 4, in_f, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 4, out_f, dtype=torch.float64)
    op(x, A, B, v, crow, col, row, b, scale).backward(gy)
    got = [x.grad] + [p.grad for p in params]

    xs = x.detach().clone().requires_grad_()
    ps = [p.detach().clone().requires_grad_() for p in params]
    S = torch.zeros(out_f, in_f, dtype=torch.float64).index_put((row.long(), col.long()), ps[2])
    W = scale * ps[1] @ ps[0] + S
    F.linear(xs, W, ps[3] if bias else None).backward(gy)
    want = [xs.grad] + [p.grad for p in ps]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    A, B, v, crow, col, row, b = make(9, 7, 3, 0.2, dtype=torch.float64)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    ins = [t.requires_grad_() for t in (A, B, v, b)]
    assert torch.autograd.gradcheck(lambda x, A, B, v, b: op(x, A, B, v, crow, col, row, b, 1.3),
                                    (x, *ins))


def test_empty_support():
    A, B, v, crow, col, row, b = make(12, 10, 2, 0.0)
    assert v.numel() == 0
    x = torch.randn(3, 10, requires_grad=True)
    vv = v.clone().requires_grad_()
    y = op(x, A, B, vv, crow, col, row, b, 1.0)
    torch.testing.assert_close(y, F.linear(F.linear(x, A), B) + b)
    y.sum().backward()
    assert vv.grad.shape == (0,)


def test_backward_never_forms_a_dense_weight(monkeypatch):
    """With the gather chunk small, no temporary may reach out x in elements."""
    out_f, in_f, tokens = 64, 48, 4
    A, B, v, crow, col, row, b = make(out_f, in_f, 4, 0.05)
    monkeypatch.setattr(mod, "_CHUNK_ELEMS", 64)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            for t in (res if isinstance(res, (tuple, list)) else (res,)):
                if isinstance(t, torch.Tensor):
                    seen.append(t.numel())
            return res
    x = torch.randn(tokens, in_f, requires_grad=True)
    vv = v.clone().requires_grad_()
    y = op(x, A, B, vv, crow, col, row, b, 1.0)
    with Spy():
        mod.reference_backward(torch.ones_like(y), x, A, B, vv, crow, col, row, 1.0)
    assert seen and max(seen) < out_f * in_f


def test_fake_impl_and_opcheck():
    A, B, v, crow, col, row, b = make(16, 12, 4, 0.1)
    x = torch.randn(2, 3, 12)
    torch.library.opcheck(op, (x, A, B, v, crow, col, row, b, 0.5))
    with torch._subclasses.fake_tensor.FakeTensorMode() as fm:
        fx_ = fm.from_tensor(x)
        out = op(fx_, *(fm.from_tensor(t) for t in (A, B, v, crow, col, row, b)), 0.5)
        assert out.shape == (2, 3, 16)


def test_train_ops_fake_impl_opcheck_and_reference():
    """``sparse_lowrank_linear_train`` returns y and x Aᵀ; its backward given that x Aᵀ
    equals the op's backward; both pass opcheck and have fake implementations."""
    A, B, v, crow, col, row, b = make(16, 12, 4, 0.1, dtype=torch.float64)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    g = torch.randn(2, 3, 16, dtype=torch.float64)
    train = torch.ops.structrewrite.sparse_lowrank_linear_train
    back = torch.ops.structrewrite.sparse_lowrank_linear_backward_train
    torch.library.opcheck(train, (x, A, B, v, crow, col, row, b, 0.5))
    y, xa = mod.reference_train(x, A, B, v, crow, col, row, b, 0.5)
    torch.testing.assert_close(y, mod.reference(x, A, B, v, crow, col, row, b, 0.5))
    torch.testing.assert_close(xa, x @ A.t())
    torch.library.opcheck(back, (g, x, xa, A, B, v, crow, col, row, 0.5))
    for got, want in zip(mod.reference_backward_train(g, x, xa, A, B, v, crow, col, row, 0.5),
                         mod.reference_backward(g, x, A, B, v, crow, col, row, 0.5)):
        torch.testing.assert_close(got, want)
    with torch._subclasses.fake_tensor.FakeTensorMode() as fm:
        f = [fm.from_tensor(t) for t in (x, A, B, v, crow, col, row, b)]
        y_f, xa_f = train(*f, 0.5)
        assert y_f.shape == (2, 3, 16) and xa_f.shape == (2, 3, 4)


def test_train_op_autograd_matches_the_op_and_xa_is_not_differentiable():
    A, B, v, crow, col, row, b = make(16, 12, 4, 0.1, dtype=torch.float64)
    params = [t.clone().requires_grad_() for t in (A, B, v, b)]
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 16, dtype=torch.float64)
    y, xa = torch.ops.structrewrite.sparse_lowrank_linear_train(x, params[0], params[1], params[2],
                                                                crow, col, row, params[3], 0.5)
    assert not xa.requires_grad
    got = torch.autograd.grad(y, [x, *params], g)
    y2 = op(x, params[0], params[1], params[2], crow, col, row, params[3], 0.5)
    want = torch.autograd.grad(y2, [x, *params], g)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("train", [False, True])
def test_backward_fakes_have_the_strides_of_the_real_gradients(train):
    """A linear fed a transposed input (``x.transpose(1, 2)`` of a (B, C, T) tensor): the
    real backward returns a contiguous dx, and so must the fake, or Inductor's stride check
    fails the compiled backward. opcheck compares the two."""
    A, B, v, crow, col, row, b = make(16, 12, 4, 0.1, dtype=torch.float64)
    x = torch.randn(2, 12, 5, dtype=torch.float64).transpose(1, 2)   # (2, 5, 12), permuted
    g = torch.randn(2, 5, 16, dtype=torch.float64)
    if train:
        back = torch.ops.structrewrite.sparse_lowrank_linear_backward_train
        args = (g, x, x @ A.t(), A, B, v, crow, col, row, 0.5)
    else:
        back = torch.ops.structrewrite.sparse_lowrank_linear_backward
        args = (g, x, A, B, v, crow, col, row, 0.5)
    torch.library.opcheck(back, args)
    real = back(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as fm:
        fake = back(*(fm.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride(), (r.stride(), f.stride())


def test_backward_ops_take_needs_of_four_and_agree_with_their_fake():
    """``needs`` names four gradients, or the op says so; skipped ones are empty tensors of
    their input's dtype on the real and the fake implementation alike (``opcheck``)."""
    from structrewrite.nn import SparseLowRankLinear
    bw = torch.ops.structrewrite.sparse_lowrank_linear_backward
    layer = SparseLowRankLinear(32, 16, rank=4, density=0.25, key="a")
    x, g = torch.randn(3, 32), torch.randn(3, 16)
    sup = (layer.sparse_crow, layer.sparse_col, layer.sparse_row)
    args = (g, x, layer.A.detach(), layer.B.detach(), layer.values.detach().double(), *sup, layer.scale)
    with pytest.raises(ValueError, match="needs takes four booleans"):
        bw(*args, [True] * 3)
    for needs in ([True, True, True, False], [False, True, False, True], [False] * 4):
        torch.library.opcheck(bw, (*args, needs), test_utils=("test_faketensor", "test_schema"))
        got = bw(*args, needs)
        for t, src, n in zip(got, (x, args[2], args[3], args[4]), needs):
            assert t.dtype == src.dtype and (t.shape == src.shape if n else t.numel() == 0)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("trainable", ["all", "none", "B", "values", "A"])
def test_flop_counter_mode_counts_the_ops_useful_flops(train, trainable):
    """FlopCounterMode (and the MFU figures built on it) counts the op and its backward by
    their useful FLOPs (they counted 0): the low-rank GEMMs and 2·M·nnz per sparse
    product, in the backward for the gradients asked for only (x Aᵀ recomputed for dB
    unless the training form kept it), for 3-D inputs and without a bias."""
    from torch.utils.flop_counter import FlopCounterMode
    A, B, v, crow, col, row, _ = make(96, 64, 8, 0.1, bias=False, seed=0)
    params = {"A": A, "B": B, "values": v}
    for name, t in params.items():
        t.requires_grad_(trainable in ("all", name))
    x = torch.randn(2, 5, 64, requires_grad=True)
    name = "sparse_lowrank_linear" + ("_train" if train else "")
    with FlopCounterMode(display=False) as counter:
        out = getattr(torch.ops.structrewrite, name)(x, A, B, v, crow, col, row, None, 0.5)
        (out[0] if train else out).sum().backward()
    counts = {str(k): n for k, n in counter.get_flop_counts()["Global"].items()}
    M, r, n, m, nnz = 10, 8, 64, 96, v.numel()
    fwd = 2 * M * r * (n + m) + 2 * M * nnz
    dx = 2 * M * m * r + 2 * M * r * n + 2 * M * nnz   # g B, then (g B) A + the sparse product
    dA = 2 * M * r * n                                  # (g B)ᵀ x, g B shared with dx
    dB = 2 * M * m * r + (0 if train else 2 * M * n * r)
    dv = 2 * M * nnz
    bwd = dx + {"all": dA + dB + dv, "none": 0, "A": dA, "B": dB, "values": dv}[trainable]
    assert counts == {f"structrewrite.{name}": fwd, f"structrewrite.{name}_backward".replace(
        "_train_backward", "_backward_train"): bwd}


def test_a_frozen_layer_saves_nothing_of_the_tokens_size_under_a_copying_hook():
    """The op with A, B and values frozen computes dx alone, which reads neither x nor
    x Aᵀ: neither is saved, so a saved-tensor hook that copies what it packs (as
    ``save_on_cpu`` or a cast does) copies nothing of the tokens' size."""
    A, B, v, crow, col, row, b = make(96, 64, 8, 0.1, seed=1)
    x = torch.randn(333, 64, requires_grad=True)
    for name in ("sparse_lowrank_linear", "sparse_lowrank_linear_train"):
        packed = []

        def pack(t):
            packed.append(t.clone())
            return packed[-1]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = getattr(torch.ops.structrewrite, name)(x, A, B, v, crow, col, row, b, 0.5)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        assert not any(t.shape[0] == 333 for t in packed), [t.shape for t in packed]
        x.grad = None
