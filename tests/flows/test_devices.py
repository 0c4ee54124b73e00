"""A layer on a GPU other than the current one (a model spread over GPUs, as HF's
``device_map`` spreads it): the Triton kernels must run on the layer's device.

Runs on a machine with two or more CUDA devices (``pytest tests/flows``); skipped
elsewhere. ``cuda:0`` is current throughout, the layers live on ``cuda:1``."""
import pytest
import torch

from structrewrite.codegen.triton import sparse_lowrank_folded as folded
from structrewrite.nn import SparseLowRankLinear

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

# support kind -> layer arguments, and the element-wise path (folded or gather kernels)
KINDS = {"random-folded": ({"init": "random"}, "always"),
         "random-gathers": ({"init": "random"}, "never"),
         "channel": ({"init": "lost"}, "auto"),
         "block32": ({"init": "random", "block": 32}, "auto")}
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _reference(layer, x, g):
    """y and every gradient of ``layer`` in float64 on the CPU."""
    ref = SparseLowRankLinear(layer.in_features, layer.out_features, layer.rank, layer.density,
                              init=layer.init, block=layer.block).double()
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v
                         for k, v in layer.state_dict().items()})
    x = x.detach().cpu().double().requires_grad_()
    y = ref(x)
    y.backward(g.cpu().double())
    return y, x.grad, {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("through", ["eager", "op"])
def test_a_layer_on_the_second_gpu(kind, dtype, through):
    spec, fold = KINDS[kind]
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    torch.manual_seed(0)
    layer = SparseLowRankLinear(256, 384, 32, 0.05, **spec).to(dev, dtype)
    with torch.no_grad():
        layer.B.normal_(0, 0.05)   # B starts at 0: make the low-rank part count
    x = torch.randn(300, 256, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(300, 384, device=dev, dtype=dtype)
    with folded.forced(fold):
        if through == "eager":
            y = layer(x)
        else:   # the op through the dispatcher, as torch.compile and export call it
            y = torch.ops.structrewrite.sparse_lowrank_linear(
                x, layer.A, layer.B, layer.values, layer.sparse_crow, layer.sparse_col,
                layer.sparse_row, layer.bias, layer.scale)
        y.backward(g)
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0
    assert y.device == dev and x.grad.device == dev
    want_y, want_dx, want = _reference(layer, x, g)
    tol = TOL[dtype]
    assert _rel(y, want_y) < tol
    assert _rel(x.grad, want_dx) < tol
    for name, p in layer.named_parameters():
        assert p.grad.device == dev
        assert _rel(p.grad, want[name]) < tol, name


def test_a_model_spread_over_two_gpus_trains_compiled():
    """Two layers, one per GPU, compiled by Inductor: the same gradients as eagerly."""
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    first = SparseLowRankLinear(128, 256, 16, 0.05, init="random", block=16).to("cuda:0")
    second = SparseLowRankLinear(256, 128, 16, 0.05, init="random").to("cuda:1")
    for layer in (first, second):
        with torch.no_grad():
            layer.B.normal_(0, 0.05)

    def run(x):
        return second(first(x).relu().to("cuda:1")).square().mean()

    x = torch.randn(64, 128, device="cuda:0")
    grads = []
    for fn in (run, torch.compile(run)):
        for layer in (first, second):
            layer.zero_grad(set_to_none=True)
        fn(x).backward()
        grads.append([p.grad.clone() for layer in (first, second) for p in layer.parameters()])
    for eager, compiled in zip(*grads):
        assert _rel(compiled, eager.to(compiled.device)) < 1e-4
