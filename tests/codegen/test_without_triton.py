"""Triton is optional: without it the package imports and runs on the CPU.

The run happens in a fresh interpreter in which ``import triton`` fails (a ``None``
entry in ``sys.modules``, as on a platform with no Triton wheels).
"""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None          # import triton raises ImportError
    import torch
    import structrewrite as sr
    from structrewrite.codegen import triton as kernels
    from structrewrite.codegen.triton import aligned
    from structrewrite.nn import SparseLowRankLinear

    assert kernels.REGISTERED == [] and aligned.triton is None
    torch.manual_seed(0)
    for kw in ({}, {"init": "lost"}, {"block": 16}):
        layer = SparseLowRankLinear(64, 48, 8, 0.1, **kw)
        x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
        layer = layer.double()
        y = layer(x)
        ref = x @ layer.dense_weight().t() + layer.bias
        assert (y - ref).abs().max().item() < 1e-12, kw
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        (gref,) = torch.autograd.grad(ref.square().sum(), x)
        assert (gx - gref).abs().max().item() < 1e-10, kw
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 130))
    policy = {"version": 1, "rules": [{"match": "*", "rewrite": "sparse_lowrank",
                                       "with": {"rank": 8, "density": 0.05}}]}
    res = sr.rewrite(model, policy, example_inputs=(torch.randn(3, 64),))
    assert sum(isinstance(m, SparseLowRankLinear) for m in res.model.modules()) == 2
    path = sys.argv[1]
    sr.export_onnx(res.model, (torch.randn(3, 64),), path)
    from structrewrite.codegen.onnx import ort_inputs, ort_session
    x = torch.randn(7, 64)
    sess = ort_session(path, threads=1)
    (out,) = sess.run(None, ort_inputs(sess, (x,)))
    with torch.no_grad():
        assert (torch.from_numpy(out) - res.model(x)).abs().max().item() < 1e-4
    print("ok")
""")


def test_package_runs_without_triton(tmp_path):
    """Import, the layer's three supports (forward and gradient against the dense
    formula in float64), a rewrite and ONNX export with ONNX Runtime parity, all with
    ``import triton`` failing."""
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "m.onnx")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")
