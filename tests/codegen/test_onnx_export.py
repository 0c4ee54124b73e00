"""ONNX export: custom-domain nodes with function bodies, run by stock ONNX Runtime."""
import numpy as np
import onnx
import pytest
import torch

import structrewrite as sr
from structrewrite.codegen.onnx import (
    DOMAIN,
    OnnxTranslationError,
    export_onnx,
    ort_inputs,
    ort_session,
    translations,
)
from structrewrite.nn import SparseLowRankLinear

pytest.importorskip("transformers")

from hf_tiny import policy, tiny_gpt2, tiny_llama  # noqa: E402

OP_TYPE = "SparseLowRankLinear"


def custom_nodes(model: onnx.ModelProto):
    return [n for n in model.graph.node if n.domain == DOMAIN]


def check_file(path, expected_nodes):
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    nodes = custom_nodes(model)
    assert len(nodes) == expected_nodes
    assert {n.op_type for n in nodes} == {OP_TYPE}
    functions = {(f.domain, f.name) for f in model.functions}
    assert (DOMAIN, OP_TYPE) in functions
    assert {o.domain: o.version for o in model.opset_import}[DOMAIN] == 1
    # the function body is standard ONNX: nothing in it refers back to the custom domain
    body = next(f for f in model.functions if f.name == OP_TYPE)
    assert {n.domain for n in body.node} <= {""}
    return model


def assert_ort_matches(path, model, shapes, vocab):
    sess = ort_session(path)
    for shape in shapes:
        ids = torch.randint(0, vocab, shape)
        (logits, *_) = sess.run(None, ort_inputs(sess, (ids,)))
        with torch.no_grad():
            ref = model(ids).logits
        assert logits.shape == tuple(ref.shape)
        np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4, rtol=1e-4)


def test_llama_rewritten_runs_in_onnxruntime(tmp_path):
    result = sr.rewrite(tiny_llama(), policy("model.layers.*.mlp.*_proj"))
    model = result.model
    n_sites = len(result.report.sites)
    assert n_sites == 6
    assert sum(isinstance(m, SparseLowRankLinear) for m in model.modules()) == n_sites
    path = tmp_path / "llama.onnx"
    export_onnx(model, (torch.randint(0, 128, (2, 7)),), path)
    onnx_model = check_file(path, n_sites)
    assert sorted(n.name for n in custom_nodes(onnx_model)) == sorted(
        f"{s.site}/{OP_TYPE}" for s in result.report.sites)
    ids_input = onnx_model.graph.input[0]
    dims = [d.dim_param for d in ids_input.type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    assert_ort_matches(path, model, [(2, 7), (3, 13)], 128)


def test_gpt2_conv1d_rewritten_runs_in_onnxruntime(tmp_path):
    result = sr.rewrite(tiny_gpt2(), policy("transformer.h.*.*.c_*"))
    model = result.model
    n_sites = len(result.report.sites)
    assert n_sites == 8          # c_attn, attn.c_proj, c_fc, mlp.c_proj in two blocks
    path = tmp_path / "gpt2.onnx"
    export_onnx(model, (torch.randint(0, 128, (2, 5)),), path)
    check_file(path, n_sites)
    assert_ort_matches(path, model, [(2, 5), (1, 9)], 128)


def test_keyword_inputs_with_attention_mask(tmp_path):
    """Inputs given as keywords (sliced views as examples); batch and sequence dynamic."""
    result = sr.rewrite(tiny_gpt2(), policy("transformer.h.*.mlp.c_*"))
    model = result.model
    big_ids = torch.randint(0, 128, (4, 12))
    big_mask = torch.ones(4, 12, dtype=torch.long)
    path = tmp_path / "gpt2_kw.onnx"
    export_onnx(model, (), path, kwargs={"input_ids": big_ids[:2, :6],
                                         "attention_mask": big_mask[1:3, :6]})
    onnx_model = check_file(path, 4)
    assert [i.name for i in onnx_model.graph.input] == ["input_ids", "attention_mask"]
    sess = ort_session(path)
    ids, mask = torch.randint(0, 128, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0     # right padding: every query still sees a key
    (logits,) = sess.run(None, ort_inputs(sess, (), {"input_ids": ids, "attention_mask": mask}))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_op_with_and_without_bias_exact_at_full_rank(tmp_path, bias):
    torch.manual_seed(1)
    lin = torch.nn.Linear(24, 16, bias=bias)
    layer = SparseLowRankLinear.from_dense(lin.weight, lin.bias, rank=16, density=0.2)
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), layer, torch.nn.GELU()).eval()
    path = tmp_path / "layer.onnx"
    x = torch.randn(3, 4, 24)
    export_onnx(model, (x,), path)
    onnx_model = check_file(path, 1)
    (node,) = custom_nodes(onnx_model)
    assert len([i for i in node.input if i]) == (8 if bias else 7)
    assert [a.name for a in node.attribute] == ["scale"]
    assert node.attribute[0].f == pytest.approx(layer.scale)
    sess = ort_session(path)
    for shape in [(3, 4, 24), (5, 2, 24)]:
        x = torch.randn(shape)
        (y,) = sess.run(None, ort_inputs(sess, (x,)))
        with torch.no_grad():
            np.testing.assert_allclose(y, model(x).numpy(), atol=1e-5, rtol=1e-5)
            # full rank with svd init: equal to the dense layer it came from
            dense = torch.nn.functional.gelu(lin(model[0](x)))
        np.testing.assert_allclose(y, dense.numpy(), atol=1e-4, rtol=1e-4)


def test_feature_dim_of_a_2d_input_stays_fixed(tmp_path):
    """The default dynamic dims are 0 and 1; a (batch, features) input's features are fixed
    by the layer, and the file says so: ONNX Runtime refuses another width (it took a
    (4, 80) input for a 40-wide layer and returned 8 rows)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(40, 72), torch.nn.ReLU(), torch.nn.Linear(72, 24))
    model = sr.rewrite(mlp, policy("*", rank=8, density=0.1)).model.eval()
    path = tmp_path / "mlp.onnx"
    export_onnx(model, (torch.randn(4, 40),), path)
    onnx_model = onnx.load(path)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*onnx_model.graph.input, *onnx_model.graph.output)]
    assert dims == [["batch", 40], ["batch", 24]]
    sess = ort_session(path)
    (y,) = sess.run(None, ort_inputs(sess, (torch.randn(7, 40),)))
    assert y.shape == (7, 24)
    with pytest.raises(Exception, match="Got: 80 Expected: 40"):
        sess.run(None, ort_inputs(sess, (torch.randn(4, 80),)))


@pytest.mark.parametrize("init", ["svd", "lost"])
@pytest.mark.parametrize("density", [0.0, 0.004, 0.1, 1.0])
def test_empty_single_and_full_support(tmp_path, density, init):
    """No sparse entry, one entry (most rows empty), a scattered (svd: ELL layout) or
    channel-wise (lost: channel layout) support, and every entry."""
    from structrewrite.nn.sparse_lowrank import support_size

    torch.manual_seed(2)
    lin = torch.nn.Linear(24, 16)
    layer = SparseLowRankLinear.from_dense(lin.weight, lin.bias, rank=4, density=density,
                                           init=init).eval()
    assert layer.nnz == support_size(16, 24, density, init)
    path = tmp_path / "layer.onnx"
    export_onnx(layer, (torch.randn(2, 3, 24),), path)
    check_file(path, 1)
    sess = ort_session(path)
    x = torch.randn(4, 5, 24)
    (y,) = sess.run(None, ort_inputs(sess, (x,)))
    with torch.no_grad():
        np.testing.assert_allclose(y, layer(x).numpy(), atol=1e-5, rtol=1e-5)


def settled_layout(path, out_f, tmp_path) -> str:
    """The sparse layout ONNX Runtime's constant folding settled on, read off the folded
    initializers of the optimized model: tiles (n x 16 x 16 values), ELL (out x 1 x kmax
    values) or, when both are empty, channels."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    shapes = [tuple(t.dims) for t in onnx.load(so.optimized_model_filepath).graph.initializer]
    if any(len(d) == 3 and d[1:] == (16, 16) and d[0] > 0 for d in shapes):
        return "tiles"
    if any(len(d) == 3 and d[:2] == (out_f, 1) and d[2] > 0 for d in shapes):
        return "ell"
    return "channels"


@pytest.mark.parametrize("block,in_f,out_f,density,init,layout", [
    (16, 256, 256, 0.1, "random", "tiles"), (32, 200, 136, 0.2, "random", "tiles"),
    (64, 300, 200, 0.2, "random", "tiles"), (16, 48, 40, 0.2, "svd", "channels"),
    (1, 60, 50, 0.1, "svd", "ell"), (1, 60, 50, 0.1, "lost", "channels")])
def test_each_support_gets_its_layout_and_matches(tmp_path, block, in_f, out_f, density, init, layout):
    """Tile supports are stored as element CSR like any other: the same node; the body
    settles on the tile layout for supports of many scattered tiles, channels where few
    input columns are used, ELL for scattered entries; ORT equals PyTorch in each case."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f)
    layer = SparseLowRankLinear.from_dense(lin.weight, lin.bias, rank=4, density=density,
                                           init=init, block=block).eval()
    with torch.no_grad():
        layer.B.normal_()                      # random init starts at B = 0
    path = tmp_path / "layer.onnx"
    export_onnx(layer, (torch.randn(2, 3, in_f),), path)
    check_file(path, 1)
    assert settled_layout(path, out_f, tmp_path) == layout
    sess = ort_session(path)
    # other shapes than the example's, empty ones too (a 0 in a shape stays a 0)
    for shape in ((3, 7, in_f), (2, 0, in_f), (0, 4, in_f), (1, 1, in_f)):
        x = torch.randn(shape)
        (y,) = sess.run(None, ort_inputs(sess, (x,)))
        assert y.shape == (*shape[:-1], out_f)
        with torch.no_grad():
            np.testing.assert_allclose(y, layer(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.float64, 1e-6)])
@pytest.mark.parametrize("init,block", [("random", 16), ("random", 1), ("lost", 1)])
def test_half_and_double_layers_run_in_onnxruntime(tmp_path, dtype, tol, init, block):
    """Every layout runs in ONNX Runtime in float16 (whose ScatterND adds no float16: the
    tiles are summed in float32) and in float64 (relative tolerance: the tile sums' float32
    rounding)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128)
    layer = SparseLowRankLinear.from_dense(lin.weight, lin.bias, rank=8, density=0.1,
                                           init=init, block=block).eval()
    with torch.no_grad():
        layer.B.normal_()
    layer = layer.to(dtype)
    path = tmp_path / "layer.onnx"
    export_onnx(layer, (torch.randn(2, 3, 256, dtype=dtype),), path)
    sess = ort_session(path)
    x = torch.randn(3, 5, 256, dtype=dtype)
    (y,) = sess.run(None, ort_inputs(sess, (x,)))
    with torch.no_grad():
        ref = layer.double()(x.double()).numpy()
    assert y.dtype == np.dtype(str(dtype).split(".")[1])
    np.testing.assert_allclose(y.astype(np.float64), ref, atol=tol * np.abs(ref).max(), rtol=0)


@torch.library.custom_op("structrewrite::onnx_test_untranslated", mutates_args=())
def _untranslated(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_untranslated.register_fake
def _(x):
    return torch.empty_like(x)


class _Untranslated(torch.nn.Module):
    def forward(self, x):
        return torch.ops.structrewrite.onnx_test_untranslated(x)


def test_op_without_translation_names_op_and_site(tmp_path):
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(4, 4))
    model.add_module("odd", _Untranslated())
    assert "structrewrite::onnx_test_untranslated" not in translations()
    with pytest.raises(OnnxTranslationError,
                       match=r"structrewrite::onnx_test_untranslated at odd \(_Untranslated\)"):
        export_onnx(model, (torch.randn(2, 3, 4),), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_cli_export_onnx_rewrites_exports_and_checks(tmp_path, capsys):
    from structrewrite.cli import main

    policy_file = tmp_path / "policy.json"
    policy_file.write_text(
        '{"version": 1, "rules": [{"match": "model.layers.*.mlp.*_proj", '
        '"rewrite": "sparse_lowrank", "with": {"rank": 8, "density": 0.05}}]}')
    out = tmp_path / "cli" / "model.onnx"
    code = main(["export-onnx", "examples.models:llama_small", "--policy", str(policy_file),
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "(12 structured op nodes)" in printed       # 4 layers x gate/up/down
    assert "ok" in printed.splitlines()[-1]
    check_file(out, 12)


def test_cli_export_onnx_weights_that_do_not_fit_are_one_line(tmp_path, capsys):
    """Weights without their policy, of another rank, or no file: exit 2 with one line (1
    is the parity mismatch)."""
    from structrewrite.cli import main
    from examples.models import llama_small

    policy_file = tmp_path / "policy.json"
    policy_file.write_text(
        '{"version": 1, "rules": [{"match": "model.layers.*.mlp.*_proj", '
        '"rewrite": "sparse_lowrank", "with": {"rank": 8, "density": 0.05}}]}')
    model, inputs = llama_small()
    torch.save(sr.rewrite(model, str(policy_file)).model.state_dict(), tmp_path / "w.pt")
    out = str(tmp_path / "m.onnx")
    other = tmp_path / "rank4.json"
    other.write_text(policy_file.read_text().replace('"rank": 8', '"rank": 4'))
    for argv, message in [(["--weights", str(tmp_path / "w.pt")], "give the --policy"),
                          (["--weights", str(tmp_path / "none.pt")], "cannot read --weights"),
                          (["--policy", str(other), "--weights", str(tmp_path / "w.pt")],
                           "size mismatch"),
                          (["--weights", str(tmp_path / "junk.pt")], "not a state dict saved by")]:
        (tmp_path / "junk.pt").write_text("not a pickle\n")
        code = main(["export-onnx", "examples.models:llama_small", "--out", out, *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def mlp_list_inputs():
    model, inputs = _mlp(torch.float32)
    return model, list(inputs)


def mlp_dict_inputs():
    model, (x,) = _mlp(torch.float32)
    return model, {"input": x}


def mlp_set_inputs():
    model, (x,) = _mlp(torch.float32)
    return model, {x}


def test_cli_export_onnx_takes_list_and_dict_inputs_and_refuses_bad_options(tmp_path, capsys):
    """Example inputs as a list (positional) or a dict (keywords) export and check like a
    tuple; other types, an opset older than the structured ops' bodies, a negative
    tolerance and an --out that cannot be opened are one line each, exit 2, before the
    export."""
    from structrewrite.cli import main

    policy_file = tmp_path / "policy.json"
    policy_file.write_text('{"version": 1, "rules": [{"match": "0", "rewrite": "sparse_lowrank", '
                           '"with": {"rank": 8, "density": 0.05}}]}')
    here = "tests.codegen.test_onnx_export"
    for spec in ("mlp_list_inputs", "mlp_dict_inputs"):
        out = tmp_path / f"{spec}.onnx"
        code = main(["export-onnx", f"{here}:{spec}", "--policy", str(policy_file), "--out", str(out)])
        printed = capsys.readouterr().out
        assert code == 0 and "(1 structured op nodes)" in printed and "ok" in printed, printed
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for argv, message in [([f"{here}:mlp_set_inputs"], "example inputs of type set"),
                          ([f"{here}:mlp_list_inputs", "--opset", "7"], "--opset must be 18"),
                          ([f"{here}:mlp_list_inputs", "--atol", "-1"], "--atol must be 0"),
                          ([f"{here}:mlp_list_inputs", "--out", str(blocker / "x.onnx")],
                           "cannot write --out")]:
        code = main(["export-onnx", *argv, *([] if "--out" in argv else
                                            ["--out", str(tmp_path / "bad.onnx")])])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert not (tmp_path / "bad.onnx").exists()
    with pytest.raises(ValueError, match="opset_version must be 18 or later"):
        export_onnx(torch.nn.Linear(4, 4), (torch.randn(2, 4),), tmp_path / "x.onnx", opset_version=17)


def _mlp(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    return model.to(dtype), (torch.randn(4, 64).to(dtype),)


def mlp_half():
    return _mlp(torch.float16)


def mlp_bf16():
    return _mlp(torch.bfloat16)


def test_cli_export_onnx_half_models_pass_and_what_ort_cannot_run_is_one_line(tmp_path, capsys):
    """The default tolerance follows the dtype: a float16 model, dense or with tiles,
    passes where float32's 1e-4 failed it on rounding alone. A bfloat16 model, which ONNX
    Runtime's CPU kernels cannot run, and an --out that cannot be written are one line
    with exit 2 (1 is the parity mismatch)."""
    from structrewrite.cli import main

    policy_file = tmp_path / "tiles.json"
    policy_file.write_text('{"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank", '
                           '"with": {"rank": 8, "density": 0.25, "block": 16}}]}')
    spec = f"{__name__}:mlp_half"
    for argv in ([], ["--policy", str(policy_file)]):
        code = main(["export-onnx", spec, "--out", str(tmp_path / "h.onnx"), *argv])
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert code == 0 and "ok" in last, last
    for argv, message in [([f"{__name__}:mlp_bf16", "--out", str(tmp_path / "b.onnx")],
                           "no bfloat16 matrix products"),
                          ([spec, "--out", str(tmp_path)], "cannot write --out")]:
        code = main(["export-onnx", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
