"""The eager autograd entry of the CUDA kernels (``EagerFunction``: no dispatcher, the
forward's x Aᵀ reused in the backward), run on the CPU by Triton's interpreter against
the reference implementation's gradients: every support kind (element-wise, channel-wise, tiles),
fp32 and bf16, fresh random data. Tolerances as in test_triton_sparse_lowrank.py."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from structrewrite.ops.sparse_lowrank_linear import reference, reference_backward  # noqa: E402
from structrewrite.codegen.triton import sparse_lowrank as sl  # noqa: E402
from structrewrite.nn.sparse_lowrank import SparseLowRankLinear  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (init, block, fold): element-wise (gather kernels), element-wise folded (W by chunks on
# GEMMs, sparse_lowrank_folded), channel-wise (GEMMs), 16 x 16 tiles
KINDS = [("random", 1, "never"), ("random", 1, "always"), ("lost", 1, "never"), ("random", 16, "never")]


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _layer(in_f, out_f, rank, density, **kw):
    """A layer with B drawn at random: it starts at 0 (SLTrain), which would leave the
    low-rank paths untested."""
    layer = SparseLowRankLinear(in_f, out_f, rank=rank, density=density, **kw)
    with torch.no_grad():
        layer.B.normal_()
    return layer


pytestmark = pytest.mark.usefixtures("small_tiles")   # tests/codegen/conftest.py


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init,block,fold", KINDS)
def test_eager_function_matches_the_reference(dtype, init, block, fold, monkeypatch):
    monkeypatch.setattr(sl.folded, "MODE", fold)
    if fold == "always":   # the gather kernels must not run
        def gather(*a, **k):
            raise AssertionError("gather kernels called on the folded path")
        monkeypatch.setattr(sl, "forward", gather)
        monkeypatch.setattr(sl, "backward", gather)
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    rnd = random.Random(seed)
    in_f, out_f = rnd.randint(33, 70), rnd.randint(33, 70)
    layer = SparseLowRankLinear(in_f, out_f, rank=rnd.randint(4, 16), density=0.12, init=init,
                                block=block, key=f"k{seed}", dtype=dtype)
    with torch.no_grad():
        layer.B.normal_()                       # B starts at 0 (SLTrain); make every path count
    x = torch.randn(rnd.randint(1, 2), rnd.randint(1, 30), in_f, dtype=dtype, requires_grad=True)
    g = torch.randn(*x.shape[:-1], out_f, dtype=dtype)
    params = [x, layer.A, layer.B, layer.values, layer.bias]
    args = (x, layer.A, layer.B, layer.values, layer.sparse_crow, layer.sparse_col,
            layer.sparse_row, layer.bias, layer.scale)
    y_ref = reference(*args)
    want = (*reference_backward(g, *args[:7], layer.scale), g.reshape(-1, out_f).sum(0))
    y = sl.eager(*args)
    got = torch.autograd.grad(y, params, g)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert _rel(y, y_ref) < TOL[dtype], f"y (seed {seed})"
    for name, a, b in zip(("dx", "dA", "dB", "dvalues", "dbias"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel(a, b) < TOL[dtype], f"{name} (seed {seed}, {init}, block {block})"


@pytest.mark.parametrize("init,block,fold", KINDS)
def test_eager_output_takes_in_place_changes(init, block, fold, monkeypatch):
    """``y += r`` on the eager entry's output (Falcon's decoder layer does so): the same
    gradients as ``y + r``, on every path (EagerFunction, the channel-wise GEMMs)."""
    monkeypatch.setattr(sl.folded, "MODE", fold)
    torch.manual_seed(random.randrange(2**31))
    layer = _layer(48, 40, 8, 0.12, init=init, block=block, key="k")
    x, r = torch.randn(2, 5, 48, requires_grad=True), torch.randn(2, 5, 40)
    params = [x, layer.A, layer.B, layer.values, layer.bias]
    args = (x, layer.A, layer.B, layer.values, layer.sparse_crow, layer.sparse_col,
            layer.sparse_row, layer.bias, layer.scale)
    y = sl.eager(*args)
    want = torch.autograd.grad(((y + r) * 2).square().sum(), params)
    y = sl.eager(*args)
    y += r
    y.mul_(2)
    got = torch.autograd.grad(y.square().sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_module_keeps_the_op_off_cuda_and_under_tracing():
    """On the CPU (and for fx proxies) the module calls the op, which tracing records."""
    layer = SparseLowRankLinear(32, 32, rank=4, density=0.1, key="t")
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(layer))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.structrewrite.sparse_lowrank_linear.default in targets or \
        torch.ops.structrewrite.sparse_lowrank_linear in targets


@pytest.mark.parametrize("init,block,fold", KINDS)
def test_eager_function_with_no_tokens(init, block, fold, monkeypatch):
    monkeypatch.setattr(sl.folded, "MODE", fold)
    layer = SparseLowRankLinear(40, 36, rank=4, density=0.12, init=init, block=block, key="z")
    x = torch.randn(2, 0, 40, requires_grad=True)
    args = (x, layer.A, layer.B, layer.values, layer.sparse_crow, layer.sparse_col,
            layer.sparse_row, layer.bias, layer.scale)
    y = sl.eager(*args)
    assert y.shape == (2, 0, 36)
    grads = torch.autograd.grad(y.sum(), [x, layer.A, layer.B, layer.values, layer.bias])
    assert grads[0].shape == x.shape
    assert all(float(g.abs().sum()) == 0.0 for g in grads[1:])


@pytest.mark.parametrize("init,block,kind", [("random", 1, "gather"), ("lost", 1, "channel"),
                                             ("random", 16, "block"), ("svd", 32, "block")])
def test_plan_is_made_once_per_support(init, block, kind):
    layer = SparseLowRankLinear(96, 64, rank=4, density=0.1, init=init, block=block, key="p")
    sup = (layer.sparse_crow, layer.sparse_col, layer.sparse_row)
    how = sl.plan(*sup, 64, 96)
    assert how.kind == kind
    assert sl.plan(*sup, 64, 96) is how                     # cached on the buffers
    if kind == "block":
        assert how.layout.b == block and how.layout.nt * block * block == layer.nnz
    if kind == "channel":
        assert how.cols.numel() * 64 == layer.nnz


def test_channel_support_runs_as_differentiable_gemms():
    """A channel-wise support's eager backward is autograd's own (no Python backward)."""
    layer = SparseLowRankLinear(48, 40, rank=4, density=0.1, init="lost", key="c")
    x = torch.randn(5, 48, requires_grad=True)
    y = sl.eager(x, layer.A, layer.B, layer.values, layer.sparse_crow, layer.sparse_col,
                 layer.sparse_row, layer.bias, layer.scale)
    assert "EagerFunction" not in type(y.grad_fn).__name__
    y2 = sl.eager(x, layer.A, layer.B, layer.values, layer.sparse_crow, layer.sparse_col,
                  layer.sparse_row, None, layer.scale)
    assert "EagerFunction" not in type(y2.grad_fn).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init,block,fold", KINDS)
def test_train_ops_of_the_cuda_implementation_match_the_reference(dtype, init, block, fold,
                                                                   monkeypatch):
    """The CUDA implementation of ``sparse_lowrank_linear_train`` (y and the x Aᵀ its
    forward kept) and of its backward (given that x Aᵀ), under the interpreter: every
    support kind against the reference op. The backward multiplies nothing by x from the
    left, where the plain backward computes x Aᵀ (or x A'ᵀ) again."""
    monkeypatch.setattr(sl.folded, "MODE", fold)
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    rnd = random.Random(seed)
    in_f, out_f = rnd.randint(33, 47), rnd.randint(57, 70)   # padded widths differ too
    layer = SparseLowRankLinear(in_f, out_f, rank=rnd.randint(4, 16), density=0.12, init=init,
                                block=block, key=f"t{seed}", dtype=dtype)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, rnd.randint(1, 30), in_f, dtype=dtype)
    g = torch.randn(*x.shape[:-1], out_f, dtype=dtype)
    A, B, v, b = layer.A.detach(), layer.B.detach(), layer.values.detach(), layer.bias.detach()
    sup = (layer.sparse_crow, layer.sparse_col, layer.sparse_row)
    y, xa = sl._forward_train_cuda(x, A, B, v, *sup, b, layer.scale)
    # the rank's width as the op's fake has it, also where the forward padded it
    assert xa.shape == (*x.shape[:-1], A.shape[0]) and xa.dtype == dtype and xa.is_contiguous()
    assert _rel(y, reference(x, A, B, v, *sup, b, layer.scale)) < TOL[dtype]
    assert _rel(xa, x.double() @ A.double().t()) < TOL[dtype]

    tokens = x.numel() // in_f
    x_products = []
    real = torch.Tensor.__matmul__

    per = 16 // dtype.itemsize
    widths = (in_f, -(-in_f // per) * per)   # x, or x with rows padded to 16 bytes

    def spy(a, b_):   # a product with an x-shaped left operand (x Aᵀ or x A'ᵀ)
        if a.dim() == 2 and a.shape[0] == tokens and a.shape[1] in widths:
            x_products.append(tuple(b_.shape))
        return real(a, b_)
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    got = sl._backward_train_cuda(g, x, xa, A, B, v, *sup, layer.scale)
    assert x_products == [], f"x Aᵀ computed again: {x_products}"
    if fold == "never":   # the spy sees the plain backward's recomputation
        sl._backward_cuda(g, x, A, B, v, *sup, layer.scale)
        assert x_products
    monkeypatch.undo()
    want = reference_backward(g, x, A, B, v, *sup, layer.scale)
    for name, a, b_ in zip(("dx", "dA", "dB", "dvalues"), got, want):
        assert a.shape == b_.shape and a.dtype == b_.dtype, name
        assert _rel(a, b_) < TOL[dtype], f"{name} (seed {seed}, {init}, block {block}, fold {fold})"


@pytest.mark.parametrize("init,block,fold", KINDS)
def test_cuda_implementation_takes_values_and_bias_in_their_own_dtype(init, block, fold,
                                                                      monkeypatch):
    """The op's values and bias are in the parameters' dtype, which need not be x's (float32
    values and bias beside bf16 x, A and B): every support kind computes in x's dtype and
    returns d values in theirs, as the reference does."""
    monkeypatch.setattr(sl.folded, "MODE", fold)
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    layer = _layer(45, 60, 8, 0.12, init=init, block=block, key=f"m{seed}")
    x = torch.randn(21, 45, dtype=torch.bfloat16)
    g = torch.randn(21, 60, dtype=torch.bfloat16)
    A, B = layer.A.detach().bfloat16(), layer.B.detach().bfloat16()
    v, b = layer.values.detach(), layer.bias.detach()               # float32
    sup = (layer.sparse_crow, layer.sparse_col, layer.sparse_row)
    y = sl._forward_cuda(x, A, B, v, *sup, b, layer.scale)
    assert y.dtype == torch.bfloat16
    assert _rel(y, reference(x, A, B, v, *sup, b, layer.scale)) < TOL[torch.bfloat16], seed
    got = sl._backward_cuda(g, x, A, B, v, *sup, layer.scale)
    want = reference_backward(g, x, A, B, v, *sup, layer.scale)
    for name, a, b_ in zip(("dx", "dA", "dB", "dvalues"), got, want):
        assert a.shape == b_.shape and a.dtype == b_.dtype, name
        assert _rel(a, b_) < TOL[torch.bfloat16], f"{name} (seed {seed}, {init}, block {block})"


def _args(layer, x, values=None, bias=None):
    return (x, layer.A, layer.B, layer.values if values is None else values, layer.sparse_crow,
            layer.sparse_col, layer.sparse_row, layer.bias if bias is None else bias, layer.scale)


@pytest.mark.parametrize("init,block,fold", KINDS)
def test_strided_values_and_bias_are_read_as_their_elements(init, block, fold, monkeypatch):
    """The kernels index values and bias by position: a strided view of either (every
    other element of a longer tensor; a bias expanded from one number) computes what its
    elements say, in the eager entry and in the op's CUDA implementation."""
    monkeypatch.setattr(sl.folded, "MODE", fold)
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    layer = _layer(48, 40, 4, 0.1, init=init, block=block, key="s")
    values = torch.randn(2 * layer.nnz)[::2].requires_grad_()
    bias = torch.randn(1).expand(40)
    x = torch.randn(5, 48, requires_grad=True)
    g = torch.randn(5, 40)
    args = _args(layer, x, values, bias)
    want = (reference(*args), *reference_backward(g, *args[:7], layer.scale))
    y = sl.eager(*args)
    got = (y, *torch.autograd.grad(y, [x, layer.A, layer.B, values], g))
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues"), got, want):
        assert _rel(a, b) < 1e-5, f"eager {name} (seed {seed})"
    y = sl._forward_cuda(*args)
    assert _rel(y, want[0]) < 1e-5, f"op y (seed {seed})"
    for name, a, b in zip(("dx", "dA", "dB", "dvalues"),
                          sl._backward_cuda(g, *args[:7], layer.scale), want[1:]):
        assert _rel(a, b) < 1e-5, f"op {name} (seed {seed})"


def test_channel_support_edge_scales_and_dtypes():
    """Channel-wise supports (GEMMs on widened operands): the eager entry takes values and
    bias in another dtype than x, as the op does; a scale of 0 (alpha 0) leaves x Sᵀ +
    bias; in float16 the input channels are not multiplied by 1/s on the way (large
    inputs times 1/s overflowed float16)."""
    torch.manual_seed(0)
    layer = SparseLowRankLinear(48, 40, rank=4, density=0.1, init="lost", key="c")
    x = torch.randn(5, 48)
    A, B = layer.A.detach().bfloat16(), layer.B.detach().bfloat16()
    args = (x.bfloat16(), A, B, layer.values.detach(), *_args(layer, x)[4:7], layer.bias.detach(),
            layer.scale)
    assert _rel(sl.eager(*args), reference(*args)) < 1e-2
    args = _args(layer, x)[:8] + (0.0,)
    for fn in (sl.eager, sl._forward_cuda):
        assert _rel(fn(*args), reference(*args)) < 1e-5
    big = SparseLowRankLinear(64, 64, rank=64, density=0.1, alpha=1.0, init="lost", key="f",
                              dtype=torch.float16)       # s = 1/64, exact in float16
    with torch.no_grad():
        big.B.normal_()
    xb = torch.full((3, 64), 1500.0, dtype=torch.float16)
    args = _args(big, xb)
    want = reference(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                       else a for a in args))
    for fn in (sl.eager, sl._forward_cuda):
        y = fn(*args)
        assert bool(torch.isfinite(y).all()) and _rel(y, want) < 1e-2


def test_segments_are_kept_per_chunk_width():
    """Two chunk widths that give as many chunks (60 features: 48 and 32 wide give 2) have
    their own offsets: a forward with one must not hand its offsets to the other."""
    layer = SparseLowRankLinear(60, 30, rank=4, density=0.2, key="w")
    sup = (layer.sparse_crow, layer.sparse_col, layer.sparse_row)
    first = sl.segments(*sup, 60, 48).clone()
    second = sl.segments(*sup, 60, 32)
    fresh = sl.segments(*(t.clone() for t in sup), 60, 32)
    assert torch.equal(second, fresh) and not torch.equal(first, second)


@pytest.mark.parametrize("init,block,fold", KINDS)
def test_float64_layers_compute_in_float64(init, block, fold, monkeypatch):
    """The gather and tile kernels accumulate in float32: a float64 layer takes the folded
    path (float64 GEMMs) or, channel-wise, its float64 GEMMs, and matches the float64
    specification to rounding, forward and backward."""
    monkeypatch.setattr(sl.folded, "MODE", fold)
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    layer = SparseLowRankLinear(50, 36, rank=5, density=0.12, init=init, block=block,
                                key="d", dtype=torch.float64)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 7, 50, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, 36, dtype=torch.float64)
    args = _args(layer, x)
    want = (reference(*args), *reference_backward(g, *args[:7], layer.scale))
    y = sl.eager(*args)
    got = (y, *torch.autograd.grad(y, [x, layer.A, layer.B, layer.values], g))
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues"), got, want):
        assert _rel(a, b) < 1e-12, f"{name} (seed {seed})"
    assert _rel(sl._forward_cuda(*args), want[0]) < 1e-12


class _OnDevice:
    """Stands for a tensor on ``cuda:index`` (only its device is read by the guard)."""
    def __init__(self, index):
        self.device = torch.device("cuda", index)


def test_cuda_entries_run_on_their_first_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every CUDA entry (the four registered
    kernels and the eager one) makes its first tensor's device current for the call, and
    leaves the current device alone where it is that device already. The device calls are
    recorded here (no GPU needed); tests/flows/test_devices.py runs the real thing on two
    GPUs."""
    current, entered = [0], []

    class device:   # torch.cuda.device as a recorder
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)
            self.old, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.old

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []

    def body(*args, **kwargs):
        seen.append(current[0])
        return ("done",) * 4

    registered = {}
    monkeypatch.setattr(torch.library, "register_kernel",
                        lambda op, dev, fn: registered.setdefault(op, fn))
    for name in ("_forward_cuda", "_backward_op_cuda", "_forward_train_cuda", "_backward_train_cuda"):
        monkeypatch.setattr(sl, name, body)
    assert sorted(sl.register()) == sorted(registered)
    entries = list(registered.values())
    assert len(entries) == 4
    for fn in entries:
        seen.clear(), entered.clear()
        assert fn(_OnDevice(1), _OnDevice(1)) == ("done",) * 4
        assert seen == [1] and entered == [1] and current[0] == 0
        seen.clear(), entered.clear()
        assert fn(_OnDevice(0)) == ("done",) * 4
        assert seen == [0] and entered == []
    # the layer's eager entry (``eager``): its first step runs with cuda:1 current
    class Reached(Exception):
        pass

    def first_step(*args):
        seen.append(current[0])
        raise Reached
    monkeypatch.setattr(sl, "contiguous", first_step)
    seen.clear()
    with pytest.raises(Reached):
        sl.eager(_OnDevice(1), *[None] * 7, 1.0)
    assert seen == [1] and current[0] == 0


# (x, A, B, values): which need gradients; the others frozen (requires_grad False)
SUBSETS = [(True, False, False, False), (False, True, True, True), (False, False, False, True),
           (True, False, False, True), (False, True, False, False), (False, False, True, False)]


@pytest.mark.parametrize("needs", SUBSETS, ids=lambda n: "".join("xABv"[i] for i in range(4) if n[i]))
@pytest.mark.parametrize("init,block,fold", KINDS)
def test_frozen_inputs_get_no_gradient_and_the_rest_are_right(init, block, fold, needs, monkeypatch):
    """A layer with some of x, A, B and values frozen: the eager entry and the op's CUDA
    implementation compute the gradients asked for (against the reference, float32) and
    nothing for the others (None); the sparse d values kernels do not run where the
    values are frozen."""
    monkeypatch.setattr(sl.folded, "MODE", fold)
    from structrewrite.codegen.triton import sparse_lowrank_block as blk
    if not needs[3]:
        def no_dv(*a, **k):
            raise AssertionError("d values computed for frozen values")
        monkeypatch.setattr(sl, "sddmm", no_dv)
        monkeypatch.setattr(blk, "bsr_sddmm", no_dv)
        spmm = blk.bsr_spmm

        def spmm_no_dv(*a, **k):
            assert k.get("dv") is None, "d values fused into dx for frozen values"
            return spmm(*a, **k)
        monkeypatch.setattr(blk, "bsr_spmm", spmm_no_dv)
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    layer = _layer(45, 60, 8, 0.12, init=init, block=block, key=f"f{seed}")
    x = torch.randn(3, 7, 45)
    g = torch.randn(3, 7, 60)
    args = _args(layer, x)
    want = reference_backward(g, *args[:7], layer.scale)
    inputs = [x, layer.A, layer.B, layer.values]
    for t, n in zip(inputs, needs):
        t.requires_grad_(n)
    layer.bias.requires_grad_(False)
    asked = [t for t, n in zip(inputs, needs) if n]
    got = dict(zip([i for i in range(4) if needs[i]], torch.autograd.grad(sl.eager(*args), asked, g)))
    for i, name in enumerate(("dx", "dA", "dB", "dvalues")):
        if needs[i]:
            assert _rel(got[i], want[i]) < 1e-5, f"eager {name} (seed {seed})"
    grads = sl._backward_cuda(g, *(t.detach() for t in args[:7]), layer.scale, need=needs)
    for i, name in enumerate(("dx", "dA", "dB", "dvalues")):
        if needs[i]:
            assert _rel(grads[i], want[i]) < 1e-5, f"op {name} (seed {seed})"
        else:
            assert grads[i] is None, name
    y = sl.eager(*args)
    y.backward(g)
    assert all(t.grad is None for t, n in zip(inputs, needs) if not n)
    assert layer.bias.grad is None


@pytest.mark.parametrize("init,block,fold", KINDS)
def test_second_derivatives_are_refused_or_right(init, block, fold, monkeypatch):
    """create_graph=True, then a gradient of the gradient: the kernels' outputs carry no
    autograd history, so under create_graph the eager entry's backward goes through the
    backward op, whose node refuses the second backward, also where autograd would
    otherwise prune a node off the path (``hvp``, ``allow_unused``: zeros before);
    channel-wise supports run as plain differentiable GEMMs (pads included,
    ``aligned._CopyCols``) and give the second derivative of the dense formula."""
    monkeypatch.setattr(sl.folded, "MODE", fold)
    torch.manual_seed(random.randrange(2**31))
    layer = _layer(45, 60, 8, 0.12, init=init, block=block, key="d")
    x = torch.randn(5, 45, requires_grad=True)
    args = _args(layer, x)
    (gx,) = torch.autograd.grad(sl.eager(*args).square().sum(), x, create_graph=True)
    W = layer.dense_weight()
    x2 = x.detach().clone().requires_grad_(True)
    (gref,) = torch.autograd.grad((x2 @ W.t() + layer.bias).square().sum(), x2, create_graph=True)
    assert _rel(gx, gref) < 1e-5
    if init != "lost":
        with pytest.raises(NotImplementedError, match="has no second derivative"):
            torch.autograd.grad(gx.square().sum(), x, allow_unused=True)
        with pytest.raises(NotImplementedError, match="has no second derivative"):
            torch.autograd.functional.hvp(lambda t: sl.eager(*_args(layer, t)).tanh().sum(),
                                          x.detach(), torch.randn(5, 45))
        return
    (ggA,) = torch.autograd.grad(gx.square().sum(), layer.A)
    A = layer.A.detach().clone().requires_grad_(True)
    Wd = layer.scale * layer.B.detach() @ A + (W - layer.scale * layer.B.detach() @ layer.A.detach())
    (g2,) = torch.autograd.grad((x2 @ Wd.t() + layer.bias).square().sum(), x2, create_graph=True)
    (want,) = torch.autograd.grad(g2.square().sum(), A)
    assert _rel(ggA, want) < 1e-4


def _saved_shapes(fn, x):
    """Shapes of the floating tensors autograd keeps for ``fn(x)``'s backward, and the bytes
    each holds under a saved-tensor hook that copies what it packs (as ``save_on_cpu`` and
    casting hooks do: a copy of a zero-stride stand-in is a full tensor)."""
    shapes = []

    def pack(t):
        t = t.clone()
        if t.is_floating_point():
            shapes.append((tuple(t.shape), t.untyped_storage().nbytes()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    y.sum().backward()
    return shapes


@pytest.mark.parametrize("init,block,fold", KINDS)
def test_a_frozen_layer_keeps_no_activation(init, block, fold, monkeypatch):
    """A frozen layer (A, B and values without gradients) computes only dx, which reads
    neither x nor x Aᵀ: the eager entry, the op and its compiled training form keep no
    tensor of the tokens' size (none at all: the backward makes a stand-in), as a frozen
    nn.Linear keeps none (they kept x, and x Aᵀ compiled: an input-sized activation per
    frozen layer beside adapters). The gradient of x stays right."""
    monkeypatch.setattr(sl.folded, "MODE", fold)
    layer = _layer(64, 96, 8, 0.1, init=init, block=block, key="z")
    layer.requires_grad_(False)
    M = 777
    x = torch.randn(M, 64, requires_grad=True)
    entries = {"eager": lambda t: sl.eager(*_args(layer, t)),
               "op": lambda t: torch.ops.structrewrite.sparse_lowrank_linear(*_args(layer, t)),
               "op_train": lambda t: torch.ops.structrewrite.sparse_lowrank_linear_train(
                   *_args(layer, t))[0]}
    want = torch.autograd.grad((x @ layer.dense_weight().t() + layer.bias).sum(), x)[0]
    for name, fn in entries.items():
        x.grad = None
        kept = _saved_shapes(fn, x)
        assert not any(M in shape and nbytes > 64 for shape, nbytes in kept), (name, kept)
        assert _rel(x.grad, want) < 1e-5, name
