"""The end-to-end benchmark's record of what computed the sparse layers in a step."""
import torch
import torch.nn.functional as F

from benchmarks.sparse_lowrank import sparse_calls
from structrewrite.nn.sparse_lowrank import SparseLowRankLinear


def _step(fn, x):
    def step():
        fn(x).float().square().mean().backward()
    return step


def test_counts_the_op_calls_of_one_step():
    torch.manual_seed(0)
    layers = torch.nn.Sequential(SparseLowRankLinear(64, 48, 8, 0.05, block=16, key="a"),
                                 SparseLowRankLinear(48, 32, 8, 0.05, key="b"))
    for layer in layers:
        torch.nn.init.normal_(layer.B)
    x = torch.randn(5, 64, requires_grad=True)
    got = sparse_calls(_step(layers, x))
    assert got == "sparse_lowrank_linear x2, sparse_lowrank_linear_backward x2"
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_model_without_sparse_layers_reports_nothing():
    W = torch.randn(16, 8, requires_grad=True)
    assert sparse_calls(_step(lambda x: F.linear(x, W), torch.randn(3, 8))) == ""


def test_unknown_end_to_end_modes_are_refused_before_anything_runs(capsys):
    from benchmarks.sparse_lowrank import main
    assert main(["--e2e-modes", "eager,graph"]) == 2
    assert "unknown --e2e-modes ['graph']" in capsys.readouterr().err
