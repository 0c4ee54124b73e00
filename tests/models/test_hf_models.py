"""Real models built from small configs: HF Llama (nn.Linear) and GPT-2 (Conv1D)."""
import copy
import io

import pytest
import torch
from hf_tiny import tiny_gpt2, tiny_llama

import structrewrite as sr
from structrewrite.nn import SparseLowRankLinear

VOCAB = 101


def llama(seed):
    return tiny_llama(seed, vocab_size=VOCAB, intermediate_size=160, tie_word_embeddings=False,
                      use_cache=True)


def gpt2(seed):
    return tiny_gpt2(seed, vocab_size=VOCAB, use_cache=True)


MODELS = {
    "llama": (llama, {"version": 1, "defaults": {"seed": 0}, "rules": [
        {"match": "model.layers.*.self_attn.*_proj", "rewrite": "sparse_lowrank",
         "with": {"rank": 16, "density": 0.05, "init": "svd"}},
        {"match": "model.layers.*.mlp.*_proj", "rewrite": "sparse_lowrank",
         "with": {"params": 0.5, "density": 0.03, "init": "lost"}},
        {"match": "lm_head", "rewrite": None}]}, 14),
    "gpt2": (gpt2, {"version": 1, "rules": [
        {"match": "transformer.h.*.attn.c_*", "rewrite": "sparse_lowrank",
         "with": {"rank": 16, "density": 0.05}},
        {"match": "transformer.h.*.mlp.c_*", "rewrite": "sparse_lowrank",
         "with": {"rank": 24, "density": 0.03, "init": "random"}},
        {"match": "lm_head", "rewrite": None}]}, 8),
}


@pytest.fixture(params=list(MODELS))
def case(request):
    make, policy, n_sites = MODELS[request.param]
    return request.param, make, policy, n_sites


def batch(seed=0, b=4, t=24):
    g = torch.Generator().manual_seed(seed)
    # a learnable sequence: each token is the previous one plus one (mod VOCAB)
    start = torch.randint(0, VOCAB, (b, 1), generator=g)
    return (start + torch.arange(t)) % VOCAB


def test_rewrite_train_generate_and_reload(case):
    name, make, policy, n_sites = case
    model = make(0)
    original = copy.deepcopy(model.state_dict())
    ids = batch()
    res = sr.rewrite(model, policy, example_inputs=(ids,))
    m = res.model
    # structure: every attention and MLP projection rewritten; embeddings and head kept
    rewritten = [n for n, mod in m.named_modules() if isinstance(mod, SparseLowRankLinear)]
    assert len(rewritten) == n_sites == len(res.report.sites)
    assert type(m.lm_head).__name__ == "Linear"
    # the input model is unchanged
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(mod, SparseLowRankLinear) for mod in model.modules())
    assert res.report.model_params_after < res.report.model_params_before

    # forward, backward, a few optimizer steps lower the loss
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        loss = m(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for n, p in m.named_parameters() if ".values" in n)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses

    # generate() still works
    m.eval()
    out = m.generate(ids[:1, :5], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                     pad_token_id=0)   # no early end-of-sequence stop
    assert out.shape == (1, 11)

    # the state dict loads into the same rewrite of a fresh model and reproduces outputs
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = sr.rewrite(make(1), policy, example_inputs=(ids,)).model.eval()
    fresh.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, m(ids).logits)


def test_full_rank_rewrite_of_a_real_model_is_exact(case):
    name, make, policy, _ = case
    model = make(0).eval()
    sites = {"llama": "re:model\\.layers\\.\\d+\\.(self_attn\\.[qo]_proj|mlp\\.\\w+)",
             "gpt2": "transformer.h.*.*.c_*"}[name]
    full = {"version": 1, "rules": [{"match": sites, "rewrite": "sparse_lowrank",
                                     "with": {"rank": 64, "density": 0.0, "init": "svd"}}]}
    ids = batch(1)
    res = sr.rewrite(model, full, example_inputs=(ids,))
    assert len(res.report.sites) == {"llama": 10, "gpt2": 8}[name]
    assert all(s.exact for s in res.report.sites)
    with torch.no_grad():
        ref, out = model(ids).logits, res.model(ids).logits
    assert (out - ref).norm() / ref.norm() < 1e-5


def test_merged_back_model_has_the_original_state_dict(case):
    """``to_dense()`` gives back the class the rewrite replaced: GPT-2's Conv1D keeps its
    weight in x out, so the merged model's state dict loads into the stock model and
    computes what the rewritten one does (a Linear there would load transposed)."""
    name, make, policy, _ = case
    res = sr.rewrite(make(0), policy)
    merged = copy.deepcopy(res.model)
    for fqn, mod in list(merged.named_modules()):
        if isinstance(mod, SparseLowRankLinear):
            parent, _, leaf = fqn.rpartition(".")
            back = mod.to_dense()
            assert type(back).__name__ == ("Conv1D" if name == "gpt2" else "Linear"), fqn
            setattr(merged.get_submodule(parent), leaf, back)
    stock = make(1)
    stock.load_state_dict(merged.state_dict())
    ids = batch(2)
    with torch.no_grad():
        want = res.model(ids).logits
        assert (merged(ids).logits - want).abs().max() < 1e-4
        assert (stock(ids).logits - want).abs().max() < 1e-4


def test_save_pretrained_in_shards_reloads_into_a_fresh_rewrite(case, tmp_path):
    """HF's ``save_pretrained`` with small shards splits layers' support buffers over
    files. Loading it shard by shard (``strict=False``, as HF's sharded loading does) into
    the same rewrite of a fresh model, at another policy seed, gives back the model."""
    import json

    from safetensors.torch import load_file

    name, make, policy, _ = case
    m = sr.rewrite(make(0), policy).model.eval()
    m.save_pretrained(tmp_path, max_shard_size="6KB")
    where = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    split = {n for n, mod in m.named_modules() if isinstance(mod, SparseLowRankLinear)
             and len({where[f"{n}.{b}"] for b in ("sparse_crow", "sparse_col", "sparse_row")}) > 1}
    assert split, "no layer's support spans two shards: the test needs smaller shards"
    other = copy.deepcopy(policy)
    other["defaults"] = {**other.get("defaults", {}), "seed": 7}
    fresh = sr.rewrite(make(1), other).model.eval()
    for shard in sorted(set(where.values())):
        fresh.load_state_dict(load_file(tmp_path / shard), strict=False)
    ids = batch(3)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, m(ids).logits)


def test_t5_rewrite_leaves_the_ffn_output_its_block_reads():
    """HF's T5 FFN reads ``self.wo.weight`` (its dtype) besides calling ``wo``: a rule over
    all the blocks' linears leaves each ``wo`` dense with a warning, rewrites the rest,
    and the model runs, at full rank as the dense one."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                vocab_size=128, decoder_start_token_id=0, pad_token_id=0,
                                eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids, dec = torch.randint(3, 128, (2, 12)), torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=dec).logits
    policy = {"version": 1, "rules": [{"match": {"name": "re:(encoder|decoder)\\.block\\..*",
                                                 "type": "Linear"},
                                       "rewrite": "sparse_lowrank",
                                       "with": {"rank": 64, "density": 1.0, "init": "svd"}}]}
    with pytest.warns(UserWarning, match=r"DenseReluDense.wo is left as it is: it is read by its parent"):
        result = sr.rewrite(model, policy)
    sites = [e.fqn for e in result.plan]
    assert sites and not any(s.endswith(".wo") for s in sites)
    with torch.no_grad():
        got = result.model(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_save_pretrained_of_a_model_that_transformers_renames_reloads(tmp_path):
    """transformers 5's ``save_pretrained`` writes some architectures under their legacy
    checkpoint names (GPT-NeoX's ``lm_head`` as ``embed_out``), which only its own
    ``from_pretrained`` maps back. With ``save_original_format=False`` (transformers 5;
    transformers 4 saves the names as they are) the file loads strictly into a fresh
    rewrite, as the README says."""
    import inspect

    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    def neox(seed):
        cfg = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=128,
                                         max_position_embeddings=64, use_cache=False)
        torch.manual_seed(seed)
        return transformers.GPTNeoXForCausalLM(cfg).eval()
    policy = {"version": 1, "rules": [{"match": "gpt_neox.layers.*.*.*", "rewrite": "sparse_lowrank",
                                       "with": {"rank": 8, "density": 0.05}}]}
    m = sr.rewrite(neox(0), policy).model
    keep = "save_original_format" in inspect.signature(m.save_pretrained).parameters
    m.save_pretrained(tmp_path, **({"save_original_format": False} if keep else {}))
    fresh = sr.rewrite(neox(1), policy).model
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, m(ids).logits)
