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

__all__ = ["rewrite", "plan", "Policy", "PolicyError", "Plan", "Report", "RewriteResult",
           "available_passes", "export_onnx", "__version__"]
