"""Policy parsing, validation and resolution: every error names file, rule, line and fix."""
import json
import textwrap

import pytest
import torch
import torch.nn as nn
import yaml
from hypothesis import given, settings, strategies as st

import structrewrite as sr
from structrewrite.rewriter.policy import block_index


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(16, 16)
        self.up_proj = nn.Linear(16, 32)
        self.down_proj = nn.Linear(32, 16)
        self.act = nn.GELU()


class Net(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.layers = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(16, 10)


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def rule(match, rewrite="sparse_lowrank", **kw):
    out = {"match": match, "rewrite": rewrite}
    if rewrite is not None:
        out["with"] = kw or {"rank": 4}
    return out


def pol(*rules, **top):
    return {"version": 1, "rules": list(rules), **top}


# -- selection ---------------------------------------------------------------------

def test_glob_star_stays_within_one_segment():
    plan = sr.plan(Net(), pol(rule("layers.*.up_proj")))
    assert list(plan.entries) == [f"layers.{i}.up_proj" for i in range(4)]


def test_double_star_crosses_segments():
    plan = sr.plan(Net(), pol(rule("**.down_proj")))
    assert list(plan.entries) == [f"layers.{i}.down_proj" for i in range(4)]


def test_double_star_dot_also_stands_for_no_segment():
    """``**.head`` reaches a top-level ``head``; ``layers.**.up_proj`` one directly below."""
    assert list(sr.plan(Net(), pol(rule("**.head"))).entries) == ["head"]
    assert list(sr.plan(Net(), pol(rule("**.0.**.up_proj"))).entries) == ["layers.0.up_proj"]
    net = Net()
    net.layers.add_module("up_proj", nn.Linear(16, 8))
    assert list(sr.plan(net, pol(rule("layers.**.up_proj"))).entries) == \
        [f"layers.{i}.up_proj" for i in range(4)] + ["layers.up_proj"]


def test_an_exponent_yaml_reads_as_text_is_named():
    with pytest.raises(sr.PolicyError, match=r"got the string '3e-2' \(YAML reads .* as text\)"
                       r".*Fix: write density as 0.03"):
        sr.Policy.from_dict(yaml.safe_load(textwrap.dedent("""
            version: 1
            rules:
              - {match: head, rewrite: sparse_lowrank, with: {rank: 4, density: 3e-2}}
            """)))


def test_regex_is_a_fullmatch():
    plan = sr.plan(Net(), pol(rule("re:layers\\.[02]\\.(up|down)_proj")))
    assert list(plan.entries) == ["layers.0.up_proj", "layers.0.down_proj",
                                  "layers.2.up_proj", "layers.2.down_proj"]
    with pytest.raises(sr.PolicyError, match="matches nothing"):
        sr.plan(Net(), pol(rule("re:up_proj")))   # a search would match; a fullmatch does not


def test_type_selector_and_every_kth_block():
    plan = sr.plan(Net(n=8), pol(rule({"name": "layers.*.*", "type": "Linear", "every": 4, "offset": 1})))
    assert sorted({block_index(f) for f in plan.entries}) == [1, 5]
    assert len(plan) == 6


def test_first_matching_rule_wins_and_null_keeps_dense():
    plan = sr.plan(Net(), pol(rule("layers.0.*", None), rule("layers.*.*", rank=2), rule("**", rank=8)))
    assert "layers.0.up_proj" not in plan and "layers.0.up_proj" in plan.kept
    assert plan["layers.1.up_proj"].options.rank == 2
    assert plan["head"].options.rank == 8


def test_exact_name_beats_an_earlier_pattern():
    plan = sr.plan(Net(), pol(rule("layers.*.up_proj", rank=2), rule("layers.3.up_proj", rank=7)))
    assert plan["layers.3.up_proj"].options.rank == 7
    assert plan["layers.2.up_proj"].options.rank == 2


def test_null_on_a_block_keeps_its_whole_subtree():
    plan = sr.plan(Net(), pol(rule("layers.1", None), rule("**", rank=4)))
    assert not any(f.startswith("layers.1.") for f in plan.entries)
    assert "layers.0.attn" in plan


def test_defaults_apply_and_rules_override():
    plan = sr.plan(Net(), pol(rule("head", rank=4, seed=3), rule("layers.*.attn", rank=4),
                              defaults={"seed": 11, "density": 0.1}))
    assert plan["head"].options.seed == 3 and plan["layers.0.attn"].options.seed == 11
    assert plan["head"].options.density == 0.1


def test_budget_solves_rank_from_the_cost_formula():
    plan = sr.plan(Net(), pol(rule("layers.0.up_proj", params=0.5, density=0.05)))
    e = plan["layers.0.up_proj"]
    m, n = 32, 16
    nnz = round(0.05 * m * n)
    # largest r with r(m+n) + nnz + m <= 0.5 (mn + m)
    assert e.options.rank == (int(0.5 * (m * n + m)) - nnz - m) // (m + n)


def test_plan_is_a_dry_run():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sr.plan(net, pol(rule("**", rank=4)))
    assert all(isinstance(b.up_proj, nn.Linear) for b in net.layers)
    assert all((net.state_dict()[k] == v).all() for k, v in before.items())


# -- every error: file, rule, line, fix --------------------------------------------

def test_error_unknown_key_names_file_rule_and_line(tmp_path):
    path = write(tmp_path, """\
        version: 1
        rules:
          - match: head
            rewrite: sparse_lowrank
            with: {rank: 4}
          - match: "layers.*.attn"
            rewrite: sparse_lowrank
            options: {rank: 4}
        """)
    with pytest.raises(sr.PolicyError) as e:
        sr.plan(Net(), path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:6: rule 1: unknown key 'options' (did you mean 'with'?)")
    assert "Fix: use only match, rewrite, with, optional" in msg
    assert (e.value.rule, e.value.line, e.value.source) == (1, 6, str(path))


def test_error_unknown_pass(tmp_path):
    path = write(tmp_path, "version: 1\nrules:\n  - {match: head, rewrite: sparse_lowrnk}\n")
    with pytest.raises(sr.PolicyError, match=r"p.yaml:3: rule 0: unknown pass 'sparse_lowrnk'. "
                                             r"Fix: use one of sparse_lowrank"):
        sr.Policy.load(path)


@pytest.mark.parametrize("opts, problem", [
    ({"rank": "8"}, r"option 'rank' must be of type int, got '8'"),
    ({"rank": 4.0}, r"option 'rank' must be of type int"),
    ({"rank": True}, r"option 'rank' must be of type int"),
    ({"rank": 0}, r"option 'rank' = 0 is out of range \[1, inf\]"),
    ({"rank": 4, "density": 1.5}, r"option 'density' = 1.5 is out of range \[0.0, 1.0\]"),
    ({"rank": 4, "init": "kaiming"}, r"option 'init' must be one of random, svd, lost"),
    ({"rank": 4, "params": 0.5}, r"both 'rank' and the budget 'params' given"),
    ({"params": 2.0}, r"option 'params' = 2.0 is out of range"),
    ({"rank": 4, "ranks": 4}, r"unknown option 'ranks' for pass 'sparse_lowrank'"),
])
def test_error_bad_parameter(opts, problem):
    with pytest.raises(sr.PolicyError, match=r"<policy>: rule 0: " + problem + r".*Fix: "):
        sr.Policy.from_dict(pol({"match": "head", "rewrite": "sparse_lowrank", "with": opts}))


def test_error_rank_too_large_for_the_site():
    with pytest.raises(sr.PolicyError, match=r"rule 0: at head: rank 64 exceeds min\(out, in\) = 10 of this 10x16 layer"):
        sr.plan(Net(), pol(rule("head", rank=64)))


def test_error_budget_too_small():
    with pytest.raises(sr.PolicyError, match=r"leaves no room for rank >= 1.*Fix: raise 'params'"):
        sr.plan(Net(), pol(rule("head", params=0.01, density=0.5)))


def test_error_missing_rank():
    with pytest.raises(sr.PolicyError, match=r"needs 'rank' or the budget 'params'"):
        sr.plan(Net(), pol({"match": "head", "rewrite": "sparse_lowrank"}))


def test_error_rule_matches_nothing_and_optional(tmp_path):
    path = write(tmp_path, "version: 1\nrules:\n  - match: head\n    rewrite: null\n"
                           "  - match: 'blocks.*.mlp'\n    rewrite: sparse_lowrank\n    with: {rank: 4}\n")
    with pytest.raises(sr.PolicyError, match=r"p.yaml:5: rule 1: .*matches nothing.*Fix: correct the pattern"):
        sr.plan(Net(), path)
    data = yaml.safe_load(path.read_text())
    data["rules"][1]["optional"] = True
    assert len(sr.plan(Net(), data)) == 0


def test_error_rule_selects_only_modules_the_pass_cannot_rewrite():
    with pytest.raises(sr.PolicyError, match=r"cannot rewrite: layers.0.act \(is a GELU, expected one of"):
        sr.plan(Net(), pol(rule("layers.*.act")))


def test_error_malformed_yaml(tmp_path):
    path = write(tmp_path, "version: 1\nrules:\n  - match: [head\n    rewrite: null\n")
    with pytest.raises(sr.PolicyError, match=r"p.yaml:\d+: malformed YAML: .*Fix: correct the YAML syntax"):
        sr.Policy.load(path)


def test_error_malformed_json(tmp_path):
    path = write(tmp_path, '{"version": 1,\n "rules": [}\n', name="p.json")
    with pytest.raises(sr.PolicyError, match=r"p.json:2: malformed JSON"):
        sr.Policy.load(path)


def test_json_policy_with_lines(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(pol(rule("head"), rule("nothing.here")), indent=1))
    with pytest.raises(sr.PolicyError) as e:
        sr.plan(Net(), path)
    assert e.value.rule == 1 and e.value.line is not None


@pytest.mark.parametrize("data, problem", [
    ([], r"the policy must be a mapping, not list"),
    ({"version": 2, "rules": []}, r"unsupported version 2"),
    ({"version": 1, "rulez": []}, r"unknown top-level key 'rulez'"),
    ({"version": 1, "rules": {}}, r"'rules' must be a list"),
    ({"version": 1, "rules": ["head"]}, r"rule 0: a rule must be a mapping"),
    ({"version": 1, "rules": [{"rewrite": None}]}, r"rule 0: the rule has no 'match'"),
    ({"version": 1, "rules": [{"match": "head"}]}, r"rule 0: the rule has no 'rewrite'"),
    ({"version": 1, "rules": [{"match": 3, "rewrite": None}]}, r"'match' must be a name pattern"),
    ({"version": 1, "rules": [{"match": {"every": 0}, "rewrite": None}]}, r"'every' must be a positive"),
    ({"version": 1, "rules": [{"match": {"every": 2, "offset": 2}, "rewrite": None}]}, r"'offset' must be"),
    ({"version": 1, "rules": [{"match": {"offset": 1}, "rewrite": None}]}, r"'offset' without 'every'"),
    ({"version": 1, "rules": [{"match": {"kind": "x"}, "rewrite": None}]}, r"unknown selector key 'kind'"),
    ({"version": 1, "rules": [{"match": "re:(", "rewrite": None}]}, r"invalid regular expression"),
    ({"version": 1, "rules": [{"match": "x", "rewrite": None, "optional": "yes"}]}, r"'optional' must be"),
    ({"version": 1, "rules": [{"match": "x", "rewrite": None, "with": {"rank": 1}}]}, r"'with' given for"),
    ({"version": 1, "rules": [], "defaults": {"rnak": 1}}, r"unknown option 'rnak' in 'defaults'"),
    ({"version": 1, "rules": [], "defaults": {"seed": -1}}, r"out of range .* in 'defaults'"),
])
def test_error_structure(data, problem):
    with pytest.raises(sr.PolicyError, match=problem + r".*Fix: "):
        sr.Policy.from_dict(data)


def test_coerce_rejects_other_types():
    with pytest.raises(sr.PolicyError, match="a policy must be a path, a dict or a Policy"):
        sr.Policy.coerce(42)


def test_missing_file(tmp_path):
    with pytest.raises(sr.PolicyError, match="cannot read the policy file"):
        sr.Policy.load(tmp_path / "absent.yaml")


# -- fuzzing: random and mutated policies only ever give PolicyError or success -----

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
                     st.text(max_size=8), st.sampled_from(["head", "**", "layers.*.attn", "re:.*",
                                                           "sparse_lowrank", "svd", "lost", "random"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["match", "rewrite", "with", "optional", "rank", "density", "init", "params", "seed",
         "alpha", "name", "type", "every", "offset", "version", "rules", "defaults"]), inner, max_size=4)),
    max_leaves=12)

_good_rule = st.fixed_dictionaries({
    "match": st.sampled_from(["head", "**", "layers.*.attn", "layers.*.*", {"type": "Linear"},
                              {"name": "layers.*.*", "every": 2}, "re:layers\\.1\\..*", "nope"]),
    "rewrite": st.sampled_from(["sparse_lowrank", None]),
}, optional={"with": st.fixed_dictionaries({}, optional={
    "rank": st.integers(-2, 40), "density": st.floats(-0.5, 1.5), "params": st.floats(0, 1.2),
    "init": st.sampled_from(["svd", "lost", "random", "x"]), "alpha": st.floats(-1, 64),
    "seed": st.integers(-1, 5)}), "optional": st.booleans()})


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(_values, st.fixed_dictionaries(
    {"version": st.sampled_from([1, 2]), "rules": st.lists(st.one_of(_good_rule, _values), max_size=4)},
    optional={"defaults": st.one_of(st.dictionaries(st.sampled_from(["seed", "density", "x"]),
                                                    _scalars, max_size=2), _values)})))
def test_fuzz_policies_give_policyerror_or_a_plan(data):
    net = _FUZZ_NET
    try:
        plan = sr.plan(net, data)
    except sr.PolicyError as e:
        assert "Fix: " in str(e)
    else:
        assert all(e.fqn for e in plan)


_FUZZ_NET = Net(n=2)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="version: 1\nrules:-{}[]match rewrite with*.\"'#", max_size=80))
def test_fuzz_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fz") / "p.yaml"
    path.write_text(text)
    try:
        plan = sr.plan(_FUZZ_NET, path)
    except sr.PolicyError as e:
        assert str(e).startswith(str(path)) and "Fix: " in str(e)
    else:
        assert isinstance(plan, sr.Plan)


_VALID = {"version": 1, "defaults": {"seed": 1, "density": 0.05}, "rules": [
    {"match": "layers.*.attn", "rewrite": "sparse_lowrank", "with": {"rank": 4, "init": "svd"}},
    {"match": {"name": "layers.*.*", "type": "Linear", "every": 2}, "rewrite": "sparse_lowrank",
     "with": {"params": 0.5, "init": "lost"}},
    {"match": "head", "rewrite": None, "optional": True}]}

_path = st.lists(st.sampled_from(["rules", 0, 1, 2, "with", "match", "rewrite", "defaults", "rank",
                                  "init", "params", "every", "name", "type", "optional", "version"]),
                 min_size=1, max_size=4)


def _mutate(data, path, value, op):
    node = data
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return data
    key = path[-1]
    if isinstance(node, dict):
        if op == "delete":
            node.pop(key, None)
        else:
            node[key] = value
    elif isinstance(node, list) and isinstance(key, int) and key < len(node):
        if op == "delete":
            del node[key]
        else:
            node[key] = value
    return data


@settings(max_examples=200, deadline=None)
@given(mutations=st.lists(st.tuples(_path, _scalars, st.sampled_from(["set", "delete"])),
                          min_size=1, max_size=3))
def test_fuzz_mutated_valid_policy(mutations):
    import copy as _copy
    data = _copy.deepcopy(_VALID)
    assert len(sr.plan(_FUZZ_NET, data)) > 0           # the seed policy is valid
    for path, value, op in mutations:
        data = _mutate(data, path, value, op)
    try:
        sr.plan(_FUZZ_NET, data)
    except sr.PolicyError as e:
        assert "Fix: " in str(e)


class Tied(nn.Module):
    """A head that holds the embedding's weight (as GPT-2's lm_head does), and a layer
    registered under two names."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.mid = nn.Linear(16, 16)
        self.again = self.mid
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight


def _rule(match, **kw):
    return {"version": 1, "rules": [{"match": match, "rewrite": "sparse_lowrank",
                                     "with": {"rank": 4, "density": 0.1}, **kw}]}


def test_tied_weights_are_not_untied():
    """A rule naming a tied module fails with the reason and the fix; a broader rule
    leaves it as it is and says so; the tie holds and the model does not grow."""
    with pytest.raises(sr.PolicyError, match=r"head.*shares its weight with embed \(tied"):
        sr.plan(Tied(), _rule("head"))
    model = Tied()
    with pytest.warns(UserWarning, match="head is left as it is: it shares its weight with embed"):
        result = sr.rewrite(model, _rule({"type": "Linear"}))
    assert [e.fqn for e in result.plan] == ["mid"]
    assert result.model.head.weight is result.model.embed.weight
    assert result.report.model_params_after < result.report.model_params_before


class ReadsItsChild(nn.Module):
    """Reads its child's weight besides calling it, as HF's T5 FFN reads ``self.wo.weight``."""
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.wo = nn.Linear(32, 16)

    def forward(self, x):
        h = self.up(x).relu()
        return self.wo(h.to(self.wo.weight.dtype))


def test_a_layer_whose_parent_reads_its_weight_is_left_alone():
    """A rule naming the layer fails with the reason; a broader rule leaves it as it is,
    says so, and the rewritten model runs."""
    with pytest.raises(sr.PolicyError, match=r"wo \(is read by its parent \(ReadsItsChild's "
                       r"code reads self.wo.weight\)"):
        sr.plan(ReadsItsChild(), _rule("wo"))
    with pytest.warns(UserWarning, match=r"wo is left as it is: it is read by its parent"):
        result = sr.rewrite(ReadsItsChild(), _rule({"type": "Linear"}))
    assert [e.fqn for e in result.plan] == ["up"]
    assert result.model(torch.randn(3, 16)).shape == (3, 16)


def test_a_module_under_two_names_is_rewritten_under_both():
    """The same layer registered twice stays one layer: the rewrite replaces it under every
    name, and the model's parameter count follows the report's."""
    result = sr.rewrite(Tied(), _rule("mid"))
    new = result.model.mid
    assert type(new).__name__ == "SparseLowRankLinear" and result.model.again is new
    totals = result.report.totals()
    assert (result.report.model_params_before - result.report.model_params_after
            == totals["before"]["params"] - totals["after"]["params"])


def test_a_named_module_inside_a_claimed_subtree_says_which_rule_claims_it():
    with pytest.raises(sr.PolicyError, match=r"layers.1.attn lies inside layers.1, which rule 0 "
                       r"claims with its whole subtree.*Fix: narrow rule 0"):
        sr.plan(Net(), pol(rule("layers.1", None), rule("layers.1.attn")))
    with pytest.raises(sr.PolicyError, match=r"rule 0 names head first.*Fix: keep one rule"):
        sr.plan(Net(), pol(rule("head", rank=2), rule("head", rank=4)))


@pytest.mark.parametrize("used", [True, False])
def test_a_bad_default_is_blamed_on_the_defaults(used):
    rules = [rule("head")] if used else [rule("head", None)]
    with pytest.raises(sr.PolicyError, match=r"option 'density' = 1.5 is out of range .* in "
                       r"'defaults'") as info:
        sr.plan(Net(), pol(*rules, defaults={"density": 1.5}))
    assert info.value.rule is None


def test_a_path_that_cannot_name_a_file_is_a_policyerror():
    """A string policy is a path; one with a NUL byte (found by the fuzz test) cannot name
    a file, and says so as a PolicyError like a missing file."""
    with pytest.raises(sr.PolicyError, match=r"cannot read the policy file \(embedded null byte\)"):
        sr.plan(Net(), "\x00")
    with pytest.raises(sr.PolicyError, match=r"cannot read the policy file \(No such file"):
        sr.plan(Net(), "/nonexistent/policy.yaml")
