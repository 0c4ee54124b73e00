"""Widths that are not a multiple of 16 bytes: the CUDA implementations pad the cuBLAS
operands (``codegen/triton/aligned.py``) and must still compute the op exactly, with
contiguous outputs of the real width. Every support kind, both entries (the op's
implementation and the eager one), fp32 and bf16, under Triton's CPU interpreter."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

pytest.importorskip("triton")

from structrewrite.codegen.triton import aligned  # noqa: E402
from structrewrite.codegen.triton import sparse_lowrank as sl  # noqa: E402
from structrewrite.codegen.triton import sparse_lowrank_block as blk  # noqa: E402
from structrewrite.nn.sparse_lowrank import SparseLowRankLinear  # noqa: E402
from structrewrite.ops.sparse_lowrank_linear import reference, reference_backward  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
KINDS = [("random", 1), ("lost", 1), ("random", 16)]
# (in, out, rank): aligned for both dtypes; misaligned in; misaligned out; both
# misaligned; a misaligned rank alone, and with every width misaligned
WIDTHS = [(64, 48, 8), (53, 48, 8), (64, 61, 8), (50, 70, 8), (64, 48, 13), (53, 61, 13)]


@pytest.fixture(autouse=True)
def small_tiles_and_poison(small_tiles, monkeypatch):
    nan = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)  # noqa: E731
    monkeypatch.setattr(sl, "_empty", nan)
    monkeypatch.setattr(blk, "_empty", nan)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_width_rounds_to_16_bytes():
    assert aligned.width(5461, torch.bfloat16) == 5464
    assert aligned.width(5461, torch.float32) == 5464
    assert aligned.width(50, torch.float32) == 52 and aligned.width(50, torch.bfloat16) == 56
    assert aligned.width(64, torch.bfloat16) == 64
    t = torch.randn(3, 5)
    p = aligned.pad_cols(t, 8)
    assert p.shape == (3, 8) and float(p[:, 5:].abs().sum()) == 0.0
    assert aligned.pad_cols(t, 5) is t and aligned.cols(t, 5) is t
    c = aligned.cols(p, 5)
    assert c.is_contiguous() and torch.equal(c, t)
    assert aligned.pad_rows(t, 4).shape == (4, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,n", [(61, 64), (5, 8), (64, 61), (13, 16), (16, 13), (700, 707), (707, 700)])
def test_copy_cols_pads_and_slices_exactly(k, n, dtype, monkeypatch):
    """The Triton copy (pad: k < n, slice: k > n) against ATen's, output poisoned, for
    aligned and misaligned widths on either side, several column blocks (700 > 512), a
    batched input, a view whose rows are wider than it (stride > k) and a vector."""
    monkeypatch.setattr(aligned, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    torch.manual_seed(random.randrange(2**31))
    want = (lambda t: torch.nn.functional.pad(t, (0, n - k))) if n > k else (lambda t: t[..., :n].contiguous())
    wide = torch.randn(23, k + 5, dtype=dtype)
    for t in (torch.randn(37, k, dtype=dtype), torch.randn(3, 11, k, dtype=dtype), wide[:, :k],
              torch.randn(k, dtype=dtype)):
        got = aligned.copy_cols(t, n)
        assert got.shape == (*t.shape[:-1], n) and got.is_contiguous() and got.dtype == dtype
        assert torch.equal(got, want(t))
        # what the callers use, under the interpreter routed through the kernel
        assert torch.equal(aligned.pad_cols(t, n) if n > k else aligned.cols(t, n), want(t))


def test_copies_by_switches_between_the_kernel_and_aten(monkeypatch):
    calls = []
    real = aligned.copy_cols
    monkeypatch.setattr(aligned, "copy_cols", lambda t, n: calls.append(n) or real(t, n))
    t = torch.randn(4, 13)
    with aligned.copies_by(kernel=False):
        assert torch.equal(aligned.pad_cols(t, 16), torch.nn.functional.pad(t, (0, 3)))
        assert calls == []
    assert torch.equal(aligned.pad_cols(t, 16), torch.nn.functional.pad(t, (0, 3)))
    assert calls == [16]


def test_copy_cols_under_autograd_hands_back_the_opposite_copy():
    x = torch.randn(6, 13, requires_grad=True)
    p = aligned.pad_cols(x, 16)
    g = torch.randn(6, 16)
    (gx,) = torch.autograd.grad(p, x, g)
    assert torch.equal(gx, g[:, :13])
    y = torch.randn(6, 16, requires_grad=True)
    c = aligned.cols(y, 13)
    g = torch.randn(6, 13)
    (gy,) = torch.autograd.grad(c, y, g)
    assert torch.equal(gy, torch.nn.functional.pad(g, (0, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_is_one_product_with_the_scale_applied(dtype):
    a, b = torch.randn(7, 5, dtype=dtype), torch.randn(5, 6, dtype=dtype)
    want = (a.double() @ b.double()) * 0.375
    got = aligned.mm(a, b, 0.375)
    assert got.dtype == dtype and got.shape == (7, 6)
    assert _rel(got, want) < TOL[dtype]
    assert torch.equal(aligned.mm(a, b), a @ b)


def _layer(in_f, out_f, init, block, dtype, seed, rank=8):
    layer = SparseLowRankLinear(in_f, out_f, rank=rank, density=0.15, init=init, block=block,
                                key=f"a{seed}", dtype=dtype)
    with torch.no_grad():
        layer.B.normal_()
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init,block", KINDS)
@pytest.mark.parametrize("in_f,out_f,rank", WIDTHS)
def test_padded_widths_match_the_reference(in_f, out_f, rank, init, block, dtype):
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    layer = _layer(in_f, out_f, init, block, dtype, seed, rank)
    x = torch.randn(2, 9, in_f, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 9, out_f, dtype=dtype)
    args = (x, layer.A, layer.B, layer.values, layer.sparse_crow, layer.sparse_col,
            layer.sparse_row, layer.bias, layer.scale)
    want_y = reference(*args)
    want = (*reference_backward(g, *args[:7], layer.scale), g.reshape(-1, out_f).sum(0))
    # the op's implementation
    y = sl._forward_cuda(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    assert y.shape == want_y.shape and y.is_contiguous()
    assert _rel(y, want_y) < TOL[dtype], f"y (seed {seed})"
    got = sl._backward_cuda(g, *(a.detach() for a in args[:7]), layer.scale)
    for name, a, b in zip(("dx", "dA", "dB", "dvalues"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous(), name
        assert _rel(a, b) < TOL[dtype], f"op {name} (seed {seed})"
    # the eager entry (autograd)
    y = sl.eager(*args)
    assert y.shape == want_y.shape and y.is_contiguous()
    assert _rel(y, want_y) < TOL[dtype], f"eager y (seed {seed})"
    grads = torch.autograd.grad(y, [x, layer.A, layer.B, layer.values, layer.bias], g)
    for name, a, b in zip(("dx", "dA", "dB", "dvalues", "dbias"), grads, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel(a, b) < TOL[dtype], f"eager {name} (seed {seed})"


class _GemmOperands(TorchDispatchMode):
    """Records the 2-D operands (and ``out``) of every matrix product issued."""
    GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default,
             torch.ops.aten.addmm.out, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.GEMMS:
            mats = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() >= 2]
            self.seen.append((func, mats))
        return func(*args, **kwargs)


def _misaligned(t: torch.Tensor) -> bool:
    """Whether cuBLAS would see this matrix off 16-byte boundaries: its start, or the step
    between its rows (row-major) or columns (a transposed view)."""
    es = t.element_size()
    s0, s1 = t.stride(-2), t.stride(-1)
    ld = s0 if s1 == 1 else s1
    starts_off = (t.storage_offset() * es) % 16 != 0
    return starts_off or (min(t.shape[-2:]) > 1 and (ld * es) % 16 != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init,block,fold", [("random", 1, "never"), ("random", 1, "always"),
                                             ("lost", 1, "never"), ("random", 16, "never")])
def test_every_gemm_sees_aligned_operands(init, block, fold, dtype):
    """At widths and a rank that are all misaligned (53 -> 61, rank 13), every product
    of every path (gathers, folded, channel, tiles), forward and backward, in both
    entries, reads and writes matrices whose rows start on 16-byte boundaries: what keeps
    cuBLAS on its fast kernels (``aligned``). A rank left unpadded made x Aᵀ and g B
    misaligned."""
    from structrewrite.codegen.triton import sparse_lowrank_folded as folded
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    layer = _layer(53, 61, init, block, dtype, seed, rank=13)
    x = torch.randn(2, 9, 53, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 9, 61, dtype=dtype)
    args = (x, layer.A, layer.B, layer.values, layer.sparse_crow, layer.sparse_col,
            layer.sparse_row, layer.bias, layer.scale)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    with folded.forced(fold), _GemmOperands() as rec:
        sl._forward_cuda(*plain)
        sl._backward_cuda(g, *plain[:7], layer.scale)
        y = sl.eager(*args)
        torch.autograd.grad(y, [x, layer.A, layer.B, layer.values, layer.bias], g)
    assert len(rec.seen) >= 6   # the low-rank products at least, each way
    bad = [(str(f), tuple(m.shape), m.stride(), m.storage_offset()) for f, mats in rec.seen
           for m in mats if _misaligned(m)]
    assert not bad, f"misaligned GEMM operands (seed {seed}): {bad}"
