"""Capture of block-level sites: symbolic_trace where it works, torch.export otherwise."""
import pytest
import torch
import torch.nn as nn
from hf_tiny import tiny_llama

from structrewrite.rewriter.capture import (CaptureError, capture_block, capture_sites,
                                            find_attention, node_module_fqn)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(vocab_size=97, intermediate_size=96)


def test_llama_attention_is_exported_with_sdpa_and_its_projections(llama):
    ids = torch.randint(0, 97, (2, 11))
    sites = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    blocks = capture_sites(llama, sites, (ids,))
    for fqn in sites:
        block = blocks[fqn]
        assert block.method == "export"           # transformers' attention does not symbolic-trace
        (att,) = find_attention(block.graph_module)
        assert (att.q_proj, att.k_proj, att.v_proj, att.o_proj) == ("q_proj", "k_proj", "v_proj", "o_proj")
        linears = [node_module_fqn(n) for n in block.graph_module.graph.nodes
                   if n.op == "call_function" and n.target == torch.ops.aten.linear.default]
        assert linears == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_captured_attention_computes_what_the_module_computes(llama):
    ids = torch.randint(0, 97, (1, 9))
    from structrewrite.rewriter.capture import record_inputs
    rec = record_inputs(llama, ["model.layers.1.self_attn"], (ids,))
    block = capture_block(llama.model.layers[1].self_attn, "model.layers.1.self_attn",
                          rec["model.layers.1.self_attn"])
    args, kwargs = rec["model.layers.1.self_attn"]
    kw = {k: v for k, v in kwargs.items() if k not in block.dropped_kwargs}
    kw["use_cache"] = False
    with torch.no_grad():
        ref = llama.model.layers[1].self_attn(*args, **kwargs)[0]
        out = block.graph_module(*args, **kw)[0]
    torch.testing.assert_close(out, ref)


def test_llama_mlp_symbolic_traces(llama):
    block = capture_block(llama.model.layers[0].mlp, "model.layers.0.mlp")
    assert block.method == "symbolic_trace"
    targets = [n.target for n in block.graph_module.graph.nodes if n.op == "call_module"]
    assert [t for t in targets if t.endswith("_proj")] == ["gate_proj", "up_proj", "down_proj"]
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(block.graph_module(x), llama.model.layers[0].mlp(x))


def test_eager_softmax_attention_in_a_traceable_block_is_found():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            q, k, v = self.q(x), self.k(x), self.v(x)
            return self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v))
    (att,) = find_attention(capture_block(Attn()).graph_module)
    assert (att.q_proj, att.k_proj, att.v_proj, att.o_proj) == ("q", "k", "v", "o")


def test_untraceable_block_without_inputs_says_how_to_fix(llama):
    with pytest.raises(CaptureError, match="pass example_inputs"):
        capture_block(llama.model.layers[0].self_attn, "model.layers.0.self_attn")


def test_the_recording_run_leaves_buffers_and_random_streams_alone():
    """``sr.rewrite`` with example inputs runs the model once; in train mode that run would
    update BatchNorm's statistics and draw dropout masks. The rewritten model and, with
    ``inplace=True``, the user's own keep their buffers, and the random stream goes on
    as if the rewrite had not run."""
    import structrewrite as sr
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4)).train()
    policy = {"version": 1, "rules": [{"match": "5", "rewrite": "sparse_lowrank",
                                       "with": {"rank": 2, "density": 0.1}}]}
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    res = sr.rewrite(net, policy, example_inputs=(x,), inplace=True)
    assert torch.equal(torch.rand(5), expected)
    for k, v in res.model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    assert int(net[1].num_batches_tracked) == 0
