"""ONNX translation of ``structrewrite::sparse_lowrank_linear``.

The op becomes one node ``com.structrewrite::SparseLowRankLinear`` with the op's inputs
in the op's order (``x, A, B, values, crow, col, row[, bias]``; a missing bias is an
omitted optional input) and the float attribute ``scale``.

Its function body (attached to the model as a FunctionProto, so that any ONNX Runtime
runs it with no plugin) computes the reference semantics without forming the weight:

* low-rank part and bias: ``Gemm(Gemm(x2, A, transB=1), B, bias, alpha=scale, transB=1)``
  (Gemm's third input is optional, which is how the optional bias passes through);
* sparse part, in the transposed (feature-major) layout so that every gathered and
  scattered slice is a contiguous row of tokens:
  ``xt = x2ᵀ`` (in x M); ``g = Gather(xt, col)`` (nnz x M); ``g * values[:, None]``;
  ``ScatterND(zeros(out x M), row[:, None], ·, reduction="add")`` sums the entries of each
  output row; transposed back and added. The cost is O(M · nnz), not O(M · out · in).

The body is written for opset 18 and uses only operators whose semantics are the same up
to the opset the exporter targets; ``attach_functions`` rewrites its opset import to the
model's.
"""
from __future__ import annotations

from typing import Optional

import onnxscript
from onnxscript import FLOAT, INT32
from onnxscript import opset18 as op

from structrewrite.codegen.onnx.registry import DOMAIN, DOMAIN_VERSION, Translation

_custom = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
# A private domain for the one-node wrapper below: the exporter inlines it away.
_emit_domain = onnxscript.values.Opset(DOMAIN + ".emit", 1)


@onnxscript.script(_custom, default_opset=op)
def SparseLowRankLinear(x, A, B, values, crow, col, row, bias: Optional[FLOAT], scale: float):
    in_features = op.Shape(A, start=1, end=2)
    out_features = op.Shape(B, start=0, end=1)
    lead = op.Shape(x, start=0, end=-1)
    x2 = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), in_features, axis=0))
    # scale * (x Aᵀ) Bᵀ + bias
    y = op.Gemm(op.Gemm(x2, A, transB=1), B, bias, alpha=scale, transB=1)
    # x Sᵀ, feature-major: gather input features, scale by values, sum into output rows
    xt = op.Transpose(x2, perm=[1, 0])
    contrib = op.Mul(op.Gather(xt, col, axis=0), op.Unsqueeze(values, op.Constant(value_ints=[1])))
    tokens = op.Shape(x2, start=0, end=1)
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), x),
                      op.Concat(out_features, tokens, axis=0))
    rows = op.Unsqueeze(op.Cast(row, to=7), op.Constant(value_ints=[1]))  # to=INT64
    sparse = op.ScatterND(zeros, rows, contrib, reduction="add")
    out = op.Add(y, op.Transpose(sparse, perm=[1, 0]))
    return op.Reshape(out, op.Concat(lead, out_features, axis=0))


@onnxscript.script(_emit_domain, default_opset=op)
def _emit(x: FLOAT, A: FLOAT, B: FLOAT, values: FLOAT, crow: INT32, col: INT32, row: INT32,
          bias: Optional[FLOAT], scale: float) -> FLOAT:
    return _custom.SparseLowRankLinear(x, A, B, values, crow, col, row, bias, scale=scale)


def translate(x, A, B, values, crow, col, row, bias=None, scale=1.0):
    """Translation for the exporter's table: emits the single custom-domain node."""
    return _emit(x, A, B, values, crow, col, row, bias, scale=scale)


TRANSLATION = Translation(
    op="structrewrite::sparse_lowrank_linear",
    op_type="SparseLowRankLinear",
    translate=translate,
    function=SparseLowRankLinear,
)
