"""The block-sparse (tile) kernels of sparse_lowrank_linear, run on the CPU by Triton's
interpreter, against the reference op and against dense products.

Fresh random shapes, tiles and data in every test (the seed is in the failure message);
out/in are not multiples of the tile; outputs written by the kernels alone are poisoned
with NaN first. Tolerances, as relative Frobenius error against the reference:
float32 1e-5; bf16 1e-2 (both sides round to bf16; ours also rounds the cuBLAS low-rank
part once before the kernel adds to it).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from structrewrite.ops.sparse_lowrank_linear import reference, reference_backward  # noqa: E402
from structrewrite.codegen.triton import sparse_lowrank_block as blk  # noqa: E402
from structrewrite.nn.sparse_lowrank import SparseLowRankLinear, block_flat, csr_from_flat  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (BM, warps, stages[, tiles per step, or "tma": blocks moved by tensor descriptors])
SPMM_CONFIGS = [(16, 4, 2), (32, 4, 2), (16, 4, 2, 2), (32, 4, 2, 4), (16, 4, 2, "tma"),
                (32, 4, 2, "tma")]
SDDMM_CONFIGS = [(16, 0, 4, 2), (32, 3, 4, 2), (16, 1, 4, 2), (16, 0, 4, 2, 2), (32, 2, 4, 2, 4)]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(blk, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _support(out_f, in_f, b, ntiles, g):
    whole = (out_f // b) * (in_f // b)
    tiles = torch.randperm(whole, generator=g)[:min(ntiles, whole)]
    return csr_from_flat(block_flat(tiles, in_f, b), out_f, in_f)


def _problem(dtype, bias, seed, b=None):
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    b = b or rnd.choice([16, 32])
    out_f = rnd.randint(b, 3 * b + 7)
    in_f = rnd.randint(b, 3 * b + 7)
    rank = rnd.randint(4, min(in_f, out_f) // 2)
    lead = (rnd.randint(1, 2), rnd.randint(1, 40))
    whole = (out_f // b) * (in_f // b)
    crow, col, row = _support(out_f, in_f, b, rnd.randint(1, whole), g)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype)

    return b, dict(x=r(*lead, in_f), A=r(rank, in_f) / in_f ** 0.5, B=r(out_f, rank) / rank ** 0.5,
                   values=r(col.numel()), crow=crow, col=col, row=row,
                   bias=r(out_f) if bias else None, scale=rnd.choice([1.0, 0.37, 32.0 / rank]))


def _float32_products(b, out_f, in_f, M, ntiles, seed):
    """A float32 tile problem with its dense float64 answers: the layout and values of
    ``ntiles`` random b x b tiles, x (M x in), a gradient (M x out), the dense S and d
    values at the support."""
    g = torch.Generator().manual_seed(seed)
    crow, col, row = _support(out_f, in_f, b, ntiles, g)
    vals = torch.randn(col.numel(), generator=g)
    S = torch.zeros(out_f, in_f, dtype=torch.float64)
    S[row.long(), col.long()] = vals.double()
    x, gr = torch.randn(M, in_f, generator=g), torch.randn(M, out_f, generator=g)
    return dict(lay=blk.layout(crow, col, row, b, out_f, in_f), vals=vals, S=S, x=x, gr=gr,
                want_dv=(gr.double().t() @ x.double())[row.long(), col.long()])


def _check_spmm(p, cfg, seed):
    """``bsr_spmm`` with ``cfg`` on a ``_float32_products`` problem: the forward product,
    and dx with d values riding on it, each output poisoned first."""
    x, gr, vals, S, lay = p["x"], p["gr"], p["vals"], p["S"], p["lay"]
    (M, in_f), out_f = x.shape, gr.shape[1]
    y = torch.full((M, out_f), float("nan"))
    blk.bsr_spmm(x, lay, vals, out_f, y, False, config=cfg)
    assert _rel(y, x.double() @ S.t()) < TOL[torch.float32], f"forward {cfg} (seed {seed})"
    dx, dv = torch.full((M, in_f), float("nan")), torch.zeros(vals.numel())
    blk.bsr_spmm(gr, lay, vals, in_f, dx, True, config=cfg, x=x, dv=dv)
    assert _rel(dx, gr.double() @ S) < TOL[torch.float32], f"dx {cfg} (seed {seed})"
    assert _rel(dv, p["want_dv"]) < TOL[torch.float32], f"d values in dx {cfg} (seed {seed})"


def _backward_problem(dtype, seed):
    """(b, the problem of ``_problem`` without bias, the backward's arguments with a
    fresh incoming gradient)."""
    b, p = _problem(dtype, False, seed)
    grad = torch.randn(*p["x"].shape[:-1], p["B"].shape[0],
                       generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return b, p, (grad, p["x"], p["A"], p["B"], p["values"], p["crow"], p["col"], p["row"],
                  p["scale"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(dtype, bias):
    seed = random.randrange(2**31)
    b, p = _problem(dtype, bias, seed)
    assert blk.block_size(p["crow"], p["col"], p["row"], p["B"].shape[0], p["A"].shape[1]) in (b, 2 * b)
    ref = reference(*p.values())
    cfg = random.Random(seed).choice(SPMM_CONFIGS)
    y = blk.forward(*p.values(), b=b, config=cfg)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = _rel(y, ref)
    assert err < TOL[dtype], f"rel err {err:.2e} (seed {seed}, b {b}, cfg {cfg})"


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(dtype, fuse, monkeypatch):
    """d values from the dx kernel (``fuse``) or from the kernel of their own."""
    monkeypatch.setattr(blk, "FUSE_DV", fuse)
    if fuse:
        monkeypatch.setattr(blk, "bsr_sddmm", lambda *a, **k: pytest.fail("separate d values kernel ran"))
    seed = random.randrange(2**31)
    b, p, args = _backward_problem(dtype, seed)
    ref = reference_backward(*args)
    rc = random.Random(seed)
    scfg, dcfg = rc.choice(SPMM_CONFIGS), rc.choice(SDDMM_CONFIGS)
    got = blk.backward(*args, b=b, spmm_config=scfg, sddmm_config=dcfg)
    for name, a, want in zip(("dx", "dA", "dB", "dvalues"), got, ref):
        assert a.shape == want.shape and a.dtype == want.dtype, name
        err = _rel(a, want)
        assert err < TOL[dtype], f"{name}: rel err {err:.2e} (seed {seed}, b {b}, {scfg}, {dcfg})"


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bsr_spmm_writes_every_output_alone(dtype, transposed):
    """No base, no bias: the output starts as NaN, so every element must be written,
    also in tile rows without tiles and in the partial last tile row."""
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    b = 16
    out_f, in_f, M = 16 * 3 + 5, 16 * 2 + 9, random.choice([17, 32, 45])
    crow, col, row = _support(out_f, in_f, b, 3, g)
    vals = torch.randn(col.numel(), generator=g).to(dtype)
    lay = blk.layout(crow, col, row, b, out_f, in_f)
    S = torch.zeros(out_f, in_f, dtype=torch.float64)
    S[row.long(), col.long()] = vals.double()
    if transposed:
        inp, n_out = torch.randn(M, out_f, generator=g).to(dtype), in_f
        ref = inp.double() @ S
    else:
        inp, n_out = torch.randn(M, in_f, generator=g).to(dtype), out_f
        ref = inp.double() @ S.t()
    out = torch.full((M, n_out), float("nan"), dtype=dtype)
    blk.bsr_spmm(inp, lay, vals, n_out, out, transposed, config=random.choice(SPMM_CONFIGS))
    assert torch.isfinite(out).all(), f"unwritten output (seed {seed})"
    assert _rel(out, ref) < TOL[dtype], f"seed {seed}"


@pytest.mark.parametrize("config", SDDMM_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bsr_sddmm_against_dense_sample(dtype, config):
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    b = 16
    M, out_f, in_f = random.randint(1, 70), 16 * 3 + 2, 16 * 4
    crow, col, row = _support(out_f, in_f, b, 5, g)
    lay = blk.layout(crow, col, row, b, out_f, in_f)
    gy = torch.randn(M, out_f, generator=g).to(dtype)
    x = torch.randn(M, in_f, generator=g).to(dtype)
    dv = blk.bsr_sddmm(gy, x, lay, config=config)
    assert dv.shape == (col.numel(),) and dv.dtype == torch.float32
    assert torch.isfinite(dv).all(), f"unwritten entries (seed {seed})"
    ref = (gy.double().t() @ x.double())[row.long(), col.long()]
    assert _rel(dv, ref) < 1e-5, f"seed {seed}"   # float32 accumulation of exact products


@pytest.mark.parametrize("config", SPMM_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bsr_spmm_adds_d_values_alongside_dx(dtype, config):
    """The transposed product with ``dv``: dx as without it, and gᵀ x at the support added
    to what ``dv`` held (float32, tiles in CSR order), over every token block."""
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    b = random.Random(seed).choice([16, 32])
    M, out_f, in_f = random.randint(1, 70), b * 3 + 2, b * 2 + 5
    crow, col, row = _support(out_f, in_f, b, 4, g)
    lay = blk.layout(crow, col, row, b, out_f, in_f)
    vals = torch.randn(col.numel(), generator=g).to(dtype)
    gy = torch.randn(M, out_f, generator=g).to(dtype)
    x = torch.randn(M, in_f, generator=g).to(dtype)
    S = torch.zeros(out_f, in_f, dtype=torch.float64)
    S[row.long(), col.long()] = vals.double()
    dv0 = torch.randn(col.numel(), generator=g)
    dv = dv0.clone()
    dx = torch.full((M, in_f), float("nan"), dtype=dtype)
    blk.bsr_spmm(gy, lay, vals, in_f, dx, True, config=config, x=x, dv=dv)
    assert torch.isfinite(dx).all(), f"unwritten output (seed {seed})"
    assert _rel(dx, gy.double() @ S) < TOL[dtype], f"dx (seed {seed})"
    want = (gy.double().t() @ x.double())[row.long(), col.long()]
    assert _rel(dv - dv0, want) < 1e-5, f"d values (seed {seed}, b {b})"   # exact products, float32 sums
    with pytest.raises(ValueError):
        blk.bsr_spmm(x, lay, vals, out_f, torch.empty(M, out_f, dtype=dtype), False, x=x, dv=dv)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("b", [16, 32])
def test_every_tuning_candidate_computes_the_products(b, aligned):
    """The tile configs that ``tuning.pick`` may choose on a device, each run once here
    (float32, a token count that fills no config's token block evenly): the forward
    product, dx with d values riding on it, and the separate d values kernel. With
    ``aligned`` widths (rows of 16-byte multiples) the "tma" configs move every block
    by tensor descriptor, else none."""
    seed = random.randrange(2**31)
    pad = 4 if aligned else 3
    p = _float32_products(b, 2 * b + pad, 3 * b + pad + 2 * (not aligned), 37, 4, seed)
    for cfg in blk.SPMM_CANDIDATES:
        _check_spmm(p, cfg, seed)
    for cfg in blk.SDDMM_CANDIDATES:
        dv = blk.bsr_sddmm(p["gr"], p["x"], p["lay"], config=cfg)
        assert _rel(dv, p["want_dv"]) < TOL[torch.float32], f"d values {cfg} (seed {seed})"


@pytest.mark.parametrize("G", [2, 4])
def test_grouped_tile_walk_handles_every_row_length(G):
    """G tiles per step (the fourth config entry of ``bsr_spmm``, the fifth of
    ``bsr_sddmm``): tile rows and columns holding 0 to 10 tiles, most not a multiple of G,
    so that every step count and partial last group occurs; forward, dx with d values,
    and the separate d values (one and three token splits), against dense float64
    products."""
    seed = random.randrange(2**31)
    b = 16
    rnd = random.Random(seed)
    p = _float32_products(b, 5 * b + 3, 10 * b + 7, rnd.randint(1, 40), rnd.randint(12, 40), seed)
    _check_spmm(p, (16, 4, 2, G), seed)
    for splits in (1, 3):
        dv = blk.bsr_sddmm(p["gr"], p["x"], p["lay"], config=(16, splits, 4, 2, G))
        assert _rel(dv, p["want_dv"]) < TOL[torch.float32], f"d values alone, {splits} splits (seed {seed})"


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_walk_uses_descriptors_where_rows_are_aligned(dtype, aligned, monkeypatch):
    """The "tma" walk reads and writes by tensor descriptor every operand whose rows are
    16-byte aligned (the interpreter emulates the TMA) and by pointer the others; either
    way it computes what the pointer walk computes: forward with base, bias and scale,
    dx with d values, against the pointer walk and the dense products."""
    seed = random.randrange(2**31)
    rnd = random.Random(seed)
    b = rnd.choice([16, 32])
    out_f, in_f = (3 * b + 8, 2 * b + 8) if aligned else (3 * b + 5, 2 * b + 3)
    M = rnd.randint(1, 40)
    g = torch.Generator().manual_seed(seed)
    crow, col, row = _support(out_f, in_f, b, rnd.randint(1, 6), g)
    lay = blk.layout(crow, col, row, b, out_f, in_f)
    vals = torch.randn(col.numel(), generator=g).to(dtype)
    S = torch.zeros(out_f, in_f, dtype=torch.float64)
    S[row.long(), col.long()] = vals.double()
    x, gy = torch.randn(M, in_f, generator=g).to(dtype), torch.randn(M, out_f, generator=g).to(dtype)
    base_y, base_x = torch.randn(M, out_f, generator=g).to(dtype), torch.randn(M, in_f, generator=g).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype)
    made = []
    real = blk._desc
    def spy(*a):                 # records whether each descriptor asked for was made
        d = real(*a)
        made.append(d is not None)
        return d
    monkeypatch.setattr(blk, "_desc", spy)

    def run(walk):
        cfg = (16, 4, 2) + walk
        y = torch.full((M, out_f), float("nan"), dtype=dtype)
        blk.bsr_spmm(x, lay, vals, out_f, y, False, base=base_y, bias=bias, scale=0.37, config=cfg)
        dx, dv = torch.full((M, in_f), float("nan"), dtype=dtype), torch.zeros(vals.numel())
        blk.bsr_spmm(gy, lay, vals, in_f, dx, True, base=base_x, config=cfg, x=x, dv=dv)
        return y, dx, dv

    tma = run(("tma",))
    assert made and all(made) if aligned else not any(made), (made, seed)
    made.clear()
    for got, want in zip(tma, run(())):
        assert _rel(got, want) < 1e-6, f"seed {seed}"
    assert not made
    y, dx, dv = tma
    ref_y = 0.37 * base_y.double() + bias.double() + x.double() @ S.t()
    inplace = base_y.clone()     # base is the output: one descriptor for both
    blk.bsr_spmm(x, lay, vals, out_f, inplace, False, base=inplace, bias=bias, scale=0.37,
                 config=(16, 4, 2, "tma"))
    assert len(made) == 2 and all(made) == aligned, (made, seed)
    assert _rel(inplace, y) < 1e-6, f"in place (seed {seed})"
    assert _rel(y, ref_y) < TOL[dtype], f"forward (seed {seed})"
    assert _rel(dx, base_x.double() + gy.double() @ S) < TOL[dtype], f"dx (seed {seed})"
    assert _rel(dv, (gy.double().t() @ x.double())[row.long(), col.long()]) < 1e-5, f"dv (seed {seed})"


def test_tma_is_a_hopper_and_interpreter_feature(monkeypatch):
    from structrewrite.codegen.triton import tuning
    assert tuning.has_tma(torch.device("cpu"))            # the interpreter emulates it
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tuning.has_tma(torch.device("cpu"))


@pytest.mark.parametrize("tma", [True, False])
def test_tuning_offers_the_tma_walk_only_where_the_device_has_it(tma, monkeypatch):
    """Off Hopper the "tma" candidates would time the pointer walk again: the forward and
    both dx timings leave them out there, and offer the whole list where the TMA is."""
    offered = {}

    def pick(kind, key, candidates, run, default):
        offered[kind] = list(candidates)
        return "fused" if kind == "bsr_dv_path" else default
    monkeypatch.setattr(blk, "pick", pick)
    monkeypatch.setattr(blk, "has_tma", lambda device: tma)
    seed = random.randrange(2**31)
    b, p, args = _backward_problem(torch.float32, seed)
    blk.forward(*_problem(torch.float32, False, seed)[1].values(), b=b)
    blk.backward(*args, b=b)
    want = [c for c in blk.SPMM_CANDIDATES if tma or c[-1] != "tma"]
    assert any(c[-1] == "tma" for c in blk.SPMM_CANDIDATES)
    for kind in ("bsr_spmm", "bsr_spmm_t", "bsr_spmm_t_dv"):
        assert offered[kind] == want, kind


def test_deterministic_mode_keeps_the_separate_d_values_kernel(monkeypatch):
    """The fused d values add in an order that varies between runs; under
    ``torch.use_deterministic_algorithms`` the backward runs the kernel of their own."""
    calls = []
    real = blk.bsr_sddmm
    monkeypatch.setattr(blk, "bsr_sddmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    seed = random.randrange(2**31)
    b, _, args = _backward_problem(torch.float32, seed)
    assert blk.fuses_dv()
    blk.backward(*args, b=b, spmm_config=SPMM_CONFIGS[0], sddmm_config=SDDMM_CONFIGS[0])
    assert not calls
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not blk.fuses_dv()
        got = blk.backward(*args, b=b, spmm_config=SPMM_CONFIGS[0], sddmm_config=SDDMM_CONFIGS[0])
    finally:
        torch.use_deterministic_algorithms(prev)
    assert calls
    assert _rel(got[3], reference_backward(*args)[3]) < TOL[torch.float32], f"seed {seed}"


@pytest.mark.parametrize("chosen", ["fused", "separate"])
def test_backward_follows_the_timed_d_values_path(chosen, monkeypatch):
    """Without given tiles the backward times its kernels (``tuning.pick``) and the two
    ways to d values, and runs the one the timing chose; both trial runs must work."""
    asked = {}

    def pick(kind, key, candidates, run, default):
        asked[kind] = key
        if kind == "bsr_dv_path":
            for c in candidates:
                run(c)
            return chosen
        return (SDDMM_CONFIGS if kind == "bsr_sddmm" else SPMM_CONFIGS)[0]
    monkeypatch.setattr(blk, "pick", pick)
    calls = []
    real = blk.bsr_sddmm
    monkeypatch.setattr(blk, "bsr_sddmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    seed = random.randrange(2**31)
    b, _, args = _backward_problem(torch.float32, seed)
    got = blk.backward(*args, b=b)
    assert {"bsr_spmm_t", "bsr_spmm_t_dv", "bsr_sddmm", "bsr_dv_path"} <= set(asked)
    assert len(calls) == (1 if chosen == "fused" else 2)    # the trial, and the real run if separate
    for name, a, want in zip(("dx", "dA", "dB", "dvalues"), got, reference_backward(*args)):
        assert _rel(a, want) < TOL[torch.float32], f"{name} (seed {seed}, {chosen})"


def test_backward_times_once_and_then_allocates_nothing_extra(monkeypatch):
    """The timing trials get scratch outputs; once every choice is made (cached as
    ``tuning.pick`` caches it), a backward allocates only what it returns."""
    from structrewrite.codegen.triton import aligned
    cache = {}

    def pick(kind, key, candidates, run, default):
        if (kind, key) not in cache:
            for c in candidates[:2]:
                run(c)
            cache[kind, key] = candidates[0]
        return cache[kind, key]
    monkeypatch.setattr(blk, "pick", pick)
    monkeypatch.setattr(blk, "SPMM_CANDIDATES", SPMM_CONFIGS)
    monkeypatch.setattr(blk, "SDDMM_CANDIDATES", SDDMM_CONFIGS)
    made = []
    monkeypatch.setattr(blk, "_empty", lambda shape, dtype, device: made.append(shape) or torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    seed = random.randrange(2**31)
    b, p, args = _backward_problem(torch.float32, seed)
    first = blk.backward(*args, b=b)
    assert made and {k for k, _ in cache} == {"bsr_spmm_t", "bsr_spmm_t_dv", "bsr_sddmm", "bsr_dv_path"}
    made.clear()
    second = blk.backward(*args, b=b)
    in_f = p["A"].shape[1]
    assert len(made) == (0 if aligned.width(in_f, torch.float32) == in_f else 1), made   # dx where padded
    for a, c in zip(first, second):
        assert _rel(a, c) < 1e-6


def test_detection_and_layout():
    g = torch.Generator().manual_seed(0)
    # 64-aligned tiles are also 32- and 16-tiles: the largest is found
    crow, col, row = _support(130, 200, 64, 2, g)
    assert blk.block_size(crow, col, row, 130, 200) == 64
    crow, col, row = _support(70, 50, 16, 4, g)
    assert blk.block_size(crow, col, row, 70, 50) == 16
    col[3] = (col[3] + 17) % 50          # an entry moves out of its tile: element-wise now
    assert blk.block_size(crow, col, row, 70, 50) is None
    crow, col, row = csr_from_flat(torch.randperm(70 * 50, generator=g)[:256], 70, 50)
    assert blk.block_size(crow, col, row, 70, 50) is None        # random support, nnz = 16²
    crow, col, row = csr_from_flat(torch.empty(0, dtype=torch.int64), 70, 50)
    assert blk.block_size(crow, col, row, 70, 50) is None        # empty support
    # layout: tiles (0,1) (2,0) of 16 x 16 in a 48 x 32 matrix
    crow, col, row = csr_from_flat(block_flat(torch.tensor([1, 4]), 32, 16), 48, 32)
    lay = blk.layout(crow, col, row, 16, 48, 32)
    assert lay.rptr.tolist() == [0, 1, 1, 2] and lay.rcol.tolist() == [1, 0]
    assert lay.cptr.tolist() == [0, 1, 2] and lay.crow.tolist() == [2, 0] and lay.cidx.tolist() == [1, 0]
    flat = row.long() * 32 + col.long()
    for t, (i0, j0) in enumerate([(0, 16), (32, 0)]):   # tile t's entry (i, j) in CSR order
        for i, j in [(0, 0), (3, 5), (15, 15)]:
            k = int(lay.base[t]) + i * int(lay.stride[t]) + j
            assert flat[k] == (i0 + i) * 32 + j0 + j


def test_module_block_support_takes_this_path():
    layer = SparseLowRankLinear(96, 80, rank=8, density=0.1, block=16, key="q")
    assert blk.block_size(layer.sparse_crow, layer.sparse_col, layer.sparse_row, 80, 96) == 16
    assert layer.nnz == 256 * round(0.1 * 96 * 80 / 256)
