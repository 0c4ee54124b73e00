"""A user's flows, for a HF Llama rewritten by a policy with each kind of sparse support:
train eagerly; the same step compiled by Inductor, by the ``structrewrite`` backend and
with ``mode="reduce-overhead"`` (from the first call: CUDA graphs on a GPU); bf16
autocast over float32 parameters; AdamW steps that lower the loss; ``generate()``.

On the CUDA device when there is one (the Triton implementation; ``pytest tests/flows``
on a GPU machine), else on the CPU implementation (CI), and on the CPU too when the run
also collects the kernel tests, which run under Triton's interpreter (tests/conftest.py).
``STRUCTREWRITE_FLOWS_DEVICE`` chooses."""
import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import structrewrite as sr  # noqa: E402

# compiled kernels only: with the interpreter on (any run that also collects the kernel
# tests, tests/conftest.py) the flows take the CPU implementation
DEVICE = os.environ.get("STRUCTREWRITE_FLOWS_DEVICE", "cuda" if torch.cuda.is_available()
                        and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")
SUPPORTS = {"random": {"init": "random"}, "block32": {"init": "random", "block": 32},
            "lost": {"init": "lost"}}


def _config():
    return transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                    max_position_embeddings=256, use_cache=False)


def _llama(dtype):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_config()).to(DEVICE, dtype)


def _rewritten(kind, dtype, ids):
    policy = {"version": 1, "rules": [{"match": "model.layers.*.*.*_proj", "rewrite": "sparse_lowrank",
                                       "with": {"rank": 64, "density": 0.03, **SUPPORTS[kind]}}]}
    return sr.rewrite(_llama(dtype), policy, example_inputs=(ids,)).model


def _loss_and_grads(model, ids, run=None, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, torch.bfloat16, enabled=autocast):
        loss = (run if run is not None else model)(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture
def ids():
    return torch.randint(0, 512, (4, 128), device=DEVICE)


@pytest.mark.parametrize("kind", list(SUPPORTS))
def test_compiled_steps_match_eager(kind, ids):
    model = _rewritten(kind, torch.bfloat16, ids)
    loss, grads = _loss_and_grads(model, ids)
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    from structrewrite.rewriter.backend import structrewrite_backend   # what backend="structrewrite" loads
    for backend, mode in (("inductor", None), (structrewrite_backend, None), ("inductor", "reduce-overhead")):
        torch._dynamo.reset()
        copy_ = copy.deepcopy(model)
        run = torch.compile(copy_, backend=backend, **({"mode": mode} if mode else {}))
        for _ in range(2):   # the second call replays what the first compiled (and captured)
            if mode:
                torch.compiler.cudagraph_mark_step_begin()
            c_loss, c_grads = _loss_and_grads(copy_, ids, run)
        assert abs(c_loss - loss) < 2e-2 * abs(loss), (backend, mode)
        assert max(_rel(c_grads[n], grads[n]) for n in grads) < 5e-2, (backend, mode)
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", list(SUPPORTS))
def test_autocast_training_and_generate(kind, ids):
    model = _rewritten(kind, torch.float32, ids)
    loss, grads = _loss_and_grads(model, ids)
    amp_loss, amp_grads = _loss_and_grads(model, ids, autocast=True)
    assert abs(amp_loss - loss) < 3e-2 * abs(loss)
    assert max(_rel(amp_grads[n], grads[n]) for n in grads) < 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast(DEVICE, torch.bfloat16):
            step_loss = model(input_ids=ids, labels=ids).loss
        step_loss.backward()
        opt.step()
        losses.append(step_loss.item())
    assert losses[-1] < losses[0] - 0.5
    model.config.use_cache = True
    # greedy decoding may reach the end-of-sequence token early: eight new tokens are asked for
    out = model.generate(ids[:1, :8], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, 16)


class _Mixer(torch.nn.Module):
    """Token mixing as in MLP-Mixer: a linear over the sequence, fed the (B, C, T)
    transpose of a (B, T, C) activation, between two channel linears."""

    def __init__(self, tokens=64, channels=96):
        super().__init__()
        self.inp = torch.nn.Linear(channels, channels)
        self.mix = torch.nn.Linear(tokens, tokens)
        self.out = torch.nn.Linear(channels, channels)

    def forward(self, x):
        h = self.inp(x).transpose(1, 2)            # (B, C, T): a permuted, non-contiguous input
        return self.out(self.mix(h).transpose(1, 2))


@pytest.mark.parametrize("kind", list(SUPPORTS))
def test_compiled_training_with_a_permuted_input(kind):
    """Inductor checks the strides of the op's real gradients against its fakes: a
    rewritten linear fed a transposed activation trains compiled as it does eagerly."""
    torch.manual_seed(0)
    policy = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                       "with": {"rank": 16, "density": 0.1, **SUPPORTS[kind]}}]}
    model = sr.rewrite(_Mixer(), policy).model.to(DEVICE)
    x = torch.randn(3, 64, 96, device=DEVICE)
    model(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    torch.compile(model)(x).square().mean().backward()
    assert max(_rel(p.grad, want[n]) for n, p in model.named_parameters()) < 1e-4
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", list(SUPPORTS))
def test_a_rewrite_under_a_default_device_trains(kind, ids):
    """A model built, rewritten and trained under ``with torch.device(DEVICE)`` (the way
    HF and most training scripts build on a GPU): the same layers as a rewrite of the
    same model without the context, and a step trains them alike."""
    policy = {"version": 1, "rules": [{"match": "model.layers.*.mlp.*", "rewrite": "sparse_lowrank",
                                       "with": {"rank": 32, "density": 0.03, **SUPPORTS[kind]}}]}
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM(_config())
    want = sr.rewrite(copy.deepcopy(model), policy).model
    with torch.device(DEVICE):
        got = sr.rewrite(model, policy).model
        layer = type(got.model.layers[0].mlp.up_proj)(256, 688, 32, 0.03, key="x",
                                                      **SUPPORTS[kind])
        assert layer.A.device.type == torch.device(DEVICE).type
        for (k, v), w in zip(want.state_dict().items(), got.state_dict().values()):
            assert torch.equal(v, w), k
        loss, grads = _loss_and_grads(got, ids)
    ref_loss, ref_grads = _loss_and_grads(want, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for n, g in grads.items():
        assert _rel(g, ref_grads[n]) < 1e-4, n


@pytest.mark.parametrize("kind", list(SUPPORTS))
def test_vmap_ensembles_and_jit_traces_of_a_layer(kind):
    """Two ways around eager calls that a GPU's eager entry must leave to the op (it is an
    autograd.Function, which torch.func refuses without ``setup_context`` and which a
    trace records as a Python call that cannot be saved): an ensemble vmapped over
    stacked parameters, and a ``torch.jit.trace`` saved, loaded and differentiated."""
    import io

    from torch.func import functional_call, stack_module_state, vmap

    from structrewrite.nn import SparseLowRankLinear
    members = [SparseLowRankLinear(64, 96, 8, 0.1, key="fc", **SUPPORTS[kind]).to(DEVICE)
               for _ in range(3)]
    for i, m in enumerate(members):
        with torch.no_grad():
            m.B.normal_(0, 0.1 * (i + 1))
    params, _ = stack_module_state(members)
    x = torch.randn(5, 64, device=DEVICE)
    out = vmap(lambda p, x: functional_call(members[0], p, (x,)), in_dims=(0, None))(params, x)
    for i, m in enumerate(members):
        torch.testing.assert_close(out[i], x @ m.dense_weight().t() + m.bias, rtol=1e-4, atol=1e-4)
    layer = members[1]
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(layer, torch.randn(3, 64, device=DEVICE)), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(loaded(x).square().sum(), x)
    (want,) = torch.autograd.grad(layer(x).square().sum(), x)
    torch.testing.assert_close(gx, want, rtol=1e-4, atol=1e-4)


def test_a_float64_full_rank_conversion_is_exact_on_the_device():
    """``from_dense`` of a float64 weight takes a float64 SVD on every device, so a
    full-rank conversion reproduces the weight to float64 rounding (on a GPU it took a
    float32 SVD: 6.6e-7 off)."""
    from structrewrite.nn import SparseLowRankLinear
    torch.manual_seed(0)
    dense = torch.nn.Linear(24, 20, dtype=torch.float64).to(DEVICE)
    layer = SparseLowRankLinear.from_dense(dense.weight, dense.bias, rank=20, density=0.05)
    assert (layer.dense_weight() - dense.weight).abs().max() < 1e-12
    x = torch.randn(7, 24, dtype=torch.float64, device=DEVICE)
    assert (layer(x) - dense(x)).abs().max() < 1e-12
