"""SparseLowRankLinear: meta device, deterministic reset, state dict."""
import io

import pytest
import torch
import torch.nn as nn

import structrewrite as sr
from structrewrite.nn import SparseLowRankLinear
from structrewrite.nn.sparse_lowrank import csr_from_flat


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


def _compiled_ops(layer, x, grad_enabled=True):
    """The structrewrite ops in the graph torch.compile captures for ``layer(x)`` (run
    through AOTAutograd), and the output."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad_enabled):
        y = torch.compile(layer, backend=backend, fullgraph=True)(x)
    names = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    return {n.split(".")[1] for n in names if n.startswith("structrewrite.")}, y


@pytest.mark.parametrize("init,block,train_op", [("random", 16, True), ("random", 1, False)])
def test_compiled_training_keeps_xa_for_tile_supports(init, block, train_op):
    """Under torch.compile a training step of a tile layer goes through
    ``sparse_lowrank_linear_train`` (x Aᵀ kept for the backward) and matches the eager
    layer; a random support, inference and export keep ``sparse_lowrank_linear``."""
    torch.manual_seed(0)
    layer = SparseLowRankLinear(48, 40, rank=6, density=0.1, init=init, block=block, key="c")
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 5, 48, requires_grad=True)
    g = torch.randn(3, 5, 40)
    params = [x, layer.A, layer.B, layer.values, layer.bias]
    ops, y = _compiled_ops(layer, x)
    assert ops == ({"sparse_lowrank_linear_train"} if train_op else {"sparse_lowrank_linear"})
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(layer(x), params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert _compiled_ops(layer, x, grad_enabled=False)[0] == {"sparse_lowrank_linear"}
    exported = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("sparse_lowrank_linear.default" in t for t in targets)
    assert not any("_train" in t for t in targets)


def _channel_layer(density=0.1, **kw):
    torch.manual_seed(0)
    layer = SparseLowRankLinear(48, 40, rank=6, density=density, init="lost", key="c", **kw)
    with torch.no_grad():
        layer.B.normal_()
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_compiled_channel_support_runs_as_plain_gemms(bias):
    """Under torch.compile a channel-wise layer is two GEMMs on widened operands
    (``channel_decomposition``), training and inference alike: no structrewrite op in
    the graph, and outputs and gradients equal the eager layer's. Export keeps the op."""
    layer = _channel_layer(bias=bias).double()   # float64: the two sides sum in different orders
    assert layer._channel_k == round(0.1 * 48)
    x = torch.randn(3, 5, 48, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 40, dtype=torch.float64)
    params = [x, layer.A, layer.B, layer.values] + ([layer.bias] if bias else [])
    ops, y = _compiled_ops(layer, x)
    assert ops == set()
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(layer(x), params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ops, y = _compiled_ops(layer, x, grad_enabled=False)
    assert ops == set()
    torch.testing.assert_close(y, layer(x), rtol=1e-10, atol=1e-10)
    exported = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("sparse_lowrank_linear.default" in t for t in targets)


def test_channel_flag_follows_the_support():
    """``_channel_k`` is read from the support where it is set or loaded: a layer that
    loads a random support stops taking the channel-wise decomposition, and takes it
    again when a channel-wise support is loaded."""
    # density 1/8: six whole channels and a random support hold the same 240 entries
    chan = _channel_layer(density=0.125)
    rand = SparseLowRankLinear(48, 40, rank=6, density=0.125, init="random", key="c")
    k = chan._channel_k
    assert k > 0 and rand._channel_k == 0
    other = _channel_layer(density=0.125)
    other.load_state_dict(rand.state_dict())
    assert other._channel_k == 0
    x = torch.randn(4, 48)
    ops, y = _compiled_ops(other, x, grad_enabled=False)
    assert ops == {"sparse_lowrank_linear"}
    torch.testing.assert_close(y, rand(x), rtol=1e-5, atol=1e-5)
    rand.load_state_dict(chan.state_dict())
    assert rand._channel_k == k
    # a support written in place is read again at the next eager call
    with torch.no_grad():
        rand.sparse_crow.copy_(other.sparse_crow)
        rand.sparse_col.copy_(other.sparse_col)
        rand.sparse_row.copy_(other.sparse_row)
    assert rand._channel_k == k
    rand(x)
    assert rand._channel_k == 0
    svd = SparseLowRankLinear.from_dense(torch.randn(40, 48), None, rank=6, density=0.1, init="lost")
    assert svd._channel_k == round(0.1 * 48)
    meta = SparseLowRankLinear(48, 40, rank=6, density=0.1, init="lost", device="meta")
    assert meta._channel_k == 0


def test_channel_decomposition_matches_the_reference():
    """The decomposition against the op's reference, with misaligned widths, a scale and
    a bias, in float64."""
    from structrewrite.ops.sparse_lowrank_linear import channel_count, channel_decomposition, reference
    layer = SparseLowRankLinear(37, 29, rank=5, density=0.2, init="lost", key="d").double()
    with torch.no_grad():
        layer.B.normal_()
    k = channel_count(layer.sparse_crow, layer.sparse_col, 29)
    assert k == round(0.2 * 37)
    x = torch.randn(7, 37, dtype=torch.float64)
    args = (layer.A, layer.B, layer.values)
    got = channel_decomposition(x, *args, layer.sparse_col[:k], layer.bias, layer.scale)
    want = reference(x, *args, layer.sparse_crow, layer.sparse_col, layer.sparse_row, layer.bias,
                     layer.scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # a support that is not channel-wise: rows differ, or the row pointers are uneven
    col = layer.sparse_col.clone()
    col[0], col[1] = col[1], col[0]
    assert channel_count(layer.sparse_crow, col, 29) == 0
    crow = layer.sparse_crow.clone()
    crow[1] += 1
    assert channel_count(crow, layer.sparse_col, 29) == 0


@pytest.mark.parametrize("init,block", [("random", 1), ("random", 16), ("lost", 1)])
def test_inference_mode_builds_and_runs_the_layer(init, block):
    """Under ``torch.inference_mode`` tensors keep no version counter, which the support's
    caches read: the layer built there, and the op called on supports made there, run."""
    torch.manual_seed(0)
    x = torch.randn(5, 48)
    with torch.inference_mode():
        layer = SparseLowRankLinear(48, 64, rank=8, density=0.1, init=init, block=block, key="i")
        y = layer(x)
        dense = nn.Linear(48, 64)
        merged = SparseLowRankLinear.from_dense(dense.weight, dense.bias, rank=48, density=1.0)
        assert torch.allclose(merged(x), dense(x), atol=1e-5)
    assert torch.allclose(y, layer.to_dense()(x), atol=1e-5)
    args = (x, layer.A, layer.B, layer.values, layer.sparse_crow, layer.sparse_col,
            layer.sparse_row, layer.bias, layer.scale)
    with torch.no_grad():   # (autograd refuses inference tensors that require grad)
        assert torch.allclose(torch.ops.structrewrite.sparse_lowrank_linear(*args), y, atol=1e-5)


def test_to_dense_of_a_float64_layer_is_exact():
    """A full-rank SVD layer reproduces its float64 weight to rounding, and so does the
    nn.Linear it merges back into (the merge runs in float64, not float32)."""
    torch.manual_seed(0)
    dense = nn.Linear(24, 20, dtype=torch.float64)
    layer = SparseLowRankLinear.from_dense(dense.weight, dense.bias, rank=20, density=0.05)
    back = layer.to_dense()
    assert back.weight.dtype == torch.float64
    assert (back.weight - dense.weight).abs().max() < 1e-12
    x = torch.randn(7, 24, dtype=torch.float64)
    assert (back(x) - dense(x)).abs().max() < 1e-12


@pytest.mark.parametrize("break_it,message", [
    (lambda sd: sd["l.sparse_col"].__setitem__(-1, 10**6), "outside"),
    (lambda sd: sd["l.sparse_col"].__setitem__(-1, -1), "outside"),
    (lambda sd: sd["l.sparse_crow"].__setitem__(-1, 10**6), "rise from 0"),
    (lambda sd: sd["l.sparse_row"].__setitem__(0, 5), "does not match"),
    (lambda sd: sd["l.sparse_col"].copy_(sd["l.sparse_col"].flip(0)), "sorted"),
])
def test_a_loaded_support_out_of_order_or_range_is_refused(break_it, message):
    """A kernel would read past its operands on a bad index: loading names the layer and
    the fault instead. A good support of another layer loads."""
    model = nn.Sequential()
    model.add_module("l", SparseLowRankLinear(64, 48, rank=4, density=0.1, key="k"))
    other = SparseLowRankLinear(64, 48, rank=4, density=0.1, key="other")
    model.load_state_dict({"l." + k: v for k, v in other.state_dict().items()})
    assert torch.equal(model.l.sparse_col, other.sparse_col)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    break_it(sd)
    before = {k: v.clone() for k, v in model.state_dict().items() if "sparse" in k}
    for assign in (False, True):
        with pytest.raises(RuntimeError, match=f"l: loaded support: .*{message}"):
            model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=assign)
        for k, v in before.items():   # the layer keeps its own support, whole
            assert torch.equal(model.state_dict()[k], v), (k, assign)


def test_a_support_of_another_size_keeps_pytorchs_message_and_the_layers_support():
    """At another density only ``sparse_crow`` has the same shape, so PyTorch copies it and
    reports the others: its size-mismatch message is what the user sees, and the layer's
    support stays whole (a half-loaded one read past its entries)."""
    layer = SparseLowRankLinear(64, 48, rank=4, density=0.1, key="k")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    other = SparseLowRankLinear(64, 48, rank=4, density=0.05, key="k").state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for values") as info:
        layer.load_state_dict(other)
    assert "loaded support" not in str(info.value)
    for k in ("sparse_crow", "sparse_col", "sparse_row", "values"):
        assert torch.equal(layer.state_dict()[k], before[k]), k
    layer(torch.randn(3, 64)).sum().backward()


def _split(sd, parts):
    """The state dict in loads that each hold the keys ending as one of ``parts``."""
    return [{k: v for k, v in sd.items() if k.endswith(p)} for p in parts]


@pytest.mark.parametrize("init,block", [("random", 1), ("lost", 1), ("random", 16)])
def test_a_support_loaded_in_parts_is_checked_when_complete(init, block):
    """A sharded checkpoint loads one shard at a time (``strict=False``): one layer's three
    support buffers may come in different loads. The mix between them is not refused as a
    bad support at the load; a call in between checks it and refuses it where it is not a
    valid support (two channel-wise supports of one size share ``sparse_crow``, so their
    mix is one). Once the rest has come the layer equals the source layer, on the
    channel-wise path where the support is channel-wise."""
    kw = dict(rank=4, density=0.1, init=init, block=block)
    src = SparseLowRankLinear(128, 96, key="src", **kw)
    layer = SparseLowRankLinear(128, 96, key="dst", **kw)
    first, second = _split(src.state_dict(), [("A", "B", "values", "bias", "sparse_crow"),
                                              ("sparse_col", "sparse_row")])
    layer.load_state_dict(first, strict=False)
    if init != "lost":
        with pytest.raises(ValueError, match="dst: the sparse support is not valid"):
            layer(torch.randn(2, 128))
    layer.load_state_dict(second, strict=False)
    x = torch.randn(3, 128)
    assert torch.equal(layer(x), src(x))
    assert layer._channel_k == src._channel_k
    def load_with_a_bad_last_part(source):
        """``source``'s support with a column out of range, loaded crow and row first: the
        last part is named at its load, and undone."""
        bad = {k: v.clone() for k, v in source.state_dict().items()}
        bad["sparse_col"][-1] = 10**6
        first, second = _split(bad, [("sparse_crow", "sparse_row"), ("sparse_col",)])
        layer.load_state_dict(first, strict=False)
        with pytest.raises(RuntimeError, match="layer: loaded support: .*outside"):
            layer.load_state_dict(second, strict=False)

    # where the earlier part held what the layer had, it computes as before
    load_with_a_bad_last_part(src)
    assert torch.equal(layer(x), src(x))
    # where the earlier part changed the support, the mix left is refused at a call
    load_with_a_bad_last_part(SparseLowRankLinear(128, 96, key="other", **kw))
    if init != "lost":   # channel-wise supports of one size share crow and row
        with pytest.raises(ValueError, match="not valid"):
            layer(x)


def test_a_support_assigned_to_a_meta_layer_is_checked():
    """``load_state_dict(assign=True)`` into a layer built on ``meta`` brings real buffers:
    they are checked as into a real layer."""
    sd = SparseLowRankLinear(64, 48, rank=4, density=0.1, key="k").state_dict()
    sd["sparse_col"][-1] = 10**6
    with torch.device("meta"):
        layer = SparseLowRankLinear(64, 48, rank=4, density=0.1, key="k")
    with pytest.raises(RuntimeError, match="loaded support: .*outside"):
        layer.load_state_dict(sd, assign=True)
    assert layer.sparse_col.is_meta   # the layer keeps its own


def test_to_empty_without_reset_is_refused_at_the_first_call():
    """``to_empty()`` leaves the support buffers unset (HF's ``init_weights`` does not know
    the layer): the first call says what to do instead of reading past its operands."""
    with torch.device("meta"):
        model = nn.Sequential(SparseLowRankLinear(64, 48, rank=4, density=0.1, key="m.0"))
    model.to_empty(device="cpu")
    for buf in model.buffers():
        buf.fill_(-7)   # what uninitialised memory may hold
    with pytest.raises(ValueError, match="m.0: the sparse support is not valid .*reset_parameters"):
        model(torch.randn(2, 64))
    model[0].reset_parameters()
    assert model(torch.randn(2, 64)).shape == (2, 48)


@pytest.mark.parametrize("init,block", [("random", 1), ("lost", 1), ("random", 16)])
def test_a_meta_layer_infers_shapes(init, block):
    """A forward and backward on ``meta`` (shape inference, as for nn.Linear): the autocast
    check does not ask about a device type that has no autocast."""
    with torch.device("meta"):
        layer = SparseLowRankLinear(64, 48, rank=8, density=0.1, init=init, block=block)
        x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (3, 5, 48) and y.is_meta and layer.values.grad.shape == layer.values.shape


def test_an_ema_copy_of_the_parameters_runs_and_one_of_the_buffers_is_refused():
    """``AveragedModel``'s default (parameters averaged, buffers copied once) gives a
    working EMA copy; averaging the buffers too (``use_buffers=True``) truncates the
    averaged int32 indices, and the copy refuses to run, naming the cause."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    torch.manual_seed(0)
    layer = SparseLowRankLinear(32, 48, rank=4, density=0.25, init="random", key="l")
    x = torch.randn(4, 32)
    ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for _ in range(3):
        ema.update_parameters(layer)
    torch.testing.assert_close(ema(x), layer(x))
    both = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    both.update_parameters(layer)   # the first call copies
    both.update_parameters(layer)   # the second averages equal indices: 384 -> 383
    assert not torch.equal(both.module.sparse_crow, layer.sparse_crow)
    with pytest.raises(ValueError, match=r"l: the sparse support is not valid .*AveragedModel"):
        both(x)


@pytest.mark.parametrize("kind", [{"init": "random"}, {"init": "random", "block": 16},
                                  {"init": "lost"}])
def test_compiled_code_compiles_again_after_a_support_is_loaded(kind):
    """The kernels' layouts are derived from the support and cached outside the graph; a
    CUDA graph replays the ones it recorded. So code compiled before a load of another
    support compiles again (a guard on the support's generation), and computes with the
    loaded support; calls without a load reuse the compiled code."""
    import torch._dynamo.testing
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = SparseLowRankLinear(64, 48, 8, 0.1, seed=1, **kind)
    other = SparseLowRankLinear(64, 48, 8, 0.1, seed=2, **kind)
    for m in (layer, other):
        with torch.no_grad():
            m.B.normal_()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    run = torch.compile(layer, backend=counter)
    x = torch.randn(5, 64)
    run(x), run(x)
    assert counter.frame_count == 1
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(run(x), other(x))
    run(x)
    assert counter.frame_count == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", [{"init": "random"}, {"init": "random", "block": 16},
                                  {"init": "lost"}])
def test_a_support_loaded_under_inference_mode_is_used(kind):
    """Buffers made under ``torch.inference_mode`` keep no version counter: a load into
    them is recorded by the layer, so that a server that builds, warms up and then loads
    a checkpoint computes with the loaded support, and a load in parts is checked."""
    torch.manual_seed(0)
    other = SparseLowRankLinear(64, 96, 8, 0.25, seed=2, **kind)
    with torch.no_grad():
        other.B.normal_()
    x = torch.randn(9, 64)
    with torch.inference_mode():
        layer = SparseLowRankLinear(64, 96, 8, 0.25, seed=1, **kind)
        assert layer.sparse_col.is_inference()
        layer(x)   # warm-up: the first support's layouts are cached
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x))
        if kind.get("init") == "random" and "block" not in kind:
            fresh = SparseLowRankLinear(64, 96, 8, 0.25, seed=1, **kind)
            fresh(x)
            fresh.load_state_dict({"sparse_col": other.sparse_col}, strict=False)   # one part
            with pytest.raises(ValueError, match="sparse support is not valid"):
                fresh(x)


@pytest.mark.parametrize("kind", [{"init": "random"}, {"init": "random", "block": 16},
                                  {"init": "lost"}])
@pytest.mark.parametrize("shape", [(6, 64), (2, 3, 64)])
def test_the_output_takes_in_place_changes(kind, shape):
    """``y = layer(x); y += r`` (Falcon's decoder layer; any residual added in place), as
    nn.Linear's output takes it: the same gradients as ``y + r``. The op's outputs are no
    views of the tensors its implementations make (autograd refuses in-place changes to
    those)."""
    torch.manual_seed(0)
    layer = SparseLowRankLinear(64, 48, 8, 0.1, **kind)
    with torch.no_grad():
        layer.B.normal_()
    x, r = torch.randn(*shape, requires_grad=True), torch.randn(*shape[:-1], 48)
    grads = []
    for in_place in (False, True):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        if in_place:
            y.add_(r).mul_(2)
        else:
            y = (y + r) * 2
        y.square().sum().backward()
        grads.append([x.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # the op's body, the reference, which devices without an implementation of their own run
    from structrewrite.ops.sparse_lowrank_linear import sparse_lowrank_linear
    args = (x.detach(), layer.A.detach(), layer.B.detach(), layer.values.detach(),
            layer.sparse_crow, layer.sparse_col, layer.sparse_row, layer.bias.detach(), layer.scale)
    out = sparse_lowrank_linear._init_fn(*args)
    assert out.shape == (*shape[:-1], 48) and not out._is_view()


KINDS = [{"init": "random"}, {"init": "random", "block": 16}, {"init": "lost"}]


@pytest.mark.parametrize("kind", KINDS)
def test_a_load_under_swap_tensors_works_after_calls(kind):
    """``load_state_dict`` with ``set_swap_module_params_on_conversion(True)`` swaps the
    buffers, which PyTorch refuses for weakly referenced tensors: the layouts cached from
    the first call must let go of them."""
    src = SparseLowRankLinear(48, 40, 6, 0.1, seed=0, **kind)
    m = SparseLowRankLinear(48, 40, 6, 0.1, seed=1, **kind)
    x = torch.randn(4, 48)
    m(x)
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.load_state_dict(src.state_dict())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)
    assert torch.equal(m(x), src(x))


def test_an_input_of_another_width_is_refused_with_the_shapes():
    layer = SparseLowRankLinear(48, 40, 6, 0.1, key="mlp.up")
    with pytest.raises(RuntimeError, match=r"mlp.up: an input of shape \(3, 47\) for a layer of 48 -> 40"):
        layer(torch.randn(3, 47))


def test_vmap_over_stacked_buffers_is_refused_and_stacked_parameters_work():
    """An ensemble (``stack_module_state``) over layers with one support: vmapping the
    buffers too is refused with the way that works, stacking the parameters only and
    calling a real member, which matches every member."""
    import copy
    from torch.func import functional_call, stack_module_state, vmap
    members = [SparseLowRankLinear(48, 40, 6, 0.1, seed=0, key="fc") for _ in range(3)]
    for i, m in enumerate(members):
        with torch.no_grad():
            m.B.normal_(generator=torch.Generator().manual_seed(i))
            m.values.mul_(i + 1)
    params, buffers = stack_module_state(members)
    x = torch.randn(5, 48)
    meta = copy.deepcopy(members[0]).to("meta")
    with pytest.raises(RuntimeError, match="vmap over the support buffers"):
        vmap(lambda p, b, x: functional_call(meta, (p, b), (x,)), in_dims=(0, 0, None))(params, buffers, x)
    base = copy.deepcopy(members[0])
    out = vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))(params, x)
    for i, m in enumerate(members):
        torch.testing.assert_close(out[i], x @ m.dense_weight().t() + m.bias, rtol=1e-5, atol=1e-5)


def test_script_is_refused_and_trace_works():
    layer = SparseLowRankLinear(48, 40, 6, 0.1)
    for obj in (layer, nn.Sequential(layer, nn.ReLU())):
        with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script"):
            torch.jit.script(obj)
    traced = torch.jit.trace(layer, torch.randn(3, 48))
    x = torch.randn(7, 48)
    torch.testing.assert_close(traced(x), layer(x))
    # the trace holds the op (also on CUDA, where eager calls skip it), so it saves and
    # loads, and the loaded module differentiates
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(loaded(x).square().sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(layer(x).square().sum(), x)[0])
    # a support not yet seen by a call (moved to a GPU, written in place) is checked by
    # the op, not by the layer: the trace's check run records the same graph
    with torch.no_grad():
        layer.sparse_col.copy_(layer.sparse_col.clone())
    torch.testing.assert_close(torch.jit.trace(layer, torch.randn(3, 48))(x), layer(x))


def test_a_weight_cannot_be_set_or_tied():
    """A ``weight`` set from outside (HF's ``tie_weights`` onto a rewritten head) would be a
    parameter that nothing reads: refused."""
    layer = SparseLowRankLinear(48, 40, 6, 0.1)
    with pytest.raises(AttributeError, match="no dense weight to set or tie"):
        layer.weight = nn.Parameter(torch.randn(40, 48))
    assert not hasattr(layer, "weight") and "weight" not in dict(layer.named_parameters())


def test_support_buffers_cast_by_module_type_are_refused():
    layer = SparseLowRankLinear(48, 40, 6, 0.1, init="lost")
    layer.type(torch.float64)
    with pytest.raises(ValueError, match="support buffers must be int32"):
        layer(torch.randn(3, 48, dtype=torch.float64))


def test_initial_values_do_not_depend_on_the_default_dtype():
    a = SparseLowRankLinear(48, 40, 6, 0.1, seed=5)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        b = SparseLowRankLinear(48, 40, 6, 0.1, seed=5)
    finally:
        torch.set_default_dtype(old)
    for k, v in a.state_dict().items():
        assert torch.equal(v.to(b.state_dict()[k].dtype), b.state_dict()[k]), k


@pytest.mark.parametrize("way", ["compile", "export"])
def test_an_unset_support_is_refused_by_compiled_and_exported_code(way):
    """After ``to_empty()`` and a load of the parameters alone, the support buffers hold
    whatever was in memory: the eager layer refuses them, and so does the op where the
    layer is compiled or exported (they computed with it, 0.54 off, or read out of range)."""
    good = SparseLowRankLinear(64, 32, rank=8, density=0.1, key="l")
    params = {k: v for k, v in good.state_dict().items() if not k.startswith("sparse_")}
    with torch.device("meta"):
        layer = SparseLowRankLinear(64, 32, rank=8, density=0.1, key="l")
    layer = layer.to_empty(device="cpu")
    layer.sparse_crow.zero_()
    layer.load_state_dict(params, strict=False)
    x = torch.randn(4, 64)
    if way == "compile":
        torch._dynamo.reset()
        run = torch.compile(layer, backend="structrewrite", options={"compiler": "eager"})
    else:
        run = torch.export.export(layer, (x,)).module()
    with pytest.raises(ValueError, match="sparse support is not valid"):
        run(x)


@pytest.mark.parametrize("kind", KINDS)
def test_reloading_the_same_support_leaves_compiled_code_alone(kind):
    """A state dict whose support the layer holds already (a checkpoint reloaded, EMA
    weights swapped in) leaves the support buffers untouched, so compiled code does not
    compile again (it did at every load, and ran eagerly after eight); another support
    is loaded and seen as before. Strict loads report nothing missing."""
    from torch._dynamo.utils import counters
    layer = SparseLowRankLinear(48, 40, 6, 0.1, seed=0, **kind)
    other = SparseLowRankLinear(48, 40, 6, 0.1, seed=1, **kind)
    x = torch.randn(4, 48)
    torch._dynamo.reset()
    counters.clear()
    run = torch.compile(layer, backend="structrewrite", options={"compiler": "eager"})
    run(x)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    versions = [t._version for t in (layer.sparse_crow, layer.sparse_col, layer.sparse_row)]
    gen = layer._support_gen
    for _ in range(3):
        assert not layer.load_state_dict(saved).missing_keys
        torch.testing.assert_close(run(x), layer(x))
    assert layer._support_gen == gen
    assert versions == [t._version for t in (layer.sparse_crow, layer.sparse_col, layer.sparse_row)]
    assert counters["stats"]["unique_graphs"] == 1
    layer.load_state_dict(other.state_dict())
    assert layer._support_gen > gen
    assert torch.equal(run(x), other(x))


def test_the_input_can_be_passed_by_nn_linears_name():
    """``nn.Linear.forward(input)``: a model calling ``self.proj(input=x)`` keeps working."""
    layer = SparseLowRankLinear(16, 8, 4, 0.2)
    x = torch.randn(2, 16)
    assert torch.equal(layer(input=x), layer(x))


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_derivative_is_refused_with_a_reason(kind):
    """A first backward with create_graph=True gives the right gradient (a model may need
    second derivatives elsewhere); a second backward through the layer says the op has
    none, instead of PyTorch's "no autograd formula was registered"."""
    layer = SparseLowRankLinear(32, 32, 4, 0.3, **kind).double()
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    ref = torch.autograd.grad((x @ layer.dense_weight().t() + layer.bias).square().sum(), x)[0]
    torch.testing.assert_close(gx, ref)
    with pytest.raises(NotImplementedError, match="has no second derivative"):
        gx.square().sum().backward()


def test_loads_with_assign_hand_over_the_tensors_and_widen_nothing():
    """``assign=True`` takes the state dict's own tensors, also where they hold what the
    layer holds (the unchanged-buffer skip must not keep the old ones, which left a layer
    split across devices); an int64 support is taken as int32, with assign too."""
    src = SparseLowRankLinear(32, 16, rank=4, density=0.25, key="a")
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    layer = SparseLowRankLinear(32, 16, rank=4, density=0.25, key="a")
    layer.load_state_dict(sd, assign=True)
    assert all(getattr(layer, n) is sd[n] for n in ("sparse_crow", "sparse_col", "sparse_row"))
    wide = {k: (v.long() if k.startswith("sparse") else v) for k, v in src.state_dict().items()}
    for assign in (False, True):
        m = SparseLowRankLinear(32, 16, rank=4, density=0.25, key="a",
                                device="meta" if assign else None)
        m.load_state_dict(wide, assign=assign)
        assert m.sparse_col.dtype == torch.int32
        x = torch.randn(3, 32)
        assert torch.equal(m(x), src(x))


def test_a_support_reloaded_in_unchanged_parts_compiles_nothing_again():
    n = [0]

    def backend(gm, example_inputs):
        n[0] += 1
        return gm.forward
    layer = SparseLowRankLinear(32, 16, rank=4, density=0.25, key="a")
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 32)
    torch._dynamo.reset()
    run = torch.compile(layer, backend=backend)
    run(x)
    first = {k: sd[k] for k in ("A", "B", "sparse_crow")}
    layer.load_state_dict(first, strict=False)
    layer.load_state_dict({k: v for k, v in sd.items() if k not in first}, strict=False)
    torch.testing.assert_close(run(x), layer(x))
    assert n[0] == 1


def test_a_channel_wise_layer_after_to_empty_is_refused_compiled():
    """A channel-wise layer runs compiled as two GEMMs without the op; after ``to_empty()``
    its buffers hold whatever memory held, and compiled code refuses them as eager does."""
    layer = SparseLowRankLinear(64, 48, rank=4, density=0.25, init="lost", key="k")
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for t in (layer.sparse_col, layer.sparse_crow, layer.sparse_row):
            t.zero_()
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="not valid"):
        layer(x)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="not valid"):
        torch.compile(layer, backend="structrewrite", options={"compiler": "eager"})(x)


@pytest.mark.parametrize("kind", KINDS)
def test_shard_by_shard_loaders_that_fill_missing_keys_load_exactly(kind):
    """``set_model_state_dict`` (torch.distributed.checkpoint; accelerate's sharded loader
    calls it per shard) copies a shard into the module's own tensors and fills the keys
    the shard lacks with them: a shard holding part of a support was refused ("sparse_row
    does not match sparse_crow"). Every split now loads the source layer exactly; a
    call before the support is whole refuses the mix."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    src = SparseLowRankLinear(64, 128, rank=8, density=0.05, seed=0, key="a", **kind)
    sd = src.state_dict()
    x = torch.randn(3, 64)
    opts = StateDictOptions(full_state_dict=True, strict=False)
    for split in ((("A", "B", "values", "bias", "sparse_crow", "sparse_col"), ("sparse_row",)),
                  (("A", "sparse_col"), ("B", "values", "bias", "sparse_crow", "sparse_row")),
                  (tuple(sd),)):
        layer = SparseLowRankLinear(64, 128, rank=8, density=0.05, seed=1, key="a", **kind)
        for i, keys in enumerate(split):
            set_model_state_dict(layer, {k: sd[k] for k in keys}, options=opts)
            if i == 0 and len(split) > 1 and kind == {"init": "random"}:
                with pytest.raises(ValueError, match="not valid"):   # a mix of two supports
                    layer(x)
        assert torch.equal(layer(x), src(x)), split


def test_bad_supports_are_refused_at_the_load_whatever_the_loader():
    """An edited copy of the layer's own state dict (its other buffers the layer's own
    tensors), a bad ``sparse_crow`` on a layer without entries, a bad last shard of a
    loader that fills missing keys with the module's tensors, and int64 indices beyond
    int32: each is named at the load (they were taken, and refused only at a call, or
    wrapped), and where the whole support came in the load the layer keeps its own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    layer = SparseLowRankLinear(64, 32, rank=4, density=0.1, key="a")
    x = torch.randn(3, 64)
    want = layer(x)
    sd = layer.state_dict()
    sd["sparse_col"] = sd["sparse_col"].clone()
    sd["sparse_col"][0] = 999
    with pytest.raises(RuntimeError, match="loaded support: sparse_col holds indices outside"):
        layer.load_state_dict(sd)
    assert torch.equal(layer(x), want)
    empty = SparseLowRankLinear(64, 32, rank=4, density=0.0, key="b")
    sd = {k: v.clone() for k, v in empty.state_dict().items()}
    sd["sparse_crow"] = torch.arange(33, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="loaded support: sparse_crow must rise"):
        empty.load_state_dict(sd)
    src = SparseLowRankLinear(64, 128, rank=8, density=0.05, seed=0, key="c")
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["sparse_col"][5] = 10**6
    dst = SparseLowRankLinear(64, 128, rank=8, density=0.05, seed=1, key="c")
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(dst, {k: v for k, v in sd.items() if k != "sparse_col"}, options=opts)
    with pytest.raises(RuntimeError, match="loaded support: sparse_col holds indices outside"):
        set_model_state_dict(dst, {"sparse_col": sd["sparse_col"]}, options=opts)
    wide = {k: (v.long() if k.startswith("sparse") else v.clone())
            for k, v in layer.state_dict().items()}
    wide["sparse_col"][0] += 2**32
    with pytest.raises(RuntimeError, match="beyond int32"):
        layer.load_state_dict(wide)
    assert torch.equal(layer(x), want)


def test_an_edited_own_state_dict_and_a_meta_support_are_refused():
    """``layer.state_dict()`` edited in place (its tensors are the buffers) and loaded
    back is checked at the load; a layer whose parameters were assigned but whose support
    stayed on ``meta`` refuses to compute (it read uninitialised memory)."""
    layer = SparseLowRankLinear(24, 20, 2, 0.2, seed=1, key="k")
    sd = layer.state_dict()
    sd["sparse_col"][0] = 24
    with pytest.raises(RuntimeError, match="loaded support: sparse_col holds indices outside"):
        layer.load_state_dict(sd)
    src = SparseLowRankLinear(24, 20, 2, 0.2, seed=1, key="k")
    params = {k: v.clone() for k, v in src.state_dict().items() if not k.startswith("sparse")}
    with torch.device("meta"):
        meta = SparseLowRankLinear(24, 20, 2, 0.2, seed=1, key="k")
    meta.load_state_dict(params, strict=False, assign=True)
    with pytest.raises(ValueError, match="support is on the meta device"):
        meta(torch.randn(2, 24))
    assert meta(torch.randn(2, 24, device="meta")).shape == (2, 20)


@pytest.mark.parametrize("kind", KINDS + [{"init": "svd"}])
def test_a_layer_built_under_another_default_device_is_the_same_layer(kind):
    """A layer built on one device while another is the default (``with
    torch.device(...)``, ``torch.set_default_device``): its initial values are drawn from
    a CPU generator whatever the default, so the layer is the one built without the
    context (on a GPU it failed: "Expected a 'cuda' device type for generator"). The
    meta device stands in for the other device here: a tensor made on it by mistake
    cannot be copied into the layer. A rewrite under such a context builds the same
    model too."""
    ref = SparseLowRankLinear(64, 48, 8, 0.1, seed=2, key="k", **kind)
    with torch.device("meta"):
        layer = SparseLowRankLinear(64, 48, 8, 0.1, seed=2, key="k", device="cpu", **kind)
    for (k, v), w in zip(ref.state_dict().items(), layer.state_dict().values()):
        assert torch.equal(v, w), k
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    policy = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                       "with": {"rank": 8, "density": 0.1, **kind}}]}
    want = sr.rewrite(model, policy).model
    with torch.device("meta"):
        got = sr.rewrite(model, policy).model
    for (k, v), w in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(v, w), k


class _OwnForwardLinear(nn.Linear):
    """A Linear subclass with a forward of its own: planning probes it on random rows."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def test_planning_probes_under_another_default_device_draw_their_rows_on_the_cpu():
    """The rewrite's own random rows (the probe of a subclass's forward, the check of an
    exact rewrite without recorded inputs) are drawn on the CPU and moved to the weight,
    whatever the default device."""
    model = nn.Sequential(_OwnForwardLinear(24, 16), nn.ReLU(), nn.Linear(16, 8))
    policy = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                       "with": {"rank": 8, "density": 0.05, "init": "svd"}}]}
    want = sr.rewrite(model, policy)
    with torch.device("meta"):
        got = sr.rewrite(model, policy)
    assert [type(m).__name__ for m in got.model] == ["SparseLowRankLinear", "ReLU",
                                                     "SparseLowRankLinear"]
    verified = [s.verified for s in got.report.sites]
    assert verified == [s.verified for s in want.report.sites] and verified[-1] is not None
    for (k, v), w in zip(want.model.state_dict().items(), got.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_compiled_code_follows_supports_assigned_to_the_buffers():
    """A support changed by assigning the three buffers (a documented way) is seen by
    compiled code that never runs eagerly: a channel-wise layer given a scattered
    support went on as channel-wise (1.3 off), and one given back a channel-wise
    support takes its channel path again. A bad support assigned is refused."""
    layer = SparseLowRankLinear(64, 48, rank=4, density=0.125, init="lost", key="l")
    channel = {n: getattr(layer, n).clone() for n in ("sparse_crow", "sparse_col", "sparse_row")}
    flat = torch.randperm(48 * 64, generator=torch.Generator().manual_seed(0))[:layer.nnz]
    crow, col, row = csr_from_flat(flat, 48, 64)
    x = torch.randn(5, 64)
    torch._dynamo.reset()
    run = torch.compile(layer, backend="aot_eager")

    def rel():
        want = x @ layer.dense_weight().t() + layer.bias
        return float((run(x) - want).norm() / want.norm())
    with torch.no_grad():
        assert rel() < 1e-6 and layer._channel_k == 8
        layer.sparse_crow, layer.sparse_col, layer.sparse_row = crow, col, row
        assert rel() < 1e-6 and layer._channel_k == 0
        for n, t in channel.items():
            setattr(layer, n, t)
        assert rel() < 1e-6 and layer._channel_k == 8
        layer.sparse_col = torch.full_like(channel["sparse_col"], 64)
        with pytest.raises(ValueError, match="not valid"):
            run(x)
        with pytest.raises(ValueError, match="not valid"):
            layer(x)
    torch._dynamo.reset()
