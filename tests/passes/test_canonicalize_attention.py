"""canonicalize_attention: eager softmax attention -> scaled_dot_product_attention."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hf_tiny import tiny_llama

from structrewrite.passes.canonicalize_attention import canonicalize_attention, match
from structrewrite.rewriter.capture import capture_block, capture_sites, find_attention

aten = torch.ops.aten


def count(gm, targets):
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target in targets)


class Eager(nn.Module):
    def __init__(self, scale_kind="mul", dropout=0.0, dim=-1):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
        self.scale_kind, self.p, self.dim = scale_kind, dropout, dim

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, 4, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        w = torch.matmul(q, k.transpose(-2, -1))
        w = w * (1 / math.sqrt(8)) if self.scale_kind == "mul" else w / math.sqrt(8)
        w = w + mask
        p = F.softmax(w, dim=self.dim)
        p = F.dropout(p, p=self.p, training=self.training)
        o = torch.matmul(p, v)
        return self.o(o.transpose(1, 2).reshape(b, t, 32))


def causal(t):
    return torch.full((t, t), float("-inf")).triu(1)


@pytest.mark.parametrize("scale_kind", ["mul", "div"])
def test_symbolic_traced_eager_attention_becomes_sdpa(scale_kind):
    torch.manual_seed(0)
    mod = Eager(scale_kind).eval()
    gm = capture_block(mod, canonicalize=False).graph_module
    x, mask = torch.randn(2, 6, 32), causal(6)
    ref = mod(x, mask)
    assert count(gm, {F.softmax}) == 1
    res = canonicalize_attention(gm)
    assert res.sites == 1 and res.created == 1 and res.modified
    assert count(gm, {F.scaled_dot_product_attention}) == 1
    assert count(gm, {F.softmax, torch.matmul, F.dropout}) == 0       # the eager chain is gone
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert sdpa.meta["from_pass"] == "canonicalize_attention"
    torch.testing.assert_close(gm(x, mask), ref)
    (att,) = find_attention(gm)
    assert (att.q_proj, att.k_proj, att.v_proj, att.o_proj) == ("q", "k", "v", "o")
    again = canonicalize_attention(gm)                                   # idempotent
    assert again.sites == 0 and not again.modified


def test_near_misses_are_left_alone():
    for mod, why in ((Eager(dropout=0.1).train(), "no_active_dropout"), (Eager(dim=-2), "last_dim_softmax")):
        gm = capture_block(mod, canonicalize=False).graph_module
        soft = next(n for n in gm.graph.nodes if n.target is F.softmax)
        assert match(soft).startswith(why)
        assert canonicalize_attention(gm).created == 0
        assert count(gm, {F.scaled_dot_product_attention}) == 0


def test_hf_llama_eager_attention_exported_and_canonicalized():
    model = tiny_llama(vocab_size=97, intermediate_size=96, num_hidden_layers=1,
                       attn_implementation="eager")
    ids = torch.randint(0, 97, (2, 9))
    from structrewrite.rewriter.capture import record_inputs
    fqn = "model.layers.0.self_attn"
    rec = record_inputs(model, [fqn], (ids,))[fqn]
    block = capture_block(model.get_submodule(fqn), fqn, rec, canonicalize=False)
    gm = block.graph_module
    assert count(gm, {aten.scaled_dot_product_attention.default}) == 0
    res = canonicalize_attention(gm)
    assert res.created == 1
    assert count(gm, {aten.scaled_dot_product_attention.default}) == 1
    # HF returns the attention weights too, so the softmax stays for that output
    args, kwargs = rec
    kw = {k: v for k, v in kwargs.items() if k not in block.dropped_kwargs}
    kw["use_cache"] = False
    with torch.no_grad():
        ref = model.get_submodule(fqn)(*args, **kw)[0]
        out = gm(*args, **kw)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (att,) = find_attention(gm)
    assert (att.q_proj, att.k_proj, att.v_proj, att.o_proj) == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_capture_canonicalizes_by_default():
    block = capture_block(Eager().eval())
    assert [r.created for r in block.canonicalized] == [1]
    assert count(block.graph_module, {F.scaled_dot_product_attention}) == 1
