"""SparseLowRankLinear: meta device, deterministic reset, state dict."""
import pytest
import torch
import torch.nn as nn

import structrewrite as sr
from structrewrite.nn import SparseLowRankLinear


@pytest.mark.parametrize("block", [1, 16])
def test_meta_then_to_empty_and_reset_regenerates_the_same_layer(block):
    kw = dict(rank=8, density=0.2, init="random", seed=3, key="a.b", block=block)
    real = SparseLowRankLinear(48, 64, **kw)
    with torch.device("meta"):
        meta = SparseLowRankLinear(48, 64, **kw)
    assert meta.A.is_meta and meta.sparse_col.is_meta and meta.values.shape == real.values.shape
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    for (k, v), (k2, v2) in zip(real.state_dict().items(), meta.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_rewrite_on_meta_allocates_nothing_and_resets_to_the_same_model():
    policy = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                       "with": {"rank": 4, "density": 0.1, "init": "random"}}]}
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    res = sr.rewrite(model, policy)
    assert all(p.is_meta for p in res.model.parameters())
    assert all(b.is_meta for b in res.model.buffers())
    m = res.model.to_empty(device="cpu")
    for mod in m.modules():
        if isinstance(mod, SparseLowRankLinear):
            mod.reset_parameters()
    cpu = sr.rewrite(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), policy).model
    for k, v in cpu.state_dict().items():
        if "bias" not in k:          # biases are not the pass's to set: kept from the input layer
            assert torch.equal(v, m.state_dict()[k]), k


def test_support_is_in_the_state_dict_as_index_buffers():
    mod = SparseLowRankLinear(10, 12, rank=2, density=0.2, key="x")
    sd = mod.state_dict()
    assert {"A", "B", "values", "bias", "sparse_crow", "sparse_col", "sparse_row"} == set(sd)
    assert sd["sparse_col"].dtype == torch.int32 and sd["sparse_crow"][-1] == mod.nnz
    other = SparseLowRankLinear(10, 12, rank=2, density=0.2, key="y")
    other.load_state_dict(sd)
    x = torch.randn(3, 10)
    assert torch.equal(other(x), mod(x))
