"""A LLaMA-7B-shaped model is planned and rewritten on the meta device (no weights)."""
import torch

import structrewrite as sr
from benchmarks.cpu.plan_7b import POLICY, formula
from examples.models import llama_7b_meta


def test_7b_on_meta_matches_the_parameter_formula():
    model = llama_7b_meta()
    res = sr.rewrite(model, POLICY)
    assert len(res.report.sites) == 224
    assert all(p.is_meta for p in res.model.parameters())
    assert all(b.is_meta for b in res.model.buffers())
    n = sum(p.numel() for p in res.model.parameters())
    assert n == formula() == res.report.model_params_after
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    # the report's per-site formulas account for every rewritten parameter
    non_site = 2 * 32000 * 4096 + 4096 + 32 * 2 * 4096
    assert res.report.totals()["after"]["params"] == n - non_site
    assert 3.0e9 < n < 3.2e9


def test_every_example_policy_rewrites_the_7b_shapes_on_meta():
    """The shipped policies resolve and rewrite a full-size model; the tile policy gives
    whole 32x32 tiles at 3% of every projection."""
    from pathlib import Path

    from structrewrite.nn.sparse_lowrank import SparseLowRankLinear, block_count
    folder = Path(__file__).resolve().parents[2] / "examples" / "policies"
    files = sorted(folder.glob("*.yaml"))
    assert any(f.name == "llama_sltrain_tiles.yaml" for f in files)
    for path in files:
        res = sr.rewrite(llama_7b_meta(), path)
        layers = [m for m in res.model.modules() if isinstance(m, SparseLowRankLinear)]
        assert len(layers) == len(res.report.sites) > 0, path.name
        if path.name == "llama_sltrain_tiles.yaml":
            assert len(layers) == 224
            for m in layers:
                assert m.block == 32
                assert m.nnz == 32 * 32 * block_count(m.out_features, m.in_features, 0.03, 32)
