"""``canonicalize_attention``: eager softmax(Q·Kᵀ·s + M)·V -> scaled_dot_product_attention.

Attention passes look for ``scaled_dot_product_attention``; models written with eager
attention (HF ``attn_implementation="eager"``, hand-written blocks) compute it as

    w = matmul(q, transpose(k, -2, -1))        # the scores
    w = w * s   |   w / c   |   (nothing)      # the scale (s, or 1/c, or 1)
    w = w + mask                               # optional additive mask
    p = softmax(w, dim=-1) [.to(dtype)] [dropout(p, 0 or eval)]
    o = matmul(p, v)

which this pass rewrites to ``sdpa(q, k, v, attn_mask=mask, scale=s)``. It works on
both graph levels the capture produces: torch-level (symbolic_trace) and ATen-level
(torch.export). The softmax chain is left in place when something else uses it (HF
returns the attention weights), and is removed as dead code otherwise.

Named constraints (a near miss is left alone): ``last_dim_softmax`` (softmax over the
last dimension), ``keys_transposed`` (the last two dimensions of k swapped),
``scalar_scale`` (the scale is a Python number), ``no_active_dropout`` (dropout with p=0
or in eval mode), ``float_mask`` (the additive mask is not itself the scores).
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from structrewrite.rewriter.passbase import PassResult

aten = torch.ops.aten

_MATMUL = {aten.matmul.default, torch.matmul, operator.matmul, "matmul"}
_TRANSPOSE = {aten.transpose.int, torch.transpose, "transpose"}
_MUL = {aten.mul.Tensor, aten.mul.Scalar, operator.mul, torch.mul, "mul"}
_DIV = {aten.div.Tensor, aten.div.Scalar, operator.truediv, torch.div, "div"}
_ADD = {aten.add.Tensor, operator.add, torch.add, "add"}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, torch.softmax, F.softmax, "softmax"}
_CAST = {aten.to.dtype, aten._to_copy.default, "to", "float", "type_as"}
_DROPOUT = {aten.dropout.default, F.dropout, "dropout"}
_META = {aten._assert_tensor_metadata.default}

NAME = "canonicalize_attention"


def _is(node, targets) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


@dataclass
class AttentionCandidate:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: Optional[fx.Node]
    scale: float
    softmax: fx.Node
    out: fx.Node


def _single_chain_user(node: fx.Node) -> Optional[fx.Node]:
    users = [u for u in node.users if not _is(u, _META)]
    chain = [u for u in users if _is(u, _CAST | _DROPOUT | _MATMUL)]
    return chain[0] if len(chain) == 1 else None


def match(softmax: fx.Node):
    """The candidate rooted at a softmax node, or a string saying which constraint failed."""
    if not _is(softmax, _SOFTMAX):
        return "not a softmax"
    dim = _arg(softmax, 1, "dim")
    if dim not in (-1, 3):
        return "last_dim_softmax: softmax is not over the last dimension"
    scores = softmax.args[0]
    mask = None
    if _is(scores, _ADD):
        a, b = scores.args[0], scores.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            return "float_mask: the added term is not a tensor"
        scores, mask = a, b
    scale = 1.0
    if _is(scores, _MUL) and isinstance(scores.args[1], (int, float)):
        scores, scale = scores.args[0], float(scores.args[1])
    elif _is(scores, _DIV) and isinstance(scores.args[1], (int, float)):
        scores, scale = scores.args[0], 1.0 / float(scores.args[1])
    elif _is(scores, _MUL | _DIV):
        return "scalar_scale: the scale is not a Python number"
    if not _is(scores, _MATMUL):
        return "the softmax input is not a matmul of queries and keys"
    q, kt = scores.args[0], scores.args[1]
    if not _is(kt, _TRANSPOSE) or {kt.args[1], kt.args[2]} not in ({-2, -1}, {2, 3}):
        return "keys_transposed: the keys are not transposed in their last two dimensions"
    k = kt.args[0]
    node = softmax
    while True:
        nxt = _single_chain_user(node)
        if nxt is None:
            return "the softmax output does not reach a matmul with the values"
        if _is(nxt, _DROPOUT):
            p = _arg(nxt, 1, "p", 0.5)
            train = _arg(nxt, 2, "train", _arg(nxt, 2, "training", True))
            if p != 0.0 and train:
                return "no_active_dropout: attention dropout is active"
        if _is(nxt, _MATMUL):
            if nxt.args[0] is not node:
                return "the probabilities are not the left operand of the last matmul"
            return AttentionCandidate(q, k, nxt.args[1], mask, scale, softmax, nxt)
        node = nxt


def _erase_dead(graph: fx.Graph, start: list) -> None:
    """Erase the nodes upstream of a replaced one that nothing else uses any more (a shape
    assertion on a dead value goes with it); live values, inputs and outputs stay."""
    work, erased = list(start), set()
    while work:
        node = work.pop()
        if node in erased or node.op in ("placeholder", "output", "get_attr"):
            continue
        if any(not _is(u, _META) for u in node.users) or (node.op == "call_function" and node.is_impure()
                                                           and node.target not in _META):
            continue
        for u in list(node.users):
            graph.erase_node(u)
            erased.add(u)
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        work.extend(inputs)


def canonicalize_attention(gm: fx.GraphModule) -> PassResult:
    """Rewrite every eager attention in ``gm`` to scaled_dot_product_attention."""
    t0 = time.perf_counter()
    graph = gm.graph
    before = len(graph.nodes)
    created = 0
    candidates = [c for c in (match(n) for n in list(graph.nodes) if _is(n, _SOFTMAX))
                  if isinstance(c, AttentionCandidate)]
    for c in candidates:
        aten_level = c.out.op == "call_function" and isinstance(c.out.target, torch._ops.OpOverload)
        with graph.inserting_before(c.out):
            if aten_level:
                new = graph.call_function(aten.scaled_dot_product_attention.default,
                                          (c.q, c.k, c.v, c.mask, 0.0, False), {"scale": c.scale})
            else:
                new = graph.call_function(F.scaled_dot_product_attention, (c.q, c.k, c.v),
                                          {"attn_mask": c.mask, "dropout_p": 0.0, "scale": c.scale})
        new.meta.update({k: v for k, v in c.out.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
        new.meta["from_pass"] = NAME
        c.out.replace_all_uses_with(new)
        dead = [a for a in c.out.all_input_nodes]
        graph.erase_node(c.out)
        _erase_dead(graph, dead)
        created += 1
    if created:
        graph.lint()
        gm.recompile()
    erased = before - (len(graph.nodes) - created)
    return PassResult(NAME, sites=len(candidates), created=created, erased=erased,
                      seconds=time.perf_counter() - t0)
