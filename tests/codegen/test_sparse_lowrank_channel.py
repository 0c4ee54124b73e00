"""The channel-structured path of the op's CUDA implementation (dense GEMMs only),
run on the CPU against the reference op: fp64, fp32 and bf16, fresh random inputs."""
import math

import pytest
import torch

import structrewrite  # noqa: F401
from structrewrite.codegen.triton import sparse_lowrank_channel as ch
from structrewrite.nn.sparse_lowrank import channel_flat, csr_from_flat

from structrewrite.ops.sparse_lowrank_linear import reference as op  # noqa: E402
from structrewrite.ops.sparse_lowrank_linear import reference_backward as op_bwd  # noqa: E402
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def channel_support(out_f, in_f, k, gen):
    cols = torch.randperm(in_f, generator=gen)[:k]
    flat = channel_flat(cols, out_f, in_f)
    return csr_from_flat(flat, out_f, in_f)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("alpha", [32.0, 3.0])   # 1/s a power of two at ranks 8 and 16 (s on the GEMMs' alpha), or not (s on B)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
# M = 1 and 16: the direct products (ch.DIRECT_TOKENS) where no ``saved`` list is given;
# 17 and more: the widened GEMMs
@pytest.mark.parametrize("M, in_f, out_f, rank, k", [(37, 48, 29, 8, 5), (1, 33, 70, 16, 1),
                                                     (64, 40, 40, 20, 12), (16, 40, 40, 20, 12),
                                                     (17, 40, 40, 20, 12)])
def test_channel_path_matches_the_reference(dtype, bias, M, in_f, out_f, rank, k, alpha):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    crow, col, row = channel_support(out_f, in_f, k, gen)
    cols = ch.channel_columns(crow, col, out_f)
    assert cols is not None and cols.numel() == k
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    A = (torch.randn(rank, in_f, generator=gen) / in_f ** 0.5).to(dtype)
    B = (torch.randn(out_f, rank, generator=gen) / rank ** 0.5).to(dtype)
    v = torch.randn(out_f * k, generator=gen).to(dtype)
    b = torch.randn(out_f, generator=gen).to(dtype) if bias else None
    g = torch.randn(M, out_f, generator=gen).to(dtype)
    scale = alpha / rank
    assert (ch.split_scale(scale, dtype)[0] == scale) == (math.frexp(rank / alpha)[0] == 0.5)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    y_ref = op(up(x), up(A), up(B), up(v), crow, col, row, up(b), scale)
    grads_ref = op_bwd(up(g), up(x), up(A), up(B), up(v), crow, col, row, scale)
    y = ch.forward(x, A, B, v, cols, b, scale)
    assert y.dtype == dtype and y.shape == (M, out_f)
    assert rel(y, y_ref) < TOL[dtype]
    assert ch.takes_direct(x, in_f) == (M <= ch.DIRECT_TOKENS)
    saved: list = []
    ch.forward(x, A, B, v, cols, b, scale, saved=saved)
    assert len(saved) == 4   # what the backward takes: the widened path, at any M
    for grads in (ch.backward(g, x, A, B, v, cols, scale),                 # recomputed
                  ch.backward(g, x, A, B, v, cols, scale, saved=saved)):   # from the forward
        for got, want in zip(grads, grads_ref):
            assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
            assert rel(got, want) < TOL[dtype]
    # the eager entry (plain differentiable GEMMs, s on B) computes the same
    leaves = [t.clone().requires_grad_() for t in (x, A, B, v)]
    y_eager = ch.differentiable(*leaves, cols, b, scale)
    assert rel(y_eager, y_ref) < TOL[dtype]
    for got, want in zip(torch.autograd.grad(y_eager, leaves, g), grads_ref):
        assert rel(got, want) < TOL[dtype]


def test_scale_rides_on_the_gemm_alpha_only_where_input_channels_stay_exact():
    """s moves off B only where x·(1/s) is exact and fits: 1/s a power of two (1/3 or 257/32
    would round each input channel once more), not in float16 (large inputs times 1/s
    overflow), not at s = 0."""
    assert ch.split_scale(1 / 16, torch.bfloat16) == (1 / 16, 1.0, 16.0)
    assert ch.split_scale(0.5, torch.float64) == (0.5, 1.0, 2.0)
    assert ch.split_scale(32 / 1024, torch.float32) == (32 / 1024, 1.0, 32.0)
    for s, dtype in ((3 / 8, torch.float32), (32 / 257, torch.float32), (1 / 3, torch.bfloat16),
                     (0.001, torch.float64), (0.5, torch.float16), (0.0, torch.bfloat16)):
        assert ch.split_scale(s, dtype) == (1.0, s, 1.0), (s, dtype)


def test_detection_refuses_unstructured_supports_and_follows_updates():
    gen = torch.Generator().manual_seed(0)
    crow, col, row = csr_from_flat(torch.randperm(40 * 30, generator=gen)[:120], 40, 30)
    assert ch.channel_columns(crow, col, 40) is None            # random support
    crow, col, row = channel_support(40, 30, 3, gen)
    assert ch.channel_columns(crow, col, 40) is not None
    col[5] = (col[5] + 1) % 30                                   # one row differs now
    assert ch.channel_columns(crow, col, 40) is None             # the version changed: re-detected
    crow0, col0, _ = csr_from_flat(torch.empty(0, dtype=torch.int64), 40, 30)
    assert ch.channel_columns(crow0, col0, 40) is None           # empty support
