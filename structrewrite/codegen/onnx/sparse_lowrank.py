"""ONNX translation of ``structrewrite::sparse_lowrank_linear``.

The op becomes one node ``com.structrewrite::SparseLowRankLinear`` with the op's inputs
in the op's order (``x, A, B, values, crow, col, row[, bias]``; a missing bias is an
omitted optional input) and the float attribute ``scale``.

Its function body (attached to the model as a FunctionProto, so that any ONNX Runtime
runs it with no plugin) computes the reference semantics without forming the weight:

* low-rank part and bias: ``Gemm(Gemm(x2, A, transB=1), B, bias, alpha=scale, transB=1)``
  (Gemm's third input is optional, which is how the optional bias passes through);
* sparse part: the CSR support is laid out as ELL (``out x kmax``, kmax = the longest
  row; shorter rows padded with column 0 and value 0). This depends on the weights only,
  so ONNX Runtime's constant folding computes it once at session creation when the
  weights are initializers. Then, feature-major so that every gathered slice is a
  contiguous row of tokens: ``xt = x2ᵀ`` (in x M); ``Gather(xt, ell_col)`` (out x kmax x M);
  one batched ``MatMul`` with ``ell_val`` (out x 1 x kmax) contracts each output row's
  entries. The cost is O(M · out · kmax), i.e. O(M · nnz) up to the padding, never
  O(M · out · in). (A COO form, Gather + Mul + ScatterND-add, was measured slower in
  ONNX Runtime on CPU: it makes three passes over the M x nnz temporary instead of two.)

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
    # S in ELL layout (out x kmax, rows padded with column 0 / value 0); depends on the
    # weights only, so ONNX Runtime folds it into constants when they are initializers
    crow64 = op.Cast(crow, to=7)                                   # to=INT64
    row64 = op.Cast(row, to=7)
    counts = op.Sub(op.Slice(crow64, op.Constant(value_ints=[1]), op.Constant(value_ints=[2**62])),
                    op.Slice(crow64, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1])))
    kmax = op.ReduceMax(counts, keepdims=1)
    nnz = op.Shape(values)
    pos = op.Sub(op.Range(op.Constant(value_int=0), op.Squeeze(nnz), op.Constant(value_int=1)),
                 op.Gather(crow64, row64, axis=0))
    one = op.Constant(value_ints=[1])
    where = op.Concat(op.Unsqueeze(row64, one), op.Unsqueeze(pos, one), axis=1)   # nnz x 2
    ell = op.Concat(out_features, kmax, axis=0)
    ell_col = op.ScatterND(op.Expand(op.Constant(value_int=0), ell), where, op.Cast(col, to=7))
    ell_val = op.ScatterND(op.Expand(op.CastLike(op.Constant(value_float=0.0), values), ell),
                           where, values)
    # x Sᵀ, feature-major: gather the input features of each output row's entries
    # (out x kmax x M) and contract them with the row's values in one batched MatMul
    xt = op.Transpose(x2, perm=[1, 0])
    gathered = op.Gather(xt, ell_col, axis=0)
    sparse = op.MatMul(op.Unsqueeze(ell_val, one), gathered)          # out x 1 x M
    tokens = op.Shape(x2, start=0, end=1)
    sparse = op.Reshape(sparse, op.Concat(out_features, tokens, axis=0))
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
