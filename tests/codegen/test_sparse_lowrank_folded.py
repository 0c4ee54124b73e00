"""The folded path of the op's CUDA implementation (W built a chunk at a time, cuBLAS
products; plain torch), run on the CPU against the reference op: fp64, fp32 and bf16,
fresh random inputs, misaligned widths, several chunks each way, outputs poisoned with
NaN so that an unwritten element fails. Tolerances as relative Frobenius error against
the float64 reference: fp64 1e-12, fp32 1e-5, bf16 1e-2."""
import pytest
import torch

import structrewrite  # noqa: F401
from structrewrite.codegen.triton import sparse_lowrank_folded as fold
from structrewrite.nn.sparse_lowrank import csr_from_flat
from structrewrite.ops.sparse_lowrank_linear import reference as op
from structrewrite.ops.sparse_lowrank_linear import reference_backward as op_bwd

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(fold, "_empty", lambda s, dt, dev: torch.full(s, float("nan"), dtype=dt, device=dev))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_elems", [1 << 22, 64 * 80])   # one chunk each way, or several
@pytest.mark.parametrize("M, in_f, out_f, rank, density",
                         [(37, 131, 203, 16, 0.05), (1, 64, 200, 8, 0.1), (50, 257, 130, 64, 0.0),
                          (29, 96, 136, 13, 0.05)])   # a misaligned rank, padded
def test_folded_path_matches_the_reference(dtype, bias, chunk_elems, M, in_f, out_f, rank, density,
                                           monkeypatch):
    monkeypatch.setattr(fold, "CHUNK_ELEMS", chunk_elems)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    nnz = int(density * in_f * out_f)
    crow, col, row = csr_from_flat(torch.randperm(in_f * out_f, generator=gen)[:nnz], out_f, in_f)
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    A = (torch.randn(rank, in_f, generator=gen) / in_f ** 0.5).to(dtype)
    B = (torch.randn(out_f, rank, generator=gen) / rank ** 0.5).to(dtype)
    v = torch.randn(nnz, generator=gen).to(dtype)
    b = torch.randn(out_f, generator=gen).to(dtype) if bias else None
    g = torch.randn(M, out_f, generator=gen).to(dtype)
    scale = 0.37
    up = lambda t: None if t is None else t.double()  # noqa: E731
    y_ref = op(up(x), up(A), up(B), up(v), crow, col, row, up(b), scale)
    grads_ref = op_bwd(up(g), up(x), up(A), up(B), up(v), crow, col, row, scale)
    in_p, out_p = fold.aligned.widths(A, B, dtype)
    lay = fold.layout(crow, col, row, out_f, in_f, in_p, out_p)
    if chunk_elems < in_p * out_p:   # several chunks of rows (64 each), columns for dx
        assert len(lay.rows) > 1 and lay.cols is not None
    else:                            # one chunk: the backward builds W as the forward does
        assert len(lay.rows) == 1 and lay.cols is None
    y = fold.forward(x, A, B, v, crow, col, row, b, scale)
    assert y.dtype == dtype and y.shape == (M, out_f) and y.is_contiguous()
    assert rel(y, y_ref) < TOL[dtype]
    for got, want in zip(fold.backward(g, x, A, B, v, crow, col, row, scale), grads_ref):
        assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
        assert torch.isfinite(got).all()
        assert rel(got, want) < TOL[dtype]


def test_cost_model_folds_dense_random_supports_at_many_tokens_only(monkeypatch):
    monkeypatch.setattr(fold, "MODE", "auto")
    cuda = "cuda"
    # SLTrain's setting at 4096 x 4096, rank in/4, 3%: folded at 16k tokens
    assert fold.pays(16384, 4096, 4096, 1024, int(0.03 * 4096 * 4096), cuda)
    # a sparser support, or decoding a few tokens, stays on the gathers
    assert not fold.pays(16384, 4096, 4096, 1024, int(0.002 * 4096 * 4096), cuda)
    assert not fold.pays(8, 4096, 4096, 1024, int(0.03 * 4096 * 4096), cuda)
    assert not fold.pays(16384, 4096, 4096, 1024, 0, cuda)
    # no measured rate: never
    assert not fold.pays(16384, 4096, 4096, 1024, int(0.03 * 4096 * 4096), None)
    monkeypatch.setattr(fold, "MODE", "never")
    assert not fold.pays(16384, 4096, 4096, 1024, int(0.03 * 4096 * 4096), cuda)
    monkeypatch.setattr(fold, "MODE", "always")
    assert fold.pays(8, 64, 64, 8, 1, "cpu")


@pytest.mark.parametrize("compiled", [False, True])
def test_layer_on_the_folded_path_trains_eagerly_and_compiled(compiled, monkeypatch):
    """A float32 layer whose op takes the folded path on the CPU (forced), called eagerly
    and under torch.compile (AOTAutograd; the op opaque): output and every gradient match
    the float64 reference."""
    from structrewrite.nn.sparse_lowrank import SparseLowRankLinear
    from structrewrite.codegen.cpu import sparse_lowrank as cpu
    monkeypatch.setattr(fold, "MODE", "always")

    def no_csr(*_):
        raise AssertionError("the CSR products ran on the folded path")
    monkeypatch.setattr(cpu, "_csr", no_csr)
    torch.manual_seed(torch.seed() % 2**31)
    layer = SparseLowRankLinear(70, 45, rank=12, density=0.08, init="random", key="fold")
    with torch.no_grad():
        layer.B.normal_()
    run = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
    x = torch.randn(3, 11, 70, requires_grad=True)
    g = torch.randn(3, 11, 45)
    params = [x, layer.A, layer.B, layer.values, layer.bias]
    got = torch.autograd.grad(run(x), params, g)
    args = [t.detach().double() for t in (x, layer.A, layer.B, layer.values)]
    sup = (layer.sparse_crow, layer.sparse_col, layer.sparse_row)
    y_ref = op(*args, *sup, layer.bias.detach().double(), layer.scale)
    want = (*op_bwd(g.double(), *args, *sup, layer.scale), g.double().reshape(-1, 45).sum(0))
    assert rel(run(x), y_ref) < TOL[torch.float32]
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel(a, b) < TOL[torch.float32]
