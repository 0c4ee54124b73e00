"""Capture: record what each site sees, and turn block-level sites into FX graphs.

* ``record_inputs`` runs the whole model once on the example inputs with forward
  pre-hooks on the requested sites and keeps each site's (args, kwargs).
* ``capture_block`` turns a module into a GraphModule: ``torch.fx.symbolic_trace`` where
  it works, else ``torch.export`` (non-strict) on the recorded inputs. HF transformers 5.x
  attention and decoder layers do not symbolic-trace; they export.
* ``find_attention`` locates ``scaled_dot_product_attention`` in a captured graph and the
  projections feeding its query, key and value (and the output projection it feeds), by
  reachability on the graph (networkx).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn


class CaptureError(RuntimeError):
    pass


def normalize_inputs(example_inputs) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def record_inputs(model: nn.Module, fqns: Iterable[str], example_inputs=None,
                  example_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, tuple]:
    """Run ``model`` once and return {fqn: (args, kwargs)} of the first call of each site.

    The run leaves no trace in the model or the random streams: a model in train mode
    updates buffers as it runs (BatchNorm's running statistics and batch count), so every
    buffer the run changed gets its value back, and the random number generators
    (CPU, and the CUDA devices the model is on) their states (train-mode dropout)."""
    fqns = list(fqns)
    if not fqns or (example_inputs is None and not example_kwargs):
        return {}
    seen: dict[str, tuple] = {}
    handles = []
    for fqn in fqns:
        mod = model.get_submodule(fqn)

        def hook(_mod, args, kwargs, fqn=fqn):
            if fqn not in seen:
                seen[fqn] = (_detach(args), _detach(kwargs))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    buffers = [b for b in model.buffers() if not b.is_meta]
    kept = [(b, b.clone()) for b in buffers]
    cuda = sorted({t.device.index or 0 for t in (*model.parameters(), *buffers) if t.is_cuda})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            model(*normalize_inputs(example_inputs), **dict(example_kwargs or {}))
    finally:
        for h in handles:
            h.remove()
        for b, value in kept:
            # compared, not told by the version counter: batch_norm's in-place update of
            # its running statistics leaves the counter as it was; and copying only what
            # changed leaves other buffers' versions (support caches key on them) alone.
            # Inference tensors (a model copied or built under inference mode) take the
            # write inside inference mode only.
            if not torch.equal(b, value):
                with torch.inference_mode() if b.is_inference() else torch.no_grad():
                    b.copy_(value)
    return seen


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(o) for o in obj)
    if isinstance(obj, list):
        return [_detach(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


_PLAIN = (torch.Tensor, bool, int, float, str, type(None))


def _exportable(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_exportable(v) for v in value)
    return isinstance(value, _PLAIN)


@dataclass
class CapturedBlock:
    fqn: str
    graph_module: fx.GraphModule
    method: str                       # "symbolic_trace" or "export"
    dropped_kwargs: tuple[str, ...]   # recorded kwargs that could not be traced (caches, ...)
    canonicalized: tuple = ()         # results of the canonicalization passes run on the graph


def capture_block(module: nn.Module, fqn: str = "", recorded: Optional[tuple] = None,
                  canonicalize: bool = True) -> CapturedBlock:
    """An FX graph of ``module``: symbolic_trace, else torch.export on the recorded inputs.
    With ``canonicalize`` the canonicalization passes run on it (eager softmax attention
    becomes scaled_dot_product_attention), so later passes see one form."""
    block = _capture(module, fqn, recorded)
    if canonicalize:
        from structrewrite.passes import CANONICALIZATIONS
        block.canonicalized = tuple(p(block.graph_module) for p in CANONICALIZATIONS)
    return block


def _capture(module: nn.Module, fqn: str, recorded: Optional[tuple]) -> CapturedBlock:
    try:
        return CapturedBlock(fqn, fx.symbolic_trace(module), "symbolic_trace", ())
    except Exception as trace_error:  # symbolic tracing fails on data-dependent Python
        if recorded is None:
            raise CaptureError(
                f"cannot capture {fqn or type(module).__name__}: symbolic_trace failed "
                f"({type(trace_error).__name__}: {trace_error}) and no inputs were recorded. "
                f"Fix: pass example_inputs (and example_kwargs) to sr.rewrite") from None
    args, kwargs = recorded
    keep = {k: v for k, v in kwargs.items() if _exportable(v)}
    dropped = tuple(k for k in kwargs if k not in keep)
    if "use_cache" in keep:
        keep["use_cache"] = False
    try:
        ep = torch.export.export(module, tuple(args), keep, strict=False)
    except Exception as e:
        raise CaptureError(f"cannot capture {fqn or type(module).__name__} with torch.export: "
                           f"{type(e).__name__}: {e}") from e
    return CapturedBlock(fqn, ep.module(), "export", dropped)


# -- graph queries ---------------------------------------------------------------

def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


_SDPA = {torch.ops.aten.scaled_dot_product_attention.default,
         torch.nn.functional.scaled_dot_product_attention}
_LINEAR = {torch.ops.aten.linear.default, torch.nn.functional.linear, torch._C._nn.linear}


def innermost_module(node: fx.Node) -> Optional[tuple[str, Any]]:
    """(path, module type) of the innermost entry of the node's ``nn_module_stack``, as the
    tracer wrote them (a plain path for torch.export, a source expression for dynamo)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, mod_type = list(stack.values())[-1]
    return path, mod_type


def node_module_fqn(node: fx.Node, root: Optional[fx.GraphModule] = None) -> Optional[str]:
    """The FQN (relative to the captured block) of the module a node belongs to."""
    if node.op == "call_module":
        return node.target
    where = innermost_module(node)
    return (where[0] or None) if where else None


def is_linear(node: fx.Node, root: Optional[fx.GraphModule] = None) -> bool:
    if node.op == "call_function" and node.target in _LINEAR:
        return True
    if node.op == "call_module" and root is not None:
        return isinstance(root.get_submodule(node.target), nn.Linear)
    return False


@dataclass
class AttentionMatch:
    sdpa: fx.Node
    q_proj: Optional[str]
    k_proj: Optional[str]
    v_proj: Optional[str]
    o_proj: Optional[str]


def find_attention(gm: fx.GraphModule) -> list[AttentionMatch]:
    """Each scaled_dot_product_attention in ``gm`` with the projections feeding q, k, v
    (the nearest linear ancestor of each input) and the projection its output feeds."""
    g = to_networkx(gm.graph)
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        projs = []
        for inp in node.args[:3]:
            projs.append(_nearest(g, inp, gm, reverse=True) if isinstance(inp, fx.Node) else None)
        out = _nearest(g, node, gm, reverse=False)
        found.append(AttentionMatch(node, *projs, out))
    return found


def _nearest(g: nx.DiGraph, start: fx.Node, gm, reverse: bool) -> Optional[str]:
    """The module FQN of the closest linear node upstream (reverse) or downstream of start."""
    graph = g.reverse(copy=False) if reverse else g
    lengths = nx.single_source_shortest_path_length(graph, start)
    best = None
    for node, dist in lengths.items():
        if (reverse or node is not start) and is_linear(node, gm) and (best is None or dist < best[0]):
            best = (dist, node)
    return node_module_fqn(best[1], gm) if best else None


def capture_sites(model: nn.Module, fqns: Iterable[str], example_inputs=None,
                  example_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, CapturedBlock]:
    """Record the sites' inputs in one run of ``model`` and capture each site as a graph."""
    fqns = list(fqns)
    recorded = record_inputs(model, fqns, example_inputs, example_kwargs)
    return {f: capture_block(model.get_submodule(f), f, recorded.get(f)) for f in fqns}
