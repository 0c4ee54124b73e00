"""The CPU implementation of sparse_lowrank_linear (PyTorch's CSR kernels) against the
reference: float32, float64, bf16 and fp16, fresh random shapes and data, batch dims,
with and without bias, empty supports and no tokens; mixed dtypes go to the reference.
Tolerances (relative Frobenius error): float32 1e-5, float64 1e-12, bf16 1e-2, fp16 5e-3
(both sides round the low-rank part and the result to the half type)."""
import random

import pytest
import torch

import structrewrite  # noqa: F401  (registers the ops and their CPU implementation)
from structrewrite.codegen.cpu import sparse_lowrank as cpu
from structrewrite.codegen.triton import sparse_lowrank_folded as folded
from structrewrite.nn.sparse_lowrank import csr_from_flat
from structrewrite.ops.sparse_lowrank_linear import reference, reference_backward

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _problem(dtype, density, bias, seed, tokens=None):
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    in_f, out_f = rnd.randint(5, 90), rnd.randint(5, 90)
    rank = rnd.randint(1, min(in_f, out_f))
    lead = (rnd.randint(1, 3), rnd.randint(1, 20) if tokens is None else tokens)
    flat = torch.randperm(in_f * out_f, generator=g)[:int(density * in_f * out_f)]
    crow, col, row = csr_from_flat(flat, out_f, in_f)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return (r(*lead, in_f), r(rank, in_f), r(out_f, rank), r(col.numel()), crow, col, row,
            r(out_f) if bias else None, rnd.choice([1.0, 0.3, 32.0 / rank])), r(*lead, out_f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fold", ["never", "always"])   # CSR products, or the folded path (fp32/fp64)
def test_cpu_implementation_matches_the_reference(dtype, density, bias, fold, monkeypatch):
    monkeypatch.setattr(folded, "MODE", fold)
    seed = random.randrange(2**31)
    args, grad = _problem(dtype, density, bias, seed)
    y, y_ref = cpu.forward(*args), reference(*args)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert _rel(y, y_ref) < TOL[dtype], f"seed {seed}"
    bargs = (grad, *args[:7], args[8])
    for name, a, b in zip(("dx", "dA", "dB", "dvalues"), cpu.backward(*bargs), reference_backward(*bargs)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if b.numel():
            assert _rel(a, b) < TOL[dtype], f"{name} (seed {seed})"


def test_the_op_on_cpu_runs_this_implementation_and_trains():
    args, grad = _problem(torch.float32, 0.1, True, 7)
    leaves = [t.requires_grad_() for t in (args[0], args[1], args[2], args[3], args[7])]
    y = torch.ops.structrewrite.sparse_lowrank_linear(*args)
    assert torch.equal(y, cpu.forward(*args))
    got = torch.autograd.grad(y, leaves, grad)
    want = (*reference_backward(grad, *args[:7], args[8]), grad.reshape(-1, grad.shape[-1]).sum(0))
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-5


def test_no_tokens_and_mixed_dtypes():
    args, grad = _problem(torch.float32, 0.1, True, 3, tokens=0)
    assert cpu.forward(*args).shape == (*args[0].shape[:-1], args[2].shape[0])
    dx, dA, dB, dv = cpu.backward(grad, *args[:7], args[8])
    assert dx.shape == args[0].shape and float(dA.abs().sum() + dB.abs().sum() + dv.abs().sum()) == 0
    args, _ = _problem(torch.float32, 0.1, True, 4)       # mixed dtypes: the reference decides
    mixed = (args[0].double(), *args[1:])
    with pytest.raises(RuntimeError):
        reference(*mixed)
    with pytest.raises(RuntimeError):
        cpu.forward(*mixed)


def test_dense_random_supports_take_the_folded_path_in_float32_only(monkeypatch):
    """By the cost model (CPU rate), a 10% support at 512 tokens runs folded in float32
    (no CSR product) and on the CSR products in bf16."""
    monkeypatch.setattr(folded, "MODE", "auto")
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    crow, col, row = csr_from_flat(torch.randperm(64 * 64, generator=gen)[:410], 64, 64)
    calls = []
    real_csr = cpu._csr
    monkeypatch.setattr(cpu, "_csr", lambda *a: calls.append(1) or real_csr(*a))
    for dtype, csr_runs in ((torch.float32, False), (torch.bfloat16, True)):
        r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
        args = (r(512, 64), r(16, 64), r(64, 16), r(410), crow, col, row, r(64), 0.5)
        calls.clear()
        y = cpu.forward(*args)
        grads = cpu.backward(r(512, 64), *args[:7], 0.5)
        assert bool(calls) == csr_runs, dtype
        assert _rel(y, reference(*args)) < TOL[dtype] and all(torch.isfinite(t).all() for t in grads)


def test_no_dense_temporaries(monkeypatch):
    """Every strided tensor the CSR path makes is smaller than out x in (the CSR view of
    the support stores nnz values only)."""
    monkeypatch.setattr(folded, "MODE", "never")
    args, grad = _problem(torch.float32, 0.05, True, 11)
    out_f, in_f = args[2].shape[0], args[1].shape[1]
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            for t in (res if isinstance(res, (tuple, list)) else (res,)):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    seen.append(t.numel())
            return res
    x = torch.randn(2, in_f)
    with Spy():
        cpu.forward(x, *args[1:])
        cpu.backward(torch.randn(2, out_f), x, *args[1:7], args[8])
    assert seen and max(seen) < out_f * in_f


def _matches_without_csr(args, grad, dtype, seed, monkeypatch):
    """The CPU implementation on a structured support matches the reference, forward and
    backward, with contiguous gradients, and never runs a CSR product."""
    def no_csr(*_):
        raise AssertionError("a CSR product ran for a structured support")
    monkeypatch.setattr(cpu, "_csr", no_csr)
    y = cpu.forward(*args)
    assert y.dtype == dtype and _rel(y, reference(*args)) < TOL[dtype], f"seed {seed}"
    bargs = (grad, *args[:7], args[8])
    for name, a, b in zip(("dx", "dA", "dB", "dvalues"), cpu.backward(*bargs), reference_backward(*bargs)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous(), name
        assert _rel(a, b) < TOL[dtype], f"{name} (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_channel_supports_run_as_dense_gemms(dtype, bias, monkeypatch):
    """A channel-wise support (every row the same input channels) skips the CSR products."""
    from structrewrite.nn.sparse_lowrank import channel_flat
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    in_f, out_f, k = rnd.randint(8, 90), rnd.randint(5, 90), rnd.randint(1, 6)
    rank = rnd.randint(1, min(in_f, out_f))
    crow, col, row = csr_from_flat(channel_flat(torch.randperm(in_f, generator=g)[:k], out_f, in_f),
                                   out_f, in_f)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    args = (r(2, 7, in_f), r(rank, in_f), r(out_f, rank), r(col.numel()), crow, col, row,
            r(out_f) if bias else None, 32.0 / rank)
    grad = r(2, 7, out_f)

    _matches_without_csr(args, grad, dtype, seed, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b", [16, 32, 64])
@pytest.mark.parametrize("chunk", [1 << 24, 300])   # one token chunk, or many (bounded gathers)
def test_tile_supports_run_as_batched_gemms(dtype, b, chunk, monkeypatch):
    """A support of whole b x b tiles skips the CSR products: gathered column blocks times
    the tiles, batched, with widths that are not multiples of b (whole tiles only)."""
    from structrewrite.nn.sparse_lowrank import block_flat
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    in_f, out_f = rnd.randint(b, 3 * b + 7), rnd.randint(b, 3 * b + 7)
    whole = (out_f // b) * (in_f // b)
    tiles = torch.randperm(whole, generator=g)[:rnd.randint(1, whole)]
    crow, col, row = csr_from_flat(block_flat(tiles, in_f, b), out_f, in_f)
    rank = rnd.randint(1, min(in_f, out_f))
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    args = (r(3, rnd.randint(1, 40), in_f), r(rank, in_f), r(out_f, rank), r(col.numel()), crow, col,
            row, r(out_f) if rnd.random() < 0.5 else None, 32.0 / rank)
    grad = r(*args[0].shape[:-1], out_f)

    monkeypatch.setattr(cpu, "_TILE_CHUNK", chunk)
    _matches_without_csr(args, grad, dtype, seed, monkeypatch)


def test_tile_support_with_no_tokens():
    from structrewrite.nn.sparse_lowrank import block_flat
    crow, col, row = csr_from_flat(block_flat(torch.tensor([0, 3]), 40, 16), 40, 40)
    args = (torch.randn(0, 40), torch.randn(4, 40), torch.randn(40, 4), torch.randn(col.numel()),
            crow, col, row, None, 1.0)
    assert cpu.forward(*args).shape == (0, 40)
    dx, dA, dB, dv = cpu.backward(torch.randn(0, 40), *args[:7], 1.0)
    assert dx.shape == (0, 40) and float(dv.abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "random-folded", "channel", "tiles"])
def test_train_ops_keep_xa_and_match_the_reference(dtype, kind, monkeypatch):
    """``sparse_lowrank_linear_train`` on the CPU returns y and x Aᵀ; its backward, given
    that x Aᵀ, matches the reference and multiplies nothing by x from the left again."""
    from structrewrite.nn.sparse_lowrank import SparseLowRankLinear
    monkeypatch.setattr(folded, "MODE", "always" if kind == "random-folded" else "never")
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    rnd = random.Random(seed)
    in_f, out_f = rnd.randint(33, 47), rnd.randint(57, 70)
    layer = SparseLowRankLinear(in_f, out_f, rank=rnd.randint(2, 12), density=0.1,
                                init="lost" if kind == "channel" else "random",
                                block=16 if kind == "tiles" else 1, key=f"c{seed}", dtype=dtype)
    with torch.no_grad():
        layer.B.normal_()
    args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in (
        torch.randn(3, rnd.randint(1, 20), in_f, dtype=dtype), layer.A, layer.B, layer.values,
        layer.sparse_crow, layer.sparse_col, layer.sparse_row, layer.bias, layer.scale))
    x, A = args[0], args[1]
    g = torch.randn(*x.shape[:-1], out_f, dtype=dtype)
    y, xa = torch.ops.structrewrite.sparse_lowrank_linear_train(*args)
    assert xa.shape == (*x.shape[:-1], A.shape[0])
    assert _rel(y, reference(*args)) < TOL[dtype]
    assert _rel(xa, x.double() @ A.double().t()) < TOL[dtype]
    tokens, seen, real = x.numel() // in_f, [], torch.Tensor.__matmul__

    per = 16 // dtype.itemsize
    widths = (in_f, -(-in_f // per) * per)   # x, or x with rows padded to 16 bytes

    def spy(a, b):   # a product with an x-shaped left operand
        if a.dim() == 2 and a.shape[0] == tokens and a.shape[1] in widths:
            seen.append(tuple(b.shape))
        return real(a, b)
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    back = torch.ops.structrewrite.sparse_lowrank_linear_backward_train
    got = back(g, x, xa, *args[1:7], args[8])
    assert seen == [], f"x Aᵀ computed again: {seen}"
    if not (kind == "random-folded" and dtype == torch.float32):   # the spy sees a recompute
        torch.ops.structrewrite.sparse_lowrank_linear_backward(g, *args[:7], args[8])
        assert seen
    monkeypatch.undo()
    want = reference_backward(g, *args[:7], args[8])
    for name, a, b in zip(("dx", "dA", "dB", "dvalues"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel(a, b) < TOL[dtype], f"{name} (seed {seed}, {kind})"


def _strided(t):
    """The same elements as ``t``, as every other element of a tensor twice as long."""
    out = torch.empty(2 * t.numel(), dtype=t.dtype)[::2]
    out.copy_(t)
    return out


@pytest.mark.parametrize("fold", ["never", "always"])
def test_strided_values_bias_and_support_are_read_as_their_elements(fold, monkeypatch):
    """The CSR products are built on the index tensors as stored: strided views of the
    support (or of values and bias) compute what their elements say."""
    monkeypatch.setattr(folded, "MODE", fold)
    seed = random.randrange(2**31)
    args, g = _problem(torch.float32, 0.1, True, seed)
    x, A, B, v, crow, col, row, bias, scale = args
    views = (x, A, B, _strided(v), _strided(crow), _strided(col), _strided(row),
             _strided(bias), scale)
    assert not views[5].is_contiguous()
    assert _rel(cpu.forward(*views), reference(*args)) < 1e-5, seed
    for a, b in zip(cpu.backward(g, *views[:7], scale), reference_backward(g, *args[:7], scale)):
        assert _rel(a, b) < 1e-5, seed



FROZEN_KINDS = [("random", 1, "never"), ("random", 1, "always"), ("lost", 1, "never"),
                ("random", 16, "never")]


def _count_gemms(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::sampled_addmm")
    return sum(e.count for e in prof.key_averages() if e.key in names)


@pytest.mark.parametrize("init,block,fold", FROZEN_KINDS)
def test_frozen_inputs_get_no_gradient_and_their_products_are_skipped(init, block, fold, monkeypatch):
    """Every subset of x, A, B and values needing a gradient (the rest frozen), on the CPU
    implementation's paths (CSR products, folded, channel-wise GEMMs, tiles) in float64:
    the gradients asked for match the reference, the frozen inputs get none, and a
    frozen layer's backward (dx only) runs fewer products than a training one's."""
    from structrewrite.nn import SparseLowRankLinear
    monkeypatch.setattr(folded, "MODE", fold)
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    layer = SparseLowRankLinear(48, 40, rank=6, density=0.15, init=init, block=block,
                                key=f"c{seed}").double()
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 9, 48, dtype=torch.float64)
    g = torch.randn(2, 9, 40, dtype=torch.float64)
    args = (x, layer.A, layer.B, layer.values, layer.sparse_crow, layer.sparse_col,
            layer.sparse_row)
    want = reference_backward(g, *(t.detach() for t in args), layer.scale)
    inputs = [x, layer.A, layer.B, layer.values]
    for mask in range(1, 16):
        needs = [bool(mask >> i & 1) for i in range(4)]
        for t, n in zip(inputs, needs):
            t.requires_grad_(n)
            t.grad = None
        layer(x).backward(g)
        for t, n, w, name in zip(inputs, needs, want, ("dx", "dA", "dB", "dvalues")):
            if n:
                assert _rel(t.grad, w) < TOL[torch.float64], f"{name} {needs} (seed {seed})"
            else:
                assert t.grad is None, f"{name} {needs}"
    counts = []
    for needs in ([True] * 4, [True, False, False, False]):
        for t, n in zip(inputs, needs):
            t.requires_grad_(n)
        y = layer(x)
        counts.append(_count_gemms(lambda: y.backward(g)))
    assert counts[1] < counts[0], counts
