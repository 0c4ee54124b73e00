"""Autocast: the layer computes in the autocast dtype (it casts its inputs), and every
implementation of the op computes in its inputs' dtype with autocast off inside. Without
that, CPU autocast sent bf16 operands to PyTorch's CSR products (no bf16 kernel: the
layer failed), and the CUDA implementation's cuBLAS GEMMs ran in bf16 next to float32
Triton kernels. Fresh random inputs; the CUDA implementation under the interpreter."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import structrewrite  # noqa: E402,F401
from structrewrite.nn.sparse_lowrank import SparseLowRankLinear  # noqa: E402
from structrewrite.ops.sparse_lowrank_linear import (autocast_off, reference,  # noqa: E402
                                                     reference_backward)

KINDS = [("random", 1), ("lost", 1), ("random", 16)]


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _layer(init, block, seed):
    layer = SparseLowRankLinear(64, 48, rank=8, density=0.1, init=init, block=block, key=f"k{seed}")
    with torch.no_grad():
        layer.B.normal_()
    return layer


@pytest.mark.parametrize("init,block", KINDS)
def test_layer_under_cpu_autocast_computes_in_bf16(init, block):
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    layer = _layer(init, block, seed)
    x = torch.randn(3, 7, 64, requires_grad=True)
    g = torch.randn(3, 7, 48)
    params = [x, layer.A, layer.B, layer.values, layer.bias]
    want_y = layer(x)
    want = torch.autograd.grad(want_y, params, g)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    got = torch.autograd.grad(y, params, g.bfloat16())
    assert _rel(y, want_y) < 2e-2, f"y (seed {seed})"
    for name, a, b in zip(("dx", "dA", "dB", "dvalues", "dbias"), got, want):
        assert a.dtype == torch.float32, name        # parameters and input stay float32
        assert _rel(a, b) < 3e-2, f"{name} (seed {seed})"


@pytest.mark.parametrize("init,block", KINDS)
def test_a_float64_layer_under_autocast_stays_float64(init, block):
    """Autocast leaves float64 operands alone (as for nn.Linear): a float64 layer keeps
    computing in float64, and its output feeds a float64 nn.Linear under autocast."""
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    layer = _layer(init, block, seed).double()
    head = torch.nn.Linear(48, 5).double()
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    want = layer(x)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
        out = head(y)
    assert y.dtype == out.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize("init,block", KINDS)
def test_cuda_implementation_ignores_autocast(small_tiles, init, block):
    """The CUDA implementation as registered (under ``autocast_off``) computes float32
    inputs in float32 inside an autocast region."""
    from structrewrite.codegen.triton import sparse_lowrank as sl
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    layer = _layer(init, block, seed)
    args = [t.detach() if isinstance(t, torch.Tensor) else t for t in
            (torch.randn(9, 64), layer.A, layer.B, layer.values, layer.sparse_crow,
             layer.sparse_col, layer.sparse_row, layer.bias, layer.scale)]
    g = torch.randn(9, 48)
    with torch.autocast("cpu", torch.bfloat16):
        y = autocast_off(sl._forward_cuda)(*args)
        grads = autocast_off(sl._backward_cuda)(g, *args[:7], layer.scale)
    assert y.dtype == torch.float32 and _rel(y, reference(*args)) < 1e-5
    for a, b in zip(grads, reference_backward(g, *args[:7], layer.scale)):
        assert a.dtype == torch.float32 and _rel(a, b) < 1e-5


@pytest.mark.parametrize("init,block", KINDS)
def test_the_op_casts_for_autocast_where_the_layer_is_traced(init, block):
    """An exported program (the layer traced on fake tensors, in float32) run under
    autocast: the op's own autocast kernel casts its operands as the layer does eagerly,
    so the result is the eager layer's, in bf16, beside a dense layer that autocast
    turned bf16 too (which failed on mixed dtypes before)."""
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), _layer(init, block, seed)).eval()
    x = torch.randn(3, 5, 64)
    ep = torch.export.export(net, (x,))
    with torch.autocast("cpu", torch.bfloat16):
        want = net(x)
        got = ep.module()(x)
        alone = torch.export.export(net[1], (x,)).module()(x)
    assert want.dtype == got.dtype == alone.dtype == torch.bfloat16
    assert _rel(got, want) < 1e-2, f"seed {seed}"
    with torch.autocast("cpu", torch.bfloat16):
        assert _rel(alone, net[1](x)) < 1e-2, f"seed {seed}"
    x64 = x.double()
    with torch.autocast("cpu", torch.bfloat16):   # float64 operands are left alone
        assert torch.export.export(net[1].double(), (x64,)).module()(x64).dtype == torch.float64
