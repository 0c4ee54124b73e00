"""torch.compile backend "structrewrite": without a policy (Inductor around opaque ops,
training through AOTAutograd) and with one (frozen rewrite of the captured graph)."""
import subprocess
import sys
import textwrap

import pytest
import torch

import structrewrite as sr
from structrewrite.nn import SparseLowRankLinear
from structrewrite.rewriter import backend as backend_mod

pytest.importorskip("transformers")

from hf_tiny import policy, tiny_gpt2, tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def n_structured(model):
    return sum(isinstance(m, SparseLowRankLinear) for m in model.modules())


def test_fqn_from_dynamo_sources():
    assert backend_mod.fqn_from_source("L['self'].model.layers[0].mlp.gate_proj") == \
        "model.layers.0.mlp.gate_proj"
    assert backend_mod.fqn_from_source("L['args'][0].transformer.h[1].attn.c_attn") == \
        "transformer.h.1.attn.c_attn"
    assert backend_mod.fqn_from_source("L['self']._modules['proj']") == "proj"
    assert backend_mod.fqn_from_source("G['net'].blocks[2].up") == "blocks.2.up"
    assert backend_mod.fqn_from_source("L['fn'].__self__.2.0") == "2.0"
    assert backend_mod.fqn_from_source("G['enc'][0]", named_roots=True) == "enc.0"
    assert backend_mod.fqn_from_source("L['args'][1].up", named_roots=True) == "args.1.up"
    assert backend_mod.fqn_from_source("L['self'].model.up", named_roots=True) == "model.up"


def test_no_policy_training_step_through_opaque_op_equals_eager():
    """A model rewritten eagerly, compiled without a policy: the op stays one extern call in
    Inductor's code (forward and backward), and one training step matches eager."""
    from torch._inductor.utils import run_and_get_code

    rewritten = sr.rewrite(tiny_llama(), policy("model.layers.*.mlp.*_proj")).model.train()
    assert n_structured(rewritten) == 6
    compiled_model = sr.rewrite(tiny_llama(), policy("model.layers.*.mlp.*_proj")).model.train()
    compiled = torch.compile(compiled_model, backend="structrewrite", dynamic=False)
    ids = torch.randint(0, 128, (2, 8))

    def step(fn, model):
        out = fn(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), out.logits.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss, logits, grads), (code_fwd, *code_bwd) = run_and_get_code(step, compiled, compiled_model)
    ref_loss, ref_logits, ref_grads = step(rewritten, rewritten)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    assert any(".mlp.gate_proj.values" in n for n in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)
    code = "\n".join([code_fwd, *code_bwd])
    assert code.count("torch.ops.structrewrite.sparse_lowrank_linear.default(") == 6
    assert code.count("torch.ops.structrewrite.sparse_lowrank_linear_backward.default(") == 6


def test_no_policy_gpt2_equals_eager():
    model = tiny_gpt2()
    compiled = torch.compile(model, backend="structrewrite", dynamic=False)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_policy_llama_equals_eager_rewrite_under_inductor():
    model = tiny_llama()
    pol = policy("model.layers.*.mlp.*_proj")
    eager = sr.rewrite(model, pol).model
    backend_mod._ANNOUNCED.clear()
    compiled = torch.compile(model, backend="structrewrite", options={"policy": pol},
                             dynamic=False)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad(), pytest.warns(UserWarning, match="inference mode.*frozen"):
        out = compiled(ids).logits
    with torch.no_grad():
        ref = eager(ids).logits
        dense = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert (dense - ref).abs().max() > 1e-2          # rank 8 is lossy: the rewrite did fire
    # the eager model itself is untouched
    assert n_structured(model) == 0


def test_policy_gpt2_conv1d_sites_and_full_rank_exact():
    """Conv1D sites (addmm on a transposed weight) are found and rewritten; at full rank the
    frozen rewrite equals the dense model, and equals sr.rewrite at low rank."""
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (3, 5))
    for rank, against_dense in [(64, True), (8, False)]:
        torch._dynamo.reset()
        pol = policy("transformer.h.*.*.c_*", rank=rank, density=0.01)
        graph_modules = []

        def keep(gm, example_inputs, **kwargs):
            compiled = backend_mod.structrewrite_backend(gm, example_inputs, **kwargs)
            graph_modules.append(gm)
            return compiled

        compiled = torch.compile(model, backend=keep, options={"policy": pol, "compiler": "eager"})
        with torch.no_grad():
            out = compiled(ids).logits
            ref = (model if against_dense else sr.rewrite(model, pol).model)(ids).logits
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        installed = [n for gm in graph_modules for n in gm.graph.nodes
                     if n.op == "call_module" and n.target.startswith("structrewrite__")]
        assert len(installed) == 8
        assert not any(n.target is torch.addmm for gm in graph_modules for n in gm.graph.nodes)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(4))
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def compile_and_collect(model, options):
    graph_modules = []

    def keep(gm, example_inputs, **kwargs):
        compiled = backend_mod.structrewrite_backend(gm, example_inputs, **kwargs)
        graph_modules.append(gm)
        return compiled

    return torch.compile(model, backend=keep, options=options), graph_modules


def installed(graph_modules):
    return {n.target: gm.get_submodule(n.target) for gm in graph_modules
            for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("structrewrite__")}


def test_policy_resolves_like_sr_rewrite_and_recompile_reuses_modules():
    """Exact names, every-k-th block, keep rules and type selectors resolve on the graph as
    on the eager model; a recompile for a new shape reuses the rewritten modules."""
    torch.manual_seed(0)
    model = Toy().eval()
    pol = {"version": 1, "rules": [
        {"match": "blocks.2.up", "rewrite": None},
        {"match": {"every": 2}, "rewrite": "sparse_lowrank",
         "with": {"rank": 4, "density": 0.1, "init": "lost"}},
        {"match": "blocks.*.up", "rewrite": "sparse_lowrank", "with": {"rank": 2, "density": 0.2}},
        {"match": {"type": "Linear"}, "rewrite": None}]}
    eager = sr.rewrite(model, pol).model
    expected = {n for n, m in eager.named_modules() if isinstance(m, SparseLowRankLinear)}
    compiled, graph_modules = compile_and_collect(model, {"policy": pol, "compiler": "eager"})
    with torch.no_grad():
        for shape in [(2, 5, 16), (3, 7, 16)]:
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)
    assert len(graph_modules) == 2          # the second shape recompiled
    first, second = installed(graph_modules[:1]), installed(graph_modules[1:])
    assert {t.replace("structrewrite__", "").replace("__", ".") for t in first} == expected
    assert first.keys() == second.keys()
    assert all(first[k] is second[k] for k in first)
    assert all(not p.requires_grad for m in first.values() for p in m.parameters())


def test_type_selectors_see_the_parent_blocks_classes():
    """A rule that keeps whole blocks dense by their class (``{type: LlamaMLP}``) holds
    under the backend as under ``sr.rewrite``: the stand-in tree's parents are of the
    compiled model's classes, not plain modules."""
    torch._dynamo.reset()
    model = tiny_llama()
    pol = {"version": 1, "rules": [
        {"match": {"type": "LlamaMLP"}, "rewrite": None},
        {"match": "model.layers.*.*.*_proj", "rewrite": "sparse_lowrank",
         "with": {"rank": 8, "density": 0.05}}]}
    eager = sr.rewrite(model, pol).model
    expected = {n for n, m in eager.named_modules() if isinstance(m, SparseLowRankLinear)}
    assert expected and not any(".mlp." in n for n in expected)
    compiled, graph_modules = compile_and_collect(model, {"policy": pol, "compiler": "eager"})
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, atol=1e-5, rtol=1e-5)
    got = {t.replace("structrewrite__", "").replace("__", ".") for t in installed(graph_modules)}
    assert got == expected


def test_block_level_rules_are_reported_as_not_applied(monkeypatch):
    from types import SimpleNamespace

    from structrewrite.rewriter import registry

    kinds = {"sparse_lowrank": registry.get_pass("sparse_lowrank"),
             "attention_pass": SimpleNamespace(pattern=SimpleNamespace(types=("LlamaAttention",)))}
    monkeypatch.setattr(registry, "get_pass", kinds.__getitem__)
    rules = [SimpleNamespace(index=0, rewrite="sparse_lowrank"),
             SimpleNamespace(index=1, rewrite="attention_pass"),
             SimpleNamespace(index=2, rewrite=None)]
    found = backend_mod.unsupported_rules(SimpleNamespace(rules=rules))
    assert [r.index for r in found] == [1]


def test_policy_on_training_graph_is_refused():
    model = tiny_llama().train()
    compiled = torch.compile(model, backend="structrewrite",
                             options={"policy": policy("model.layers.*.mlp.*_proj")})
    with pytest.raises(Exception, match=r"inference graphs only.*sr\.rewrite"):
        compiled(torch.randint(0, 128, (2, 4)))


def test_backend_name_works_in_fresh_interpreter():
    """The entry point finds the backend before the package is imported (installed
    package only: from a source tree on ``PYTHONPATH`` there is no entry point)."""
    if not sr._backend_entry_point():
        pytest.skip("structrewrite is not installed here: no entry point declares the backend")
    code = textwrap.dedent("""
        import sys, torch
        assert "structrewrite" not in sys.modules
        lin = torch.nn.Linear(4, 4)
        x = torch.randn(2, 4)
        y = torch.compile(lin, backend="structrewrite")(x)
        torch.testing.assert_close(y, lin(x))
        assert "structrewrite.rewriter.backend" in sys.modules
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


def test_backend_name_works_from_a_source_tree_without_entry_point():
    """Run from a checkout (``PYTHONPATH``, no install, so no entry point): importing the
    package registers the name itself."""
    code = textwrap.dedent("""
        import importlib.metadata as md, torch
        real = md.entry_points
        md.entry_points = lambda **kw: [] if kw.get("group") == "torch_dynamo_backends" else real(**kw)
        import torch._dynamo.backends.registry as reg
        reg._discover_entrypoint_backends = lambda *a, **k: {}   # as if nothing were installed
        import structrewrite
        assert "structrewrite" in torch._dynamo.list_backends(exclude_tags=())
        lin = torch.nn.Linear(4, 4)
        x = torch.randn(2, 4)
        torch.testing.assert_close(torch.compile(lin, backend="structrewrite")(x), lin(x))
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


def test_policy_on_a_model_made_under_inference_mode(monkeypatch):
    """Weights made under ``torch.inference_mode`` keep no version counter, which the cache
    of rewritten modules reads: the policy still applies (exact at full rank)."""
    torch._dynamo.reset()
    monkeypatch.setattr(backend_mod, "_ANNOUNCED", [])   # the notice, given once per process
    with torch.inference_mode():
        model = tiny_llama()
        ids = torch.randint(0, 128, (1, 8))
        compiled = torch.compile(model, backend="structrewrite", options={
            "policy": policy("model.layers.*.mlp.*_proj", rank=64, density=1.0)})
        with pytest.warns(UserWarning, match="policy applied at compile time to 6 site"):
            got = compiled(ids).logits
        assert torch.allclose(got, model(ids).logits, atol=1e-4)


def test_tied_weights_are_left_as_sr_rewrite_leaves_them():
    """GPT-2's lm_head holds wte's weight. The stand-in tree holds the one weight in both
    places, so the policy sees the tie as on the eager model: a broad rule leaves lm_head
    dense with a warning; a rule that names it alone, which fails ``sr.rewrite``, leaves it
    with the same warning (the backend's rules are optional: a graph holds part of a
    model)."""
    model = tiny_gpt2()
    pol = {"version": 1, "rules": [{"match": "**", "rewrite": "sparse_lowrank",
                                    "with": {"rank": 8, "density": 0.05}}]}
    with pytest.warns(UserWarning, match="lm_head is left as it is: it shares its weight"):
        eager = sr.rewrite(model, pol).model
    assert type(eager.lm_head).__name__ == "Linear"
    with pytest.warns(UserWarning, match="lm_head is left as it is"):
        compiled, graph_modules = compile_and_collect(model, {"policy": pol, "compiler": "eager"})
        ids = torch.randint(0, 128, (2, 7))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, atol=1e-5, rtol=1e-5)
    got = {t.replace("structrewrite__", "").replace("__", ".") for t in installed(graph_modules)}
    assert got == {n for n, m in eager.named_modules() if isinstance(m, SparseLowRankLinear)}
    torch._dynamo.reset()
    alone = {"version": 1, "rules": [{"match": "lm_head", "rewrite": "sparse_lowrank",
                                      "with": {"rank": 8, "density": 0.05}}]}
    with pytest.raises(sr.PolicyError, match="lm_head.*shares its weight with transformer.wte"):
        sr.rewrite(model, alone)
    with pytest.warns(UserWarning, match="lm_head is left as it is: it shares its weight"):
        compiled, graph_modules = compile_and_collect(model, {"policy": alone, "compiler": "eager"})
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
    assert not installed(graph_modules)


NET = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
ENC = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU())
DEC = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU())


def _through_global(x):
    return NET(x)


def _through_two_globals(x):
    return DEC(ENC(x))


def test_modules_reached_through_a_global_or_a_bound_method_keep_their_names():
    """A compiled function that calls a module held in a global, and a compiled bound
    ``forward``, name the sites as the module does (Dynamo's paths start at ``G['NET']``
    and ``L['fn'].__self__``). Modules from two variables keep the variables' names."""
    pol = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                    "with": {"rank": 4, "density": 0.1}}]}
    eager = sr.rewrite(NET, pol).model.eval()
    x = torch.randn(3, 16)
    for fn in (_through_global, NET.forward, NET):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="structrewrite",
                                 options={"policy": pol, "compiler": "eager"})
        with torch.no_grad():
            assert (compiled(x) - eager(x)).abs().max() < 1e-6, fn
    torch._dynamo.reset()
    two = {"version": 1, "rules": [{"match": "ENC.0", "rewrite": "sparse_lowrank",
                                    "with": {"rank": 4, "density": 0.1}}]}
    compiled, graph_modules = compile_and_collect(_through_two_globals,
                                                  {"policy": two, "compiler": "eager"})
    with torch.no_grad():
        y = compiled(x)
        enc = sr.rewrite(ENC, {"version": 1, "rules": [{**two["rules"][0], "match": "0"}]}).model
        torch.testing.assert_close(y, DEC(enc(x)), atol=1e-6, rtol=1e-6)
    assert set(installed(graph_modules)) == {"structrewrite__ENC__0"}

    class Head(torch.nn.Module):   # its own linear, then a module held in a global
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            return ENC(self.proj(x))

    torch._dynamo.reset()
    head = Head().eval()
    compiled, graph_modules = compile_and_collect(head, {"policy": {"version": 1, "rules": [
        {"match": "proj", "rewrite": "sparse_lowrank", "with": {"rank": 4, "density": 0.1}},
        {"match": "ENC.0", "rewrite": "sparse_lowrank", "with": {"rank": 4, "density": 0.1}}]},
        "compiler": "eager"})
    with torch.no_grad():
        compiled(x)
    assert set(installed(graph_modules)) == {"structrewrite__proj", "structrewrite__ENC__0"}


def test_a_module_registered_under_two_names_is_one_site():
    """As under ``sr.rewrite``: one module registered twice is replaced by one module, not
    refused as two modules with tied weights (Dynamo names both calls by the first name)."""
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16)
            self.b = self.a

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = Twice().eval()
    pol = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                    "with": {"rank": 4, "density": 0.1}}]}
    eager = sr.rewrite(model, pol).model
    assert eager.a is eager.b and isinstance(eager.a, SparseLowRankLinear)
    compiled, graph_modules = compile_and_collect(model, {"policy": pol, "compiler": "eager"})
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-6, rtol=1e-6)
    assert set(installed(graph_modules)) == {"structrewrite__a"}


def test_linears_chained_directly_are_both_rewritten():
    """The second linear's input is the first's output, which the first's replacement
    replaces: its call is made from its input as it stands then."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8)).eval()
    pol = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                    "with": {"rank": 4, "density": 0.1}}]}
    eager = sr.rewrite(model, pol).model
    compiled, graph_modules = compile_and_collect(model, {"policy": pol, "compiler": "eager"})
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-6, rtol=1e-6)
    assert set(installed(graph_modules)) == {"structrewrite__0", "structrewrite__1"}


class _MatmulLinear(torch.nn.Linear):
    """A linear layer whose forward computes the product itself (Falcon's FalconLinear)."""
    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_selected_layers_without_a_linear_call_are_named():
    """sr.rewrite rewrites a layer whose forward computes x @ W.T + b; the backend sees no
    linear call to replace: it leaves the layer and says which, instead of nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_MatmulLinear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    pol = {"version": 1, "rules": [{"match": {"type": "Linear"}, "rewrite": "sparse_lowrank",
                                    "with": {"rank": 4, "density": 0.1}}]}
    assert [e.fqn for e in sr.plan(model, pol)] == ["0", "2"]
    x = torch.randn(3, 16)
    compiled = torch.compile(model, backend="structrewrite", options={"policy": pol, "compiler": "eager"})
    with pytest.warns(UserWarning, match=r"1 linear layer\(s\) that the policy selects made no "
                      r"linear call in the captured graph \(0 \(_MatmulLinear\)"):
        with torch.no_grad():
            y = compiled(x)
    with torch.no_grad():
        torch.testing.assert_close(y, sr.rewrite(model, _only("2", pol)).model(x))


def _only(name, pol):
    return {"version": 1, "rules": [{**pol["rules"][0], "match": name}]}


@pytest.mark.parametrize("init", ["random", "svd", "lost"])
def test_policy_under_autocast_equals_sr_rewrite(init):
    """Under ``torch.autocast``: the backend rewrites with autocast off (the SVD and the
    checks in float32, as ``sr.rewrite`` inside autocast does) and the rewritten layers,
    traced into the graph, compute in bf16 as eager ones do; a dense layer kept beside
    them (bf16 under autocast) no longer meets float32 operands."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    pol = {"version": 1, "rules": [{"match": "0", "rewrite": None},
                                   {"match": "2", "rewrite": "sparse_lowrank",
                                    "with": {"rank": 8, "density": 0.1, "init": init}}]}
    x = torch.randn(4, 64)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = sr.rewrite(net, pol).model(x)
        got = torch.compile(net, backend="structrewrite", options={"policy": pol})(x)
    assert want.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_a_fresh_compile_sees_new_weights_however_they_were_written():
    """The modules kept for recompiles are for the same weights only: after a load into an
    inference-mode model (no version counter), ``Module.to(float64)``, or a write through
    ``.data`` followed by ``forget_rewrites()``, a fresh compile rewrites from the weights
    as they are (it reused the first compile's modules: off by about 1e2, or a dtype
    error)."""
    pol = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                    "with": {"rank": 8, "density": 0.1, "init": "svd"}}]}
    x = torch.randn(4, 64)

    def twice(net, update, x=x):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(net, backend="structrewrite", options={"policy": pol})(x)
            changed = update(net)
            x = x if changed is None else changed
            torch._dynamo.reset()
            got = torch.compile(net, backend="structrewrite", options={"policy": pol})(x)
            torch.testing.assert_close(got, sr.rewrite(net, pol).model(x), rtol=1e-5, atol=1e-5)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                   torch.nn.Linear(64, 32)).eval()
    with torch.inference_mode():
        net = make()
        new = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
        twice(net, lambda n: None if n.load_state_dict(new) else None)
    twice(make(), lambda n: (n.to(torch.float64), x.double())[1])

    def data_write(n):
        for p in n.parameters():
            p.data.copy_(torch.randn_like(p))
        backend_mod.forget_rewrites()
    twice(make(), data_write)


def test_a_misspelt_option_names_the_backends_own():
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Linear(16, 8))
    with torch.no_grad(), pytest.raises(Exception, match="own options are 'policy' and 'compiler'"):
        torch.compile(net, backend="structrewrite", options={"polcy": {}})(torch.randn(2, 16))


def test_sr_rewrite_of_a_compiled_wrapper_says_what_to_rewrite():
    """``torch.compile(model)``'s wrapper names every module ``_orig_mod.*``: a policy's
    names matched nothing, and a rewrite with globs saved checkpoints under those names."""
    wrapper = torch.compile(torch.nn.Sequential(torch.nn.Linear(16, 8)))
    pol = {"version": 1, "rules": [{"match": "0", "rewrite": "sparse_lowrank",
                                    "with": {"rank": 4, "density": 0.1}}]}
    for fn in (sr.rewrite, sr.plan):
        with pytest.raises(TypeError, match="rewrite the model itself"):
            fn(wrapper, pol)


def test_a_misspelt_option_is_refused_with_the_eager_compiler_too():
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Linear(16, 8))
    with torch.no_grad(), pytest.raises(Exception, match="own options are 'policy' and 'compiler'"):
        torch.compile(net, backend="structrewrite",
                      options={"polcy": {}, "compiler": "eager"})(torch.randn(2, 16))
