"""ONNX lowering: structured ops as ``com.structrewrite`` nodes with function bodies.

``export_onnx(model, args, path)`` writes a file that stock ONNX Runtime runs with no
plugin; ``ort_session(path)`` opens it. See ``export.py`` for the pipeline and
``registry.py`` for how an op's translation is registered.
"""
from structrewrite.codegen.onnx.export import (
    OnnxTranslationError,
    check_translations,
    custom_node_count,
    default_dynamic_shapes,
    export_kwargs,
    export_onnx,
    ort_inputs,
    ort_session,
)
from structrewrite.codegen.onnx.registry import DOMAIN, Translation, translations

__all__ = [
    "DOMAIN",
    "OnnxTranslationError",
    "Translation",
    "check_translations",
    "custom_node_count",
    "default_dynamic_shapes",
    "export_kwargs",
    "export_onnx",
    "ort_inputs",
    "ort_session",
    "translations",
]
