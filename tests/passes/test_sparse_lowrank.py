"""The sparse_lowrank pass: structural, numerical, negative, idempotence."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structrewrite as sr
from structrewrite.nn import SparseLowRankLinear
from structrewrite.nn.sparse_lowrank import support_size
from structrewrite.rewriter.manager import VerificationError


class MLP(nn.Module):
    def __init__(self, d=24, h=40, bias=True):
        super().__init__()
        self.up = nn.Linear(d, h, bias=bias)
        self.down = nn.Linear(h, d, bias=bias)
        self.gate = nn.Linear(d, h, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(self.norm(x)))


def policy(match="*", **opts):
    return {"version": 1, "rules": [{"match": match, "rewrite": "sparse_lowrank",
                                     "with": {"rank": 4, **opts}}]}


def test_structure_sites_and_parameter_counts():
    model = MLP()
    res = sr.rewrite(model, policy("re:up|down", rank=5, density=0.05))
    m = res.model
    assert isinstance(m.up, SparseLowRankLinear) and isinstance(m.down, SparseLowRankLinear)
    assert isinstance(m.gate, nn.Linear) and isinstance(m.norm, nn.LayerNorm)
    assert [s.site for s in res.report.sites] == ["up", "down"]
    for site in res.report.sites:
        mod = m.get_submodule(site.site)
        n_params = sum(p.numel() for p in mod.parameters())
        assert site.after["params"] == n_params            # the formula equals the module
        out_f, in_f = site.dims["m"], site.dims["n"]
        assert n_params == 5 * (out_f + in_f) + support_size(out_f, in_f, 0.05, "svd") + out_f
        assert site.before["params"] == out_f * in_f + out_f
        assert site.after["flops"] == 2 * 5 * (out_f + in_f) + 2 * mod.nnz + out_f
    assert res.report.passes[0]["sites"] == 2 and res.report.passes[0]["modified"]
    assert m.up._structrewrite_from_pass == "sparse_lowrank"


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_svd_equals_the_dense_layer(bias):
    torch.manual_seed(0)
    model = MLP(bias=bias)
    x = torch.randn(3, 7, 24)
    res = sr.rewrite(model, policy("*", rank=24, density=0.0, init="svd"), example_inputs=(x,))
    for site in res.report.sites:
        assert site.exact and site.verified is not None and site.verified < 1e-5
    ref, out = model(x), res.model(x)
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def test_lost_channel_support_and_full_density_is_exact():
    torch.manual_seed(1)
    lin = nn.Linear(32, 20)
    res = sr.rewrite(nn.Sequential(lin), policy("0", rank=4, density=0.25, init="lost"))
    mod = res.model[0]
    cols = mod.sparse_col.view(20, -1)
    assert cols.shape[1] == 8 and (cols == cols[0]).all()    # whole input channels
    # the chosen channels are those with the largest residual column norms
    W = lin.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    R = W - (U[:, :4] * S[:4]) @ Vh[:4]
    assert set(cols[0].tolist()) == set(torch.topk(R.norm(dim=0), 8).indices.tolist())
    # on those channels the layer is exact, so the error is that of the other columns only
    assert res.report.sites[0].error < torch.linalg.norm(R) / torch.linalg.norm(W)
    full = sr.rewrite(nn.Sequential(lin), policy("0", rank=4, density=1.0, init="lost"))
    assert full.report.sites[0].exact


def test_svd_error_falls_with_rank_and_density():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(48, 48))
    errs = [sr.rewrite(model, policy("0", rank=r, density=d)).report.sites[0].error
            for r, d in ((4, 0.0), (16, 0.0), (16, 0.1))]
    assert errs[0] > errs[1] > errs[2]


def test_random_init_is_sltrain_and_deterministic():
    model = MLP()
    a = sr.rewrite(model, policy("up", init="random", density=0.1, seed=5)).model.up
    b = sr.rewrite(model, policy("up", init="random", density=0.1, seed=5)).model.up
    c = sr.rewrite(model, policy("up", init="random", density=0.1, seed=6)).model.up
    assert torch.equal(a.sparse_col, b.sparse_col) and torch.equal(a.values, b.values)
    assert not torch.equal(a.sparse_col, c.sparse_col)
    assert (a.B == 0).all() and a.values.abs().max() <= 1 / 24 ** 0.5
    assert a.nnz == round(0.1 * 40 * 24)
    flat = a.sparse_row.long() * 24 + a.sparse_col.long()
    assert flat.unique().numel() == a.nnz and torch.equal(flat, flat.sort().values)


def test_to_dense_is_exact():
    torch.manual_seed(3)
    mod = SparseLowRankLinear.from_dense(torch.randn(20, 12), torch.randn(20), 3, 0.1)
    x = torch.randn(5, 12)
    lin = mod.to_dense()
    assert isinstance(lin, nn.Linear)
    torch.testing.assert_close(lin(x), mod(x), rtol=1e-6, atol=1e-6)


def test_negative_excluded_and_non_linear_sites_untouched():
    model = MLP()
    pol = {"version": 1, "rules": [{"match": "gate", "rewrite": None},
                                   {"match": "*", "rewrite": "sparse_lowrank", "with": {"rank": 4}}]}
    m = sr.rewrite(model, pol).model
    assert isinstance(m.gate, nn.Linear) and torch.equal(m.gate.weight, model.gate.weight)
    assert isinstance(m.norm, nn.LayerNorm)
    assert isinstance(m.up, SparseLowRankLinear)


def test_near_miss_is_left_alone():
    class NotLinear(nn.Module):         # has a 2-D weight, but is not a Linear
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))
            self.bias = None
    model = nn.Sequential(NotLinear(), nn.Linear(4, 4))
    res = sr.rewrite(model, {"version": 1, "rules": [{"match": {"type": "Module"}, "rewrite": "sparse_lowrank",
                                                      "with": {"rank": 2}}]})
    assert isinstance(res.model[0], NotLinear) and isinstance(res.model[1], SparseLowRankLinear)


def test_idempotent():
    model = MLP()
    once = sr.rewrite(model, policy("*", rank=4))
    twice = sr.rewrite(once.model, policy("*", rank=4))
    assert [s.status for s in twice.report.sites] == ["unchanged"] * 3
    assert not twice.report.passes[0]["modified"]
    for (k, v), (k2, v2) in zip(once.model.state_dict().items(), twice.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_report_and_plan_of_a_partly_rewritten_model():
    """A second rewrite over sites already rewritten: the plan prints, and the report gives
    those sites their cost as they are (strict JSON: no NaN), with totals that follow the
    model's parameters."""
    import json
    once = sr.rewrite(MLP(), policy("up", rank=4))
    plan = sr.plan(once.model, policy("*", rank=4))
    assert [e.done for e in plan] == [True, False, False]
    assert "already rewritten" in str(plan) and plan.to_rows()[0]["options"] == {}
    again = sr.rewrite(once.model, policy("*", rank=4))
    up = [s for s in again.report.sites if s.site == "up"][0]
    assert up.status == "unchanged" and up.before == up.after
    assert up.after == sr.rewrite(MLP(), policy("up", rank=4)).report.sites[0].after
    json.loads(again.report.to_json(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert "| total |" in again.report.to_markdown() and "nan" not in str(again.report)
    t = again.report.totals()
    assert (again.report.model_params_before - again.report.model_params_after
            == t["before"]["params"] - t["after"]["params"])


def test_input_model_not_mutated_unless_inplace():
    model = MLP()
    sr.rewrite(model, policy("*"))
    assert isinstance(model.up, nn.Linear)
    res = sr.rewrite(model, policy("*"), inplace=True)
    assert res.model is model and isinstance(model.up, SparseLowRankLinear)


def test_exactness_check_catches_a_wrong_exact_rewrite(monkeypatch):
    from structrewrite.passes import sparse_lowrank as mod
    monkeypatch.setattr(mod.SparseLowRankPass, "is_exact", lambda self, o, d: True)
    with pytest.raises(VerificationError, match="exact by construction but differs"):
        sr.rewrite(MLP(), policy("up", rank=2, density=0.0))


def test_exception_in_a_pass_names_pass_and_site(monkeypatch):
    from structrewrite.nn import sparse_lowrank as nnmod

    def boom(*a, **k):
        raise RuntimeError("bad weight")
    monkeypatch.setattr(nnmod.SparseLowRankLinear, "from_dense", boom)
    with pytest.raises(sr.rewriter.manager.RewriteError,
                       match=r"pass sparse_lowrank failed on site up \(Linear\): RuntimeError: bad weight"):
        sr.rewrite(MLP(), policy("up"))


def test_report_formats():
    res = sr.rewrite(MLP(), policy("*", rank=4))
    text = str(res.report)
    assert "sparse_lowrank" in text and "total" in text
    md = res.report.to_markdown()
    assert md.count("| up |") + md.count("| down |") + md.count("| gate |") == 3
    assert "r*(m + n)" in md
    import json
    data = json.loads(res.report.to_json())
    assert data["totals"]["after"]["params"] < data["totals"]["before"]["params"]
    assert len(data["sites"]) == 3


# -- block supports (block: 16/32/64) ------------------------------------------------
def _tiles(mod):
    """The set of (tile row, tile column) the support covers, and whether all are whole."""
    b = mod.block
    dense = torch.zeros(mod.out_features, mod.in_features, dtype=torch.bool)
    dense[mod.sparse_row.long(), mod.sparse_col.long()] = True
    whole = dense[: mod.out_features // b * b, : mod.in_features // b * b]
    grid = whole.reshape(mod.out_features // b, b, mod.in_features // b, b).permute(0, 2, 1, 3)
    counts = grid.sum(dim=(2, 3))
    return counts, bool(dense.sum() == whole.sum())


@pytest.mark.parametrize("init", ["random", "svd"])
@pytest.mark.parametrize("block", [16, 32])
def test_block_support_is_whole_tiles_and_matches_the_formula(init, block):
    model = nn.Sequential(nn.Linear(100, 72), nn.ReLU(), nn.Linear(72, 130))
    res = sr.rewrite(model, policy("*", rank=6, density=0.2, init=init, block=block))
    for site in res.report.sites:
        mod = res.model.get_submodule(site.site)
        assert mod.block == block
        counts, inside = _tiles(mod)
        assert inside and set(counts.unique().tolist()) <= {0, block * block}   # whole tiles only
        whole = (mod.out_features // block) * (mod.in_features // block)
        expect = min(round(0.2 * mod.out_features * mod.in_features / block**2), whole)
        assert int((counts > 0).sum()) == expect and mod.nnz == expect * block * block
        assert mod.nnz == support_size(mod.out_features, mod.in_features, 0.2, init, block)
        assert site.after["params"] == sum(p.numel() for p in mod.parameters())


def test_block_svd_keeps_the_tiles_of_largest_residual_and_is_exact_at_full_rank():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight[16:32, 32:48] += 5.0 * torch.randn(16, 16)   # far from low rank: it must be kept
    res = sr.rewrite(nn.Sequential(lin), policy("*", rank=2, density=0.07, init="svd", block=16))
    counts, _ = _tiles(res.model[0])
    assert counts[1, 2] == 256
    x = torch.randn(5, 64)
    full = sr.rewrite(nn.Sequential(lin), policy("*", rank=64, density=0.07, init="svd", block=16),
                      example_inputs=(x,))
    assert full.report.sites[0].exact and full.report.sites[0].verified < 1e-5


def test_block_budget_and_refusals():
    model = nn.Sequential(nn.Linear(128, 128))
    res = sr.rewrite(model, {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                     "with": {"params": 0.5, "density": 0.05, "init": "random", "block": 32}}]})
    mod = res.model[0]
    assert sum(p.numel() for p in mod.parameters()) <= 0.5 * (128 * 128 + 128)
    with pytest.raises(Exception, match="lost"):
        sr.rewrite(model, policy("*", init="lost", block=16))
    with pytest.raises(Exception, match="no whole"):
        sr.rewrite(nn.Sequential(nn.Linear(12, 40)), policy("*", init="random", block=16))
    with pytest.raises(Exception, match="block"):
        sr.rewrite(model, policy("*", init="random", block=8))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64,
                                              batch_first=True, dropout=0.0)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.enc(x))


def test_torch_transformer_layers_that_read_weights_directly():
    """nn.MultiheadAttention reads out_proj's weight instead of calling it: {type: Linear}
    leaves it alone. The encoder layer's inference fast path reads linear1/linear2 too: the
    rewrite says so, and with the fast path off the full-rank rewrite is exact."""
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 5, 32)
    rule = policy({"name": "enc.**", "type": "Linear"}, rank=32, density=0.0)
    assert "enc.self_attn.out_proj" not in [e.fqn for e in sr.plan(model, rule)]
    with pytest.raises(sr.PolicyError, match="nn.MultiheadAttention reads its out_proj"):
        sr.plan(model, policy("enc.self_attn.out_proj", rank=4))
    with pytest.warns(UserWarning, match="set_fastpath_enabled"):
        result = sr.rewrite(model, rule, example_inputs=(x,))
    with torch.no_grad():
        want = model(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            got = result.model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


class Router(nn.Linear):
    """An nn.Linear subclass with a forward of its own (HF's MoE routers): not a linear map."""
    def forward(self, x):
        logits = F.linear(x, self.weight)
        return logits.softmax(-1), logits.argmax(-1)


class MatmulLinear(nn.Linear):
    """A forward of its own that computes the linear map (Falcon's ``FalconLinear``)."""
    def forward(self, x):
        return x @ self.weight.T + self.bias


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = Router(16, 4, bias=False)
        self.up = MatmulLinear(16, 32)

    def forward(self, x):
        probs, _ = self.router(x)
        return self.up(x) * probs.sum(-1, keepdim=True)


def test_linear_subclasses_are_sites_only_where_they_compute_the_linear_map():
    """A subclass whose forward is not x Wᵀ + b is refused (named alone: an error with the
    reason; under a type rule: left as it is); one whose forward computes it is a site."""
    torch.manual_seed(0)
    with pytest.raises(sr.PolicyError, match=r"router .*fails constraint 'linear_forward'"):
        sr.plan(Experts(), {"version": 1, "rules": [{"match": "router", "rewrite": "sparse_lowrank",
                                                     "with": {"rank": 2}}]})
    policy = {"version": 1, "rules": [{"match": {"type": "Linear"}, "rewrite": "sparse_lowrank",
                                       "with": {"rank": 16, "density": 1.0, "init": "svd"}}]}
    model = Experts()
    x = torch.randn(5, 16)
    result = sr.rewrite(model, policy, example_inputs=(x,))
    assert [e.fqn for e in result.plan] == ["up"]
    assert type(result.model.router) is Router
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)
    with torch.device("meta"):   # on meta, by the output's shape
        assert [e.fqn for e in sr.plan(Experts(), policy)] == ["up"]


def test_sites_the_example_inputs_never_call_are_named():
    model = MLP()
    model.spare = nn.Linear(24, 24)      # never called by forward
    with pytest.warns(UserWarning, match=r"1 site\(s\) were not called by the example inputs \(spare\)"):
        sr.rewrite(model, policy("*"), example_inputs=(torch.randn(3, 24),))


def test_a_block_support_too_coarse_for_the_layer_is_named():
    """At 3% a 24x40 layer holds no 16x16 tile: the rewrite says so."""
    with pytest.warns(UserWarning, match="at density 0.03 a layer holds no whole 16x16 tile"):
        result = sr.rewrite(MLP(), policy("*", density=0.03, init="random", block=16))
    assert all(m.nnz == 0 for m in result.model.modules() if isinstance(m, SparseLowRankLinear))


def test_planning_a_linear_subclass_leaves_the_random_stream_alone():
    """The check of a subclass's own forward draws its input from a generator of its own."""
    model = Experts()
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    sr.plan(model, {"version": 1, "rules": [{"match": {"type": "Linear"},
                                             "rewrite": "sparse_lowrank", "with": {"rank": 2}}]})
    assert torch.equal(torch.rand(4), want)


def test_hooks_on_a_rewritten_layer_go_on_with_the_new_one():
    """Forward hooks and pre-hooks registered on a site keep running on its replacement
    (they were dropped without a word), the handles still remove them, and an exact
    rewrite of a hooked layer verifies (it compared the hooked original with the bare
    replacement). The compile backend, which keeps them too, agrees."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    handle = net[0].register_forward_hook(lambda mod, args, out: out * 0.5)
    pre = net[2].register_forward_pre_hook(lambda mod, args: (args[0] + 1.0,))
    full = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                     "with": {"rank": 8, "density": 1.0, "init": "svd"}}]}
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = net(x)
        res = sr.rewrite(net, full, example_inputs=(x,), inplace=True)
        assert all(s.verified is not None and s.verified < 1e-5 for s in res.report.sites)
        assert isinstance(net[0], SparseLowRankLinear)
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
        handle.remove()
        pre.remove()
        assert not net[0]._forward_hooks and not net[2]._forward_pre_hooks
        net2 = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
        net2[0].register_forward_hook(lambda mod, args, out: out * 0.0)
        lossy = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                          "with": {"rank": 4, "density": 0.1, "init": "svd"}}]}
        eager = sr.rewrite(net2, lossy).model
        assert eager[0]._forward_hooks
        torch._dynamo.reset()
        compiled = torch.compile(net2, backend="structrewrite",
                                 options={"policy": lossy, "compiler": "eager"})
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrap", ["spectral_norm", "weight_norm", "prune"])
def test_weight_reparametrizations_stay_behind_with_a_warning(wrap):
    """weight_norm, spectral_norm and pruning compute ``weight`` in a pre-hook from tensors
    of the old module: carried over, they broke the new layer's first call. They stay
    behind (a warning names them); the layer holds the effective weight (exact at full
    rank). The exact check runs the modules' forward alone: hooks do not fire on the
    replacement during the rewrite."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    if wrap == "prune":
        nn.utils.prune.l1_unstructured(lin, "weight", 0.3)
    else:
        lin = getattr(nn.utils, wrap)(lin)
    model = nn.Sequential(lin, nn.ReLU()).eval()
    calls = []
    model[0].register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))
    x = torch.randn(3, 16)
    full = {"version": 1, "rules": [{"match": "0", "rewrite": "sparse_lowrank",
                                     "with": {"rank": 8, "density": 1.0, "init": "svd"}}]}
    with torch.no_grad():
        want = model(x)
        calls.clear()
        with pytest.warns(UserWarning, match="is not carried to the rewritten layer"):
            res = sr.rewrite(model, full, example_inputs=(x,), inplace=True)
        assert "SparseLowRankLinear" not in calls
        torch.testing.assert_close(res.model(x), want, rtol=1e-5, atol=1e-5)
        assert calls[-1] == "SparseLowRankLinear"   # the user's own hook went on


class _DropoutLinear(nn.Linear):
    """A Linear subclass whose own forward draws random numbers (dropout, train mode)."""

    def forward(self, x):
        return super().forward(nn.functional.dropout(x, 0.1, self.training))


def test_planning_rewriting_and_merging_back_leave_the_callers_random_stream_alone():
    """``plan`` and ``rewrite`` probe a subclass's forward (which here uses dropout), and
    ``to_dense`` builds an nn.Linear or HF Conv1D whose initialisation the merge
    overwrites: none of them moves the caller's random stream."""
    net = nn.Sequential(_DropoutLinear(16, 16), nn.Linear(16, 8))
    policy = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                       "with": {"rank": 4}, "optional": True}]}
    layer = sr.rewrite(net, policy).model[1]
    conv1d = copy.deepcopy(layer)
    conv1d.merges_into = "conv1d"
    for step in (lambda: sr.plan(net, policy), lambda: sr.rewrite(net, policy),
                 layer.to_dense, conv1d.to_dense):
        torch.manual_seed(7)
        want = torch.rand(3)
        torch.manual_seed(7)
        step()
        assert torch.equal(torch.rand(3), want), step
