"""Export a (rewritten) model to ONNX with structured ops as custom-domain nodes.

Pipeline (each step is one function below):

1. ``torch.export.export`` (non-strict) with dynamic shapes (``default_dynamic_shapes``
   when none are given: dims 0 and 1 of every tensor input of rank >= 2, i.e. batch and
   sequence length for the common ``(batch, seq, ...)`` inputs; ``Dim.AUTO``, so a dim
   the model specialises stays static instead of failing the export).
2. ``check_translations``: every ``structrewrite::`` op in the graph has a registered
   translation; otherwise ``OnnxTranslationError`` naming the op and the module (site).
3. ``torch.onnx.export`` with a custom translation table: each structured op becomes one
   node in domain ``com.structrewrite``.
4. ``attach_functions``: the FunctionProto of each custom op used is added to the model
   (its body in standard ONNX operators), so stock ONNX Runtime runs the file with no
   plugin. The model imports ``com.structrewrite`` version 1. ``name_custom_nodes``
   names each custom node after its site (``model.layers.0.mlp.up_proj/SparseLowRankLinear``).
5. Save. Weights go into the file itself unless they exceed ``_EXTERNAL_DATA_BYTES``.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from structrewrite.codegen.onnx.registry import DOMAIN, DOMAIN_VERSION, translations
from structrewrite.rewriter.capture import innermost_module

_EXTERNAL_DATA_BYTES = 1 << 30
_DEFAULT_AXIS_NAMES = ("batch", "seq")


class OnnxTranslationError(RuntimeError):
    """A structured op in the graph has no ONNX translation."""


def _site(node: torch.fx.Node) -> str:
    where = innermost_module(node)
    if where is None:
        return "<top level>"
    fqn, mod_type = where
    type_name = getattr(mod_type, "__name__", None) or str(mod_type).rsplit(".", 1)[-1]
    return f"{fqn or '<root>'} ({type_name})"


def _op_name(target: Any) -> Optional[str]:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name            # "namespace::name"
    return None


def structured_op_calls(graph_module: torch.fx.GraphModule):
    """(op name, node) for each call of a ``structrewrite::`` op in the graph."""
    for node in graph_module.graph.nodes:
        if node.op == "call_function":
            name = _op_name(node.target)
            if name is not None and name.startswith("structrewrite::"):
                yield name, node


def check_translations(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    """Raise ``OnnxTranslationError`` for any structured op without a translation.

    Returns the number of calls of each structured op (all translatable)."""
    table = translations()
    counts: dict[str, int] = {}
    for name, node in structured_op_calls(graph_module):
        if name not in table:
            raise OnnxTranslationError(
                f"op {name} at {_site(node)} has no ONNX translation; registered: "
                f"{sorted(table)}. Add a Translation for it in structrewrite/codegen/onnx/ "
                f"and one line in registry._MODULES, or keep this site dense in the policy.")
        counts[name] = counts.get(name, 0) + 1
    return counts


def _tensor_dims(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 2:
        return {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
    return None


def default_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """Dims 0 and 1 dynamic for every tensor input of rank >= 2, keyed by parameter name."""
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    spec = {}
    for name, value in bound.arguments.items():
        param = sig.parameters[name]
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(pytree.tree_map(_tensor_dims, v) for v in value)
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: pytree.tree_map(_tensor_dims, v) for k, v in value.items()}
        else:
            spec[name] = pytree.tree_map(_tensor_dims, value)
    return spec


def _translation_table() -> dict:
    table = {}
    for name, t in translations().items():
        namespace, opname = name.split("::")
        table[getattr(getattr(torch.ops, namespace), opname).default] = t.translate
    return table


def attach_functions(model_ir) -> list[str]:
    """Attach the FunctionProto of every custom-domain op the graph uses; returns op_types."""
    from onnxscript import ir

    by_type = {t.op_type: t for t in translations().values()}
    used = sorted({n.op_type for n in model_ir.graph.all_nodes() if n.domain == DOMAIN})
    onnx_version = model_ir.opset_imports.get("", 18)
    for op_type in used:
        if op_type not in by_type:
            raise OnnxTranslationError(f"node {DOMAIN}::{op_type} has no function body")
        fn = ir.serde.deserialize_function(by_type[op_type].function.to_function_proto())
        fn.opset_imports[""] = onnx_version
        model_ir.functions[fn.identifier()] = fn
    model_ir.opset_imports[DOMAIN] = DOMAIN_VERSION
    return used


def name_custom_nodes(model_ir) -> dict[str, str]:
    """Name each custom-domain node after its site (the FQN of the module that called the
    op, from the exporter's name scopes) and record the site in the node's metadata as
    ``structrewrite.site``. Returns node name -> site."""
    import ast

    sites, seen = {}, set()
    for node in model_ir.graph.all_nodes():
        if node.domain != DOMAIN:
            continue
        site = ""
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                names = ast.literal_eval(scopes)
                site = names[-2] if len(names) >= 2 else ""
            except (ValueError, SyntaxError):
                site = ""
        base = f"{site or '<root>'}/{node.op_type}"
        name, k = base, 1
        while name in seen:
            k += 1
            name = f"{base}_{k}"
        seen.add(name)
        node.name = name
        node.metadata_props["structrewrite.site"] = site
        sites[name] = site
    return sites


def _pin_static_dims(program) -> None:
    """Writes the dims that ``torch.export`` specialised as numbers. The exporter can leave
    them as symbols named by their value (``SymbolicDim('40')``), which ONNX Runtime takes
    as free: a 2-D model input whose feature dim the model fixes would accept any width."""
    import onnx_ir as ir

    for value in list(program.model.graph.inputs) + list(program.model.graph.outputs):
        shape = value.shape
        if shape is None:
            continue
        dims = [int(d.value) if not isinstance(d, int) and isinstance(getattr(d, "value", None), str)
                and d.value.isdigit() else d for d in shape]
        if dims != list(shape):
            value.shape = ir.Shape(dims)


def _rename_default_axes(program) -> None:
    """Name the symbolic dims at positions 0 / 1 of the inputs ``batch`` / ``seq`` where
    that naming is unambiguous (one symbol per position)."""
    by_pos: dict[int, set] = {0: set(), 1: set()}
    for value in program.model.graph.inputs:
        shape = value.shape
        if shape is None or len(shape) < 2:
            continue
        for pos in (0, 1):
            dim = shape[pos]
            if not isinstance(dim, int) and getattr(dim, "value", None) is not None:
                by_pos[pos].add(dim.value)
    mapping = {}
    for pos, names in by_pos.items():
        if len(names) == 1 and not (names & set(mapping)):
            mapping[next(iter(names))] = _DEFAULT_AXIS_NAMES[pos]
    if mapping and len(set(mapping.values())) == len(mapping):
        program.rename_axes(mapping)


def export_kwargs(model: torch.nn.Module, kwargs: Optional[dict] = None) -> dict:
    """The keyword arguments ``export_onnx`` calls the model with: the given ones, plus
    ``use_cache=False`` for a model whose config enables a KV cache (Hugging Face models),
    unless the caller chose ``use_cache`` itself. The exported forward then returns the
    logits without cache objects, which have no ONNX form here."""
    kwargs = dict(kwargs or {})
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) and "use_cache" not in kwargs:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "use_cache" in params:
            kwargs["use_cache"] = False
    return kwargs


def export_onnx(model: torch.nn.Module, args: Any, path: str | os.PathLike,
                kwargs: Optional[dict] = None, dynamic_shapes: Any = None,
                opset_version: Optional[int] = None, external_data: Optional[bool] = None):
    """Export ``model(*args, **kwargs)`` to ``path``; returns the ``torch.onnx.ONNXProgram``.

    Structured ops become single ``com.structrewrite`` nodes whose FunctionProtos travel in
    the file. ``dynamic_shapes`` follows ``torch.export``; when None, dims 0 and 1 of every
    tensor input of rank >= 2 are dynamic (named ``batch`` and ``seq`` in the file). Use
    example inputs with those dims >= 2 (size-1 dims are specialised by ``torch.export``).
    The model is exported in its current mode: call ``model.eval()`` first for inference.
    A model whose config enables a KV cache is exported with ``use_cache=False`` (see
    ``export_kwargs``).
    """
    if opset_version is not None and opset_version < 18:
        # the exporter would fall back to its own opset for some models and report nothing
        raise ValueError(f"opset_version must be 18 or later (the structured ops' bodies use "
                         f"opset 18), got {opset_version}")
    args = args if isinstance(args, tuple) else (args,)
    kwargs = export_kwargs(model, kwargs)
    # views (e.g. slices) as example inputs trip torch.export's input guards
    args, kwargs = pytree.tree_map(
        lambda v: v.contiguous() if isinstance(v, torch.Tensor) else v, (args, kwargs))
    default_dims = dynamic_shapes is None
    if default_dims:
        dynamic_shapes = default_dynamic_shapes(model, args, kwargs)
    exported = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                                   strict=False)
    check_translations(exported.graph_module)
    program = torch.onnx.export(exported, args, kwargs=kwargs, dynamo=True,
                                custom_translation_table=_translation_table(),
                                opset_version=opset_version, verbose=False)
    attach_functions(program.model)
    name_custom_nodes(program.model)
    _pin_static_dims(program)
    if default_dims:
        _rename_default_axes(program)
    if external_data is None:
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
        external_data = nbytes > _EXTERNAL_DATA_BYTES
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program.save(os.fspath(path), external_data=external_data)
    return program


def custom_node_count(path: str | os.PathLike) -> int:
    """Number of ``com.structrewrite`` nodes in the main graph of a saved model."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return sum(1 for n in model.graph.node if n.domain == DOMAIN)


def ort_inputs(session, args: Any, kwargs: Optional[dict] = None) -> dict:
    """Feed dict for ``session.run`` from the same (args, kwargs) given to ``export_onnx``:
    the tensors in flattening order, matched to the graph inputs by position."""
    args = args if isinstance(args, tuple) else (args,)
    leaves = [x for x in pytree.tree_leaves((args, dict(kwargs or {})))
              if isinstance(x, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(leaves) != len(names):
        raise ValueError(f"{len(leaves)} tensors given for the {len(names)} graph inputs {names}")
    return {n: x.detach().cpu().numpy() for n, x in zip(names, leaves)}


def ort_session(path: str | os.PathLike, providers: Optional[list] = None,
                threads: Optional[int] = None):
    """An ``onnxruntime.InferenceSession`` for an exported file (CPU unless ``providers``).

    The custom-domain nodes run through their function bodies: no plugin is registered."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), sess_options=opts,
                                providers=providers or ["CPUExecutionProvider"])
