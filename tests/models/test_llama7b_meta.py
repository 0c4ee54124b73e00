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
