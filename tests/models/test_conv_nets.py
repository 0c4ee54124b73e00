"""Conv nets shaped like ResNet (BatchNorm, BasicBlock and Bottleneck, a strided 1x1
downsample shortcut, a Linear head) and ConvNeXt (depthwise 7x7 conv, channels-last
LayerNorm, an MLP of two Linear layers, layer scale), written here without torchvision
or timm. The sparse_lowrank pass rewrites their Linear layers (ConvNeXt's pointwise
MLPs, ResNet's head) and leaves the convolutions and norms as they are: rewrite, train,
compile, export to ONNX, save and load, and channels-last inputs."""
import copy
import io
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structrewrite as sr
from structrewrite.codegen.onnx import DOMAIN, custom_node_count, ort_inputs, ort_session
from structrewrite.nn import SparseLowRankLinear

NUM_CLASSES = 10


# -- the nets ------------------------------------------------------------------------

def _shortcut(cin: int, cout: int, stride: int):
    """ResNet's projection shortcut: a strided 1x1 conv and BatchNorm, where the shape changes."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, width, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem (conv, BN, ReLU, max pool), two stages of BasicBlocks and one of Bottlenecks
    (the first block of a stage strided, with a 1x1 projection shortcut), global average
    pool, flatten, Linear head. Widths 16 to 64, for 32x32 inputs."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2))
        self.layer3 = nn.Sequential(Bottleneck(32, 16, stride=2), Bottleneck(64, 16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, computed channels-last."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> NHWC -> LayerNorm -> Linear(4x) -> GELU -> Linear -> gamma -> NCHW,
    plus the input. The layer scale starts at 1 (ConvNeXt's 1e-6 would make every block
    nearly the identity at init, and a wrong rewrite of its MLP invisible at the output)."""

    def __init__(self, dim: int, layer_scale: float = 1.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Patchify stem (4x4 stride-4 conv, LayerNorm), a 2x2 stride-2 downsampling layer
    (LayerNorm, conv) before the second stage, two blocks per stage, global average pool,
    LayerNorm, Linear head. Widths 16 and 32, for 32x32 inputs."""

    def __init__(self, dims=(16, 32), depths=(2, 2), num_classes: int = NUM_CLASSES):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(1, len(dims)):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6),
                                                        nn.Conv2d(dims[i - 1], dims[i], 2, 2)))
        self.stages = nn.ModuleList(nn.Sequential(*(ConvNeXtBlock(d) for _ in range(n)))
                                    for d, n in zip(dims, depths))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean((-2, -1))))


def resnet(seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    return ResNet()


def convnext(seed: int = 0) -> ConvNeXt:
    torch.manual_seed(seed)
    return ConvNeXt()


CONVNEXT_SITES = [f"stages.{s}.{b}.pwconv{k}" for s in (0, 1) for b in (0, 1) for k in (1, 2)]


def sparse_lowrank(match, rank, density, init, seed=None):
    rule = {"match": match, "rewrite": "sparse_lowrank",
            "with": {"rank": rank, "density": density, "init": init}}
    policy = {"version": 1, "rules": [rule]}
    if seed is not None:
        policy["defaults"] = {"seed": seed}
    return policy


# lossy rewrites of each net: the pointwise MLPs of ConvNeXt (LOST's channel-wise
# support), the head of ResNet (SLTrain's random support, for training from scratch)
NETS = {
    "convnext": (convnext, lambda seed=None: sparse_lowrank("stages.*.*.pwconv*", 8, 0.1, "lost", seed),
                 CONVNEXT_SITES),
    "resnet": (resnet, lambda seed=None: sparse_lowrank("fc", 4, 0.1, "random", seed), ["fc"]),
}


@pytest.fixture(params=list(NETS))
def net(request):
    make, policy, sites = NETS[request.param]
    return request.param, make, policy, sites


# -- data ------------------------------------------------------------------------------

def images(seed: int, b: int = 4) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class Prototypes:
    """A learnable task: each class is a fixed random image; a sample is its class's
    image plus noise."""

    def __init__(self, seed: int, classes: int = 4, noise: float = 0.5):
        self.g = torch.Generator().manual_seed(seed)
        self.protos = torch.randn(classes, 3, 32, 32, generator=self.g)
        self.noise = noise

    def batch(self, b: int = 16):
        y = torch.randint(0, len(self.protos), (b,), generator=self.g)
        x = self.protos[y] + self.noise * torch.randn(b, 3, 32, 32, generator=self.g)
        return x, y


# -- helpers ---------------------------------------------------------------------------

def rewritten_sites(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, SparseLowRankLinear))


def assert_untouched_outside(original, rewritten, sites):
    """Every module outside the sites has its class, and every parameter and buffer outside
    them its value, as in ``original``."""
    inside = lambda name: any(name == s or name.startswith(s + ".") for s in sites)  # noqa: E731
    before = dict(original.named_modules())
    after = dict(rewritten.named_modules())
    assert {n for n in before if not inside(n)} == {n for n in after if not inside(n)}
    for name, mod in before.items():
        if not inside(name):
            assert type(after[name]) is type(mod), name
    kept = {k: v for k, v in original.state_dict().items() if not inside(k.rpartition(".")[0])}
    now = rewritten.state_dict()
    for key, value in kept.items():
        assert torch.equal(now[key], value), key


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def merged(model):
    """A copy with every SparseLowRankLinear merged back (``to_dense``)."""
    out = copy.deepcopy(model)
    for fqn, mod in list(out.named_modules()):
        if isinstance(mod, SparseLowRankLinear):
            parent, _, leaf = fqn.rpartition(".")
            setattr(out.get_submodule(parent), leaf, mod.to_dense())
    return out


# -- 1. rewrite: sites, what is left alone, numbers --------------------------------------

def test_convnext_pwconv_rewrite_at_full_rank_is_exact_and_leaves_convs_and_norms():
    """A rule over the blocks' pointwise Linear layers rewrites exactly those eight: not the
    head (a Linear too), not the depthwise or downsampling convs, the LayerNorms or the
    layer scales, whose values stay as they were. At full rank with ``init: svd`` the
    rewrite is exact (the report says so and checked it on the recorded inputs) and the
    net computes what the original does, in eval and in train mode."""
    model = convnext(0).eval()
    x = images(1)
    policy = {"version": 1, "rules": [
        {"match": "stages.0.*.pwconv*", "rewrite": "sparse_lowrank",
         "with": {"rank": 16, "density": 0.0, "init": "svd"}},
        {"match": "stages.1.*.pwconv*", "rewrite": "sparse_lowrank",
         "with": {"rank": 32, "density": 0.0, "init": "svd"}}]}
    result = sr.rewrite(model, policy, example_inputs=(x,))
    m = result.model
    assert sorted(s.site for s in result.report.sites) == sorted(CONVNEXT_SITES)
    assert rewritten_sites(m) == sorted(CONVNEXT_SITES)
    assert all(s.exact and s.verified is not None and s.verified < 1e-5 for s in result.report.sites)
    assert type(m.head) is nn.Linear and type(m.stages[1][0].dwconv) is nn.Conv2d
    assert type(m.downsample_layers[1][0]) is LayerNorm2d
    assert_untouched_outside(model, m, CONVNEXT_SITES)
    assert rewritten_sites(model) == []           # the input model is left as it was
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(m, mode)()
        assert m.training == (mode == "train")
        x = images(2, b=3)
        with torch.no_grad():
            ref, out = model(x), m(x)
        assert out.shape == ref.shape == (3, NUM_CLASSES)
        assert relative(out, ref) < 1e-5, mode


def test_convnext_lossy_rewrite_merges_back_into_the_stock_net():
    """At rank 8 with LOST's channel-wise support the same eight sites are rewritten with
    fewer parameters and the output moves (the rewrite fired); ``to_dense`` merges the
    layers back into nn.Linear, and that net's state dict loads strictly into a stock
    ConvNeXt, which then computes what the rewritten net does."""
    make, policy, sites = NETS["convnext"]
    model = make(0).eval()
    result = sr.rewrite(model, policy(), example_inputs=(images(3),))
    m = result.model.eval()
    assert [s.site for s in result.report.sites] == CONVNEXT_SITES
    assert all(not s.exact and 0 < s.error < 1 for s in result.report.sites)
    assert result.report.model_params_after < result.report.model_params_before
    assert_untouched_outside(model, m, sites)
    x = images(4)
    back = merged(m).eval()
    assert rewritten_sites(back) == []
    stock = make(1).eval()
    stock.load_state_dict(back.state_dict())
    with torch.no_grad():
        dense, out = model(x), m(x)
        assert out.shape == dense.shape
        assert relative(out, dense) > 1e-2
        assert relative(back(x), out) < 1e-5
        assert relative(stock(x), out) < 1e-5


def test_resnet_head_rewrite_keeps_batchnorm_in_train_and_eval_mode():
    """A rule over ResNet's head rewrites ``fc`` alone; a rule matching every module
    (``**``) selects the same single site, since the pass takes Linear layers only (the
    convs, BatchNorms and the 1x1 downsample shortcuts are no sites; a rule naming a
    shortcut conv alone is a PolicyError that says why). At full rank the rewritten net
    of a net with trained BatchNorm statistics computes what the original
    does in eval mode and in train mode, where both take the same batch statistics and
    update their running statistics alike."""
    model = resnet(0).train()
    with torch.no_grad():               # running statistics away from their init values
        for k in range(3):
            model(images(10 + k, b=8))
    model.eval()
    exact = sparse_lowrank("fc", NUM_CLASSES, 0.0, "svd")
    for match in ("fc", "**"):
        plan = sr.plan(model, sparse_lowrank(match, NUM_CLASSES, 0.0, "svd"))
        assert [e.fqn for e in plan] == ["fc"], match
    with pytest.raises(sr.PolicyError, match=r"layer2\.0\.downsample\.0 \(is a Conv2d"):
        sr.plan(model, sparse_lowrank("layer2.0.downsample.0", 1, 0.0, "svd"))
    result = sr.rewrite(model, exact, example_inputs=(images(5, b=8),))
    m = result.model
    assert [s.site for s in result.report.sites] == ["fc"] and result.report.sites[0].exact
    assert rewritten_sites(m) == ["fc"]
    assert_untouched_outside(model, m, ["fc"])
    x = images(6, b=8)
    with torch.no_grad():
        ref, out = model(x), m(x)
    assert out.shape == ref.shape == (8, NUM_CLASSES)
    assert relative(out, ref) < 1e-5
    model.train(), m.train()
    with torch.no_grad():
        ref, out = model(x), m(x)
    assert relative(out, ref) < 1e-5
    bn = {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert bn and all(torch.equal(m.state_dict()[k], v) for k, v in bn.items())
    assert int(m.bn1.num_batches_tracked) == 4


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_rewrite_of_a_train_mode_resnet_leaves_batchnorm_statistics(mode):
    """Rewriting a net in train mode with example inputs changes only the sites: the
    BatchNorm running statistics and batch counts of the rewritten net are the
    original's, as the README says the rest of the model is untouched; also under
    ``torch.inference_mode``, where the copy's buffers are inference tensors (they kept
    the recording run's statistics)."""
    model = resnet(0).train()
    with getattr(torch, mode)():
        result = sr.rewrite(model, sparse_lowrank("fc", 4, 0.1, "svd"),
                            example_inputs=(images(7, b=8),))
    assert int(model.bn1.num_batches_tracked) == 0          # the input model is left alone
    assert int(result.model.bn1.num_batches_tracked) == 0
    assert_untouched_outside(model, result.model, ["fc"])


# -- 2. training ----------------------------------------------------------------------

def test_rewritten_net_trains(net):
    """Twenty optimizer steps (SGD with momentum for ConvNeXt, AdamW for ResNet, whose head
    starts as SLTrain's B = 0) of the rewritten net on a learnable task halve its loss on
    held-out samples (in eval mode: BatchNorm's running statistics); every parameter
    gets a finite gradient that is not zero (the layers' A, B and values, the convs,
    norms and layer scales), and ResNet's BatchNorm running statistics move."""
    name, make, policy, sites = net
    m = sr.rewrite(make(0), policy()).model.train()
    task = Prototypes(seed=11)
    held_x, held_y = task.batch(32)
    bn_before = {k: v.clone() for k, v in m.state_dict().items() if "running_mean" in k}
    opt = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) if name == "convnext"
           else torch.optim.AdamW(m.parameters(), lr=3e-3))

    def held_out_loss():
        m.eval()
        with torch.no_grad():
            loss = F.cross_entropy(m(held_x), held_y).item()
        m.train()
        return loss

    first = held_out_loss()
    steps = 20
    for _ in range(steps):
        x, y = task.batch()
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0
               for g in grads.values()), [n for n, g in grads.items() if g is None or not g.any()]
    for site in sites:
        assert {f"{site}.{p}" for p in ("A", "B", "values", "bias")} <= grads.keys()
    last = held_out_loss()
    assert last < 0.5 * first, (first, last)
    if name == "resnet":
        assert bn_before and all(not torch.equal(m.state_dict()[k], v) for k, v in bn_before.items())
        assert int(m.bn1.num_batches_tracked) == steps


# -- 3. torch.compile -------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Inductor's C++ code generation for the convs takes tens of seconds per graph on two
# cores; ``compiler: "eager"`` runs the backend's graph (with its rewrite) without it.
EAGER = {"compiler": "eager"}


@pytest.mark.parametrize("init", ["random", "lost"])
def test_convnext_compiled_with_a_policy_equals_sr_rewrite(fresh_dynamo, caplog, init):
    """``torch.compile(model, backend="structrewrite", options={"policy": ...})`` rewrites
    the eight pointwise Linear layers found in the captured graph and nothing else, with
    the same supports and values as ``sr.rewrite`` under the same policy seed (``random``
    draws them from the seed and the site name, ``lost`` from the weights), and computes
    what ``sr.rewrite``'s model does, also after a recompile for another batch size. With
    gradients on, it refuses the graph and points to ``sr.rewrite``."""
    model = convnext(0).eval()
    policy = sparse_lowrank("stages.*.*.pwconv*", 8, 0.1, init, seed=3)
    eager = sr.rewrite(model, policy).model.eval()
    compiled = torch.compile(model, backend="structrewrite", options={"policy": policy, **EAGER},
                             dynamic=False)
    x = images(8)
    with caplog.at_level(logging.INFO, logger="structrewrite.rewriter.backend"), \
            warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", UserWarning)   # the inference-mode notice (once per process)
        out = compiled(x)
    rewrote = [r.args[1] for r in caplog.records
               if r.getMessage().startswith("structrewrite backend: rewrote")]
    assert rewrote == [sorted(CONVNEXT_SITES)]
    with torch.no_grad():
        ref, dense = eager(x), model(x)
    assert relative(ref, dense) > 1e-2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert rewritten_sites(model) == []
    x3 = images(9, b=3)                 # a new batch size: compiled again
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.testing.assert_close(compiled(x3), eager(x3), rtol=1e-5, atol=1e-5)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                       match=r"inference graphs only(.|\n)*sr\.rewrite"):
        compiled(x)


def test_rewritten_convnext_trains_compiled(fresh_dynamo):
    """The net rewritten by ``sr.rewrite`` and compiled without a policy (the way to train
    it compiled) takes a forward and backward in train mode that match eager: the output,
    and the gradients of every parameter, including each channel-wise layer's A, B and
    values."""
    make, policy, sites = NETS["convnext"]
    ref_model = sr.rewrite(make(0), policy()).model.train()
    model = copy.deepcopy(ref_model)
    compiled = torch.compile(model, backend="structrewrite", options=EAGER, dynamic=False)
    x, y = Prototypes(seed=12).batch(8)
    out = compiled(x)
    F.cross_entropy(out, y).backward()
    ref = ref_model(x)
    F.cross_entropy(ref, y).backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    got = dict(model.named_parameters())
    for name, p in ref_model.named_parameters():
        assert got[name].grad is not None, name
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(f"{s}.values" in got for s in sites)


# -- 4. ONNX ------------------------------------------------------------------------------

def test_rewritten_net_runs_in_onnxruntime(net, tmp_path):
    """``sr.export_onnx`` of the rewritten net in eval mode writes one
    ``com.structrewrite`` node per site, named after it; stock ONNX Runtime runs the file
    and matches PyTorch at the example batch size and at another (the batch dim is
    dynamic)."""
    import onnx

    name, make, policy, sites = net
    m = sr.rewrite(make(0), policy()).model.train()
    if name == "resnet":   # BatchNorm statistics of a trained net, which eval mode uses
        with torch.no_grad():
            for k in range(2):
                m(images(20 + k, b=8))
    m.eval()
    path = tmp_path / f"{name}.onnx"
    sr.export_onnx(m, (images(9),), path)
    assert custom_node_count(path) == len(sites)
    nodes = [n for n in onnx.load(path).graph.node if n.domain == DOMAIN]
    assert sorted(n.name for n in nodes) == sorted(f"{s}/SparseLowRankLinear" for s in sites)
    sess = ort_session(path)
    assert sess.get_inputs()[0].shape == ["batch", 3, 32, 32]
    for b in (4, 3):
        x = images(30 + b, b=b)
        (got,) = sess.run(None, ort_inputs(sess, (x,)))
        with torch.no_grad():
            ref = m(x).numpy()
        assert got.shape == ref.shape == (b, NUM_CLASSES)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


# -- 5. save and load -----------------------------------------------------------------------

def test_state_dict_loads_into_a_fresh_rewrite(net):
    """After two training steps (which move the layers' values and ResNet's BatchNorm
    statistics), the state dict saved with ``torch.save`` loads into the same rewrite of a
    freshly built net at another policy seed (so another support before the load), which
    then computes exactly what the trained net does, in eval and in train mode."""
    name, make, policy, sites = net
    m = sr.rewrite(make(0), policy()).model.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    task = Prototypes(seed=13)
    for _ in range(2):
        x, y = task.batch(8)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = sr.rewrite(make(1), policy(seed=7)).model
    before = {s: fresh.get_submodule(s).sparse_col.clone() for s in sites}
    fresh.load_state_dict(torch.load(buf))
    if name == "resnet":   # another seed, another random support: the load brought it
        assert not torch.equal(before["fc"], fresh.fc.sparse_col)
    x = images(14, b=6)
    for mode in ("eval", "train"):
        getattr(m, mode)(), getattr(fresh, mode)()
        with torch.no_grad():
            assert torch.equal(fresh(x), m(x)), mode


# -- 6. channels_last ---------------------------------------------------------------------------

def test_channels_last_input_after_the_rewrite(net):
    """A channels_last input (and a net moved to channels_last) gives the rewritten net's
    output for the contiguous input, in eval mode and in a training step, whose gradients
    agree too. In ConvNeXt the Linear layers then see NHWC tensors that are contiguous,
    where a contiguous NCHW input gives them permuted (non-contiguous) ones."""
    name, make, policy, sites = net
    m = sr.rewrite(make(0), policy()).model
    x = images(15, b=4)
    xc = x.to(memory_format=torch.channels_last)
    assert xc.is_contiguous(memory_format=torch.channels_last) and not xc.is_contiguous()
    m.eval()
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(m(xc), ref, rtol=1e-5, atol=1e-5)
    runs = {}
    for label, model, inp in [("contiguous", copy.deepcopy(m), x), ("input", copy.deepcopy(m), xc),
                              ("net", copy.deepcopy(m).to(memory_format=torch.channels_last), xc)]:
        model.train()
        out = model(inp)
        out.square().mean().backward()
        runs[label] = (out.detach(), {n: p.grad for n, p in model.named_parameters()},
                       {k: v for k, v in model.state_dict().items() if "running" in k})
    out, grads, bn = runs["contiguous"]
    for label in ("input", "net"):
        o, g, b = runs[label]
        torch.testing.assert_close(o, out, rtol=1e-5, atol=1e-5, msg=label)
        for n in grads:
            torch.testing.assert_close(g[n], grads[n], rtol=1e-4, atol=1e-6, msg=f"{label}: {n}")
        for k in bn:
            torch.testing.assert_close(b[k], bn[k], rtol=1e-5, atol=1e-6, msg=f"{label}: {k}")
    assert all(f"{s}.values" in grads for s in sites)
