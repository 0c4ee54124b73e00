"""structrewrite: rewrite PyTorch models into structured-efficient forms.

    import structrewrite as sr
    result = sr.rewrite(model, "policy.yaml")
    print(result.report)
"""
from structrewrite import ops as _ops  # noqa: F401  (registers the structrewrite:: ops)
from structrewrite.codegen.onnx import export_onnx
from structrewrite.rewriter.api import RewriteResult, plan, rewrite
from structrewrite.rewriter.policy import Plan, Policy, PolicyError
from structrewrite.rewriter.registry import available_passes
from structrewrite.rewriter.report import Report

__version__ = "0.1.0"


def _backend_entry_point() -> bool:
    """Whether an installed entry point declares the ``"structrewrite"`` backend (not so
    where the package runs from a source tree on ``PYTHONPATH``)."""
    from importlib.metadata import entry_points

    return any(ep.name == "structrewrite" for ep in entry_points(group="torch_dynamo_backends"))


def _register_backend_name() -> None:
    """Make ``torch.compile(..., backend="structrewrite")`` work where the package runs
    from a source tree without being installed, so that no entry point declares the
    name. An installed package leaves it to the entry point, which works before the
    package is imported; registering here as well would make torch see the name twice
    when it loads the entry point."""
    if _backend_entry_point():
        return
    import torch._dynamo

    from structrewrite.rewriter.backend import structrewrite_backend
    if "structrewrite" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(structrewrite_backend, name="structrewrite")


_register_backend_name()

__all__ = ["rewrite", "plan", "Policy", "PolicyError", "Plan", "Report", "RewriteResult",
           "available_passes", "export_onnx", "__version__"]
