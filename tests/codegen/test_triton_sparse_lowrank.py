"""The Triton kernels of sparse_lowrank_linear, run on the CPU by Triton's interpreter,
against the reference op (the specification).

Every test draws fresh random shapes and data (the seed is in the failure message),
poisons the kernels' outputs with NaN so that an unwritten element fails, and uses
shapes that are not multiples of the tiles. Tolerances, as relative Frobenius error
against the reference: float32 1e-5; bf16 1e-2 (both sides round to bf16; ours also
rounds the cuBLAS low-rank part once before the epilogue adds to it).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from structrewrite.ops.sparse_lowrank_linear import reference, reference_backward  # noqa: E402
from structrewrite.codegen.triton import sparse_lowrank as sl  # noqa: E402
from structrewrite.nn.sparse_lowrank import csr_from_flat  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# small tiles so that a few dozen rows/tokens already span several tiles and splits
# (BM, BN, feature chunk, nsplit, warps); chunks of 8/16 features split every row
SPMM_CONFIGS = [(16, 16, 0, 0, 4), (32, 16, 8, 3, 4), (16, 32, 16, 1, 4), (16, 16, 16, 0, 4, 2),
                (16, 16, 0, 2, 4, 3)]
# gather: (BK, BM, token chunks, warps); mm: (BR, BC, BK, warps, stages)
SDDMM_CONFIGS = [("gather", 16, 16, 0, 4), ("gather", 32, 32, 2, 4), ("mm", 16, 16, 16, 4, 2),
                 ("mm", 32, 16, 16, 4, 2), ("mm", 16, 32, 32, 4, 2)]


def _poisoned_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(sl, "_empty", _poisoned_empty)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _problem(dtype, density, bias, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    in_f = rnd.randint(17, 75)
    out_f = rnd.randint(9, 70)
    rank = rnd.randint(8, in_f // 2)
    lead = (rnd.randint(1, 3), rnd.randint(1, 23))           # arbitrary M, with a batch dim
    nnz = int(density * in_f * out_f)
    flat = torch.randperm(in_f * out_f, generator=g)[:nnz]
    crow, col, row = csr_from_flat(flat, out_f, in_f)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype)

    return dict(x=r(*lead, in_f), A=r(rank, in_f) / in_f ** 0.5, B=r(out_f, rank) / rank ** 0.5,
                values=r(nnz), crow=crow, col=col, row=row,
                bias=r(out_f) if bias else None, scale=rnd.choice([1.0, 0.37, 32.0 / rank]))


CASES = [(dt, d, b) for dt in (torch.float32, torch.bfloat16)
         for d in (0.0, 0.013, 0.1) for b in (True, False)]


@pytest.mark.parametrize("dtype,density,bias", CASES)
def test_forward_matches_reference(dtype, density, bias):
    seed = random.randrange(2**31)
    p = _problem(dtype, density, bias, seed)
    ref = reference(*p.values())
    cfg = random.Random(seed).choice(SPMM_CONFIGS)
    y = sl.forward(*p.values(), config=cfg)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert torch.isfinite(y).all(), f"unwritten or non-finite output (seed {seed}, cfg {cfg})"
    err = _rel(y, ref)
    assert err < TOL[dtype], f"rel err {err:.2e} (seed {seed}, cfg {cfg})"


@pytest.mark.parametrize("dtype,density", [(dt, d) for dt in (torch.float32, torch.bfloat16)
                                           for d in (0.0, 0.02, 0.1)])
def test_backward_matches_reference(dtype, density):
    seed = random.randrange(2**31)
    p = _problem(dtype, density, False, seed)
    grad = torch.randn(*p["x"].shape[:-1], p["B"].shape[0],
                       generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    args = (grad, p["x"], p["A"], p["B"], p["values"], p["crow"], p["col"], p["row"], p["scale"])
    ref = reference_backward(*args)
    rc = random.Random(seed)
    scfg, dcfg = rc.choice(SPMM_CONFIGS), rc.choice(SDDMM_CONFIGS)
    got = sl.backward(*args, spmm_config=scfg, sddmm_config=dcfg)
    for name, a, b in zip(("dx", "dA", "dB", "dvalues"), got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), f"{name}: unwritten output (seed {seed})"
        if b.numel():
            err = _rel(a, b)
            assert err < TOL[dtype], f"{name}: rel err {err:.2e} (seed {seed}, {scfg}, {dcfg})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_spmm_uneven_rows(dtype):
    """Rows of very different lengths (some empty, one long), no base, no bias."""
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    nfeat, nrows, M = 37, 21, random.choice([29, 32])     # 32: whole token tiles
    dense = (torch.rand(nrows, nfeat, generator=g) < 0.15)
    dense[3] = True                        # one full row
    dense[5] = False                       # one empty row
    flat = dense.flatten().nonzero().flatten()
    crow, col, row = csr_from_flat(flat, nrows, nfeat)
    vals = torch.randn(flat.numel(), generator=g).to(dtype)
    x = torch.randn(M, nfeat, generator=g).to(dtype)
    out = torch.full((M, nrows), float("nan"), dtype=dtype)
    chunk = random.choice([0, 4, 16])
    perm = torch.randperm(vals.numel(), generator=g).int()   # values read through a permutation
    stored = torch.empty_like(vals)
    stored[perm.long()] = vals
    sl.gather_spmm(sl.transpose(x), crow, col, stored, nrows, out, perm=perm,
                   config=(16, 8, chunk, 2, 4, random.choice([1, 2])), owner=row)
    S = torch.zeros(nrows, nfeat, dtype=torch.float64)
    S[row.long(), col.long()] = vals.double()
    ref = x.double() @ S.t()
    assert torch.isfinite(out).all(), f"seed {seed}"
    assert _rel(out, ref) < TOL[dtype], f"seed {seed}, chunk {chunk}"


@pytest.mark.parametrize("config", SDDMM_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sddmm_against_dense_sample(dtype, config):
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    M, nrows, nfeat, nnz = 45, 19, 33, 57
    flat = torch.randperm(nrows * nfeat, generator=g)[:nnz]
    crow, col, row = csr_from_flat(flat, nrows, nfeat)
    gy = torch.randn(M, nrows, generator=g).to(dtype)
    x = torch.randn(M, nfeat, generator=g).to(dtype)
    dv = sl.sddmm(gy, x, crow, col, row, config=config)
    assert torch.isfinite(dv).all(), f"seed {seed}"
    ref = (gy.double().t() @ x.double())[row.long(), col.long()]
    assert _rel(dv, ref) < 1e-5, f"seed {seed}"   # float32 accumulation of exact products


def test_every_tuning_candidate_computes_the_products():
    """The gather configs that ``tuning.pick`` may choose on a device, each run once here
    (float32, feature chunks larger than the features where a config has them): the
    gather SpMM with base and bias, and each d values config."""
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    M, nrows, nfeat, nnz = 37, 45, 70, 300
    flat = torch.randperm(nrows * nfeat, generator=g)[:nnz]
    crow, col, row = csr_from_flat(flat, nrows, nfeat)
    vals = torch.randn(nnz, generator=g)
    x, gy = torch.randn(M, nfeat, generator=g), torch.randn(M, nrows, generator=g)
    base, bias = torch.randn(M, nrows, generator=g), torch.randn(nrows, generator=g)
    S = torch.zeros(nrows, nfeat, dtype=torch.float64)
    S[row.long(), col.long()] = vals.double()
    want = 0.5 * base.double() + x.double() @ S.t() + bias.double()
    for cfg in sl.SPMM_CANDIDATES:
        out = torch.full((M, nrows), float("nan"))
        sl.gather_spmm(sl.transpose(x), crow, col, vals, nrows, out, base=base, bias=bias,
                       scale=0.5, config=cfg, owner=row)
        assert _rel(out, want) < TOL[torch.float32], f"spmm {cfg} (seed {seed})"
    want_dv = (gy.double().t() @ x.double())[row.long(), col.long()]
    for cfg in sl.SDDMM_CANDIDATES:
        dv = sl.sddmm(gy, x, crow, col, row, config=cfg)
        assert _rel(dv, want_dv) < 1e-5, f"sddmm {cfg} (seed {seed})"


def test_csc_cache_follows_the_support():
    crow, col, row = csr_from_flat(torch.tensor([1, 4, 5, 9, 10]), 3, 4)
    p1 = sl.csc_of(col, row, 4)
    assert sl.csc_of(col, row, 4)[0] is p1[0]               # cached
    ptr, idx, perm, owner = p1
    # entries (row, col) in CSR order: (0,1) (1,0) (1,1) (2,1) (2,2)
    assert ptr.tolist() == [0, 1, 4, 5, 5]
    assert idx.tolist() == [1, 0, 1, 2, 2] and perm.tolist() == [1, 0, 2, 3, 4]
    assert owner.tolist() == [0, 1, 1, 1, 2]
    col[0] = 2                                               # in-place edit bumps the version
    assert sl.csc_of(col, row, 4)[0] is not p1[0]


def test_segments_split_rows_by_feature_chunk():
    # rows: 0 -> cols 1, 6, 7; 1 -> none; 2 -> cols 0, 9
    crow, col, row = csr_from_flat(torch.tensor([1, 6, 7, 20, 29]), 3, 10)
    seg = sl.segments(crow, col, row, 10, 4)             # chunks [0,4) [4,8) [8,10)
    assert seg.tolist() == [[0, 1, 3, 3], [3, 3, 3, 3], [3, 4, 4, 5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transpose(dtype):
    a = torch.randn(random.randint(1, 150), random.randint(1, 150)).to(dtype)
    assert torch.equal(sl.transpose(a), a.t())


def test_registration_is_a_noop_without_cuda():
    from structrewrite.codegen import triton as tr
    assert tr.register() == ([] if not torch.cuda.is_available() else tr.REGISTERED)
