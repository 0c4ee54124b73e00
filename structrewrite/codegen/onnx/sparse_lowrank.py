"""ONNX translation of ``structrewrite::sparse_lowrank_linear``.

The op becomes one node ``com.structrewrite::SparseLowRankLinear`` with the op's inputs
in the op's order (``x, A, B, values, crow, col, row[, bias]``; a missing bias is an
omitted optional input) and the float attribute ``scale``.

Its function body (attached to the model as a FunctionProto, so that any ONNX Runtime
runs it with no plugin) computes the reference semantics without forming the weight:

* low-rank part and bias: ``Gemm(Gemm(x2, A, transB=1), B, bias, alpha=scale, transB=1)``
  (Gemm's third input is optional, which is how the optional bias passes through);
* sparse part, in one of three layouts (the choice, like the layouts, depends on the
  weights only, so ONNX Runtime's constant folding settles it once at session creation
  when the weights are initializers):

  - *channels*, when S uses at most kmax + 1 distinct input columns (LOST's channel-wise
    support): ``x[:, used] · Blockᵀ`` with the dense (out x used) block of S, one Gemm
    that also accumulates into the low-rank result;
  - *tiles*, when S is made of whole aligned 16 x 16 tiles (``block: 16/32/64``): the
    values as (tiles x 16 x 16) blocks; per call a ``Gather`` of each tile's 16 input
    features (tiles x 16 x M), one batched ``MatMul``, and a ``ScatterND`` that adds the
    products at the tiles' output rows;
  - *ELL* otherwise (scattered support, SLTrain / ``svd``): each output row's entries
    padded to the longest row kmax with column 0 / value 0; per call a ``Gather`` of the
    transposed input (out x kmax x M) and one batched ``MatMul`` with the values.

  The unused layout has size zero and costs nothing. Work is O(M · nnz) up to the padding,
  never O(M · out · in) for a scattered support; nothing of size out x in is stored.
  (Measured in ONNX Runtime on CPU: a COO form, Gather + Mul + ScatterND-add, is slower
  than ELL; a dense (out x used) block for a scattered support is faster than ELL but
  stores as much as the dense weight.)

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
    xt = op.Transpose(x2, perm=[1, 0])                              # in x M
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    # -- layout of S: depends on the weights only (folded into constants by ORT) --------
    crow64 = op.Cast(crow, to=7)                                   # to=INT64
    row64 = op.Cast(row, to=7)
    col64 = op.Cast(col, to=7)
    nnz = op.Shape(values)
    entries = op.Range(op.Constant(value_int=0), op.Squeeze(nnz), op.Constant(value_int=1))
    counts = op.Sub(op.Slice(crow64, one, op.Constant(value_ints=[2**62])),
                    op.Slice(crow64, zero, op.Constant(value_ints=[-1])))
    kmax = op.ReduceMax(op.Concat(counts, zero, axis=0), keepdims=1)      # longest row
    # the input columns S uses (plus column 0, which keeps Unique's input non-empty)
    used, first, inverse, _ = op.Unique(op.Concat(col64, zero, axis=0), sorted=1)
    inverse = op.Slice(inverse, zero, nnz)
    # whole aligned 16 x 16 tiles? (also true of 32- and 64-tile supports)
    sixteen = op.Constant(value_ints=[16])
    tiles_per_row = op.Div(op.Add(in_features, op.Constant(value_ints=[15])), sixteen)
    tile_key = op.Add(op.Mul(op.Div(row64, sixteen), tiles_per_row), op.Div(col64, sixteen))
    # (-1 keeps Unique's input non-empty and sorts first)
    tile_ids, _, tile_of, _ = op.Unique(op.Concat(op.Constant(value_ints=[-1]), tile_key, axis=0),
                                        sorted=1)
    n_tiles = op.Sub(op.Shape(tile_ids), one)
    whole = op.And(op.Equal(op.Mul(n_tiles, op.Constant(value_ints=[256])), nnz),
                   op.Greater(nnz, zero))
    # the layout: channels when S uses few columns (out x used), else tiles when S is
    # whole tiles, else ELL (out x kmax)
    by_channel = op.Cast(op.LessOrEqual(op.Shape(used), op.Add(kmax, one)), to=7)
    by_tile = op.Mul(op.Cast(whole, to=7), op.Sub(one, by_channel))
    by_row = op.Sub(op.Sub(one, by_channel), by_tile)
    # channels: the columns S uses, gathered once, times a dense (out x n_used) block
    n_ch = op.Mul(nnz, by_channel)
    ch_cols = op.Slice(used, zero, op.Mul(op.Shape(used), by_channel))
    ch_where = op.Concat(op.Unsqueeze(op.Slice(row64, zero, n_ch), one),
                         op.Unsqueeze(op.Slice(inverse, zero, n_ch), one), axis=1)
    ch_block = op.ScatterND(
        op.Expand(op.CastLike(op.Constant(value_float=0.0), values),
                  op.Concat(out_features, op.Shape(ch_cols), axis=0)),
        ch_where, op.Slice(values, zero, n_ch))
    # ELL: each output row's entries, padded to kmax with column 0 / value 0
    n_ell = op.Mul(nnz, by_row)
    ell_entries = op.Slice(entries, zero, n_ell)
    ell_rows = op.Gather(row64, ell_entries, axis=0)
    ell_pos = op.Sub(ell_entries, op.Gather(crow64, ell_rows, axis=0))
    ell_where = op.Concat(op.Unsqueeze(ell_rows, one), op.Unsqueeze(ell_pos, one), axis=1)
    ell_shape = op.Concat(out_features, op.Mul(kmax, by_row), axis=0)
    ell_col = op.ScatterND(op.Expand(op.Constant(value_int=0), ell_shape), ell_where,
                           op.Gather(col64, ell_entries, axis=0))
    ell_val = op.ScatterND(op.Expand(op.CastLike(op.Constant(value_float=0.0), values), ell_shape),
                           ell_where, op.Gather(values, ell_entries, axis=0))
    # tiles: values as (nt, 16, 16) blocks; each tile's 16 input and 16 output features
    nt = op.Mul(n_tiles, by_tile)
    n_tl = op.Mul(nnz, by_tile)
    tl_ids = op.Slice(tile_ids, one, op.Add(nt, one))
    lane = op.Range(op.Constant(value_int=0), op.Constant(value_int=16), op.Constant(value_int=1))
    tl_cols = op.Add(op.Unsqueeze(op.Mul(op.Mod(tl_ids, tiles_per_row), sixteen), one), lane)
    tl_rows = op.Add(op.Unsqueeze(op.Mul(op.Div(tl_ids, tiles_per_row), sixteen), one), lane)
    tl_where = op.Concat(op.Unsqueeze(op.Sub(op.Slice(tile_of, one, op.Add(n_tl, one)), one), one),
                         op.Unsqueeze(op.Mod(op.Slice(row64, zero, n_tl), sixteen), one),
                         op.Unsqueeze(op.Mod(op.Slice(col64, zero, n_tl), sixteen), one), axis=1)
    tl_val = op.ScatterND(
        op.Expand(op.CastLike(op.Constant(value_float=0.0), values),
                  op.Concat(nt, sixteen, sixteen, axis=0)),
        tl_where, op.Slice(values, zero, n_tl))
    # -- per call -----------------------------------------------------------------------
    # scale * (x Aᵀ) Bᵀ + bias
    y = op.Gemm(op.Gemm(x2, A, transB=1), B, bias, alpha=scale, transB=1)
    # channel part: x[:, cols] · blockᵀ, accumulated into y by Gemm's C
    y = op.Gemm(op.Gather(xt, ch_cols, axis=0), ch_block, y, transA=1, transB=1)
    # ELL part: gather each row's input features (out x kmax x M), one batched MatMul
    ell = op.MatMul(op.Unsqueeze(ell_val, one), op.Gather(xt, ell_col, axis=0))   # out x 1 x M
    tokens = op.Shape(x2, start=0, end=1)
    # (allowzero: a 0 in a shape is a 0, not "keep this dimension"; 0 tokens, below an
    # empty leading dimension, are calls like any other)
    ell = op.Reshape(ell, op.Concat(out_features, tokens, axis=0), allowzero=1)   # out x M
    # tile part: (nt x 16 x 16) · (nt x 16 x M) gathered inputs, added at the tiles' rows
    tl = op.MatMul(tl_val, op.Gather(xt, tl_cols, axis=0))                   # nt x 16 x M
    # summed in float32: ONNX Runtime's ScatterND adds no float16 (nor bfloat16); for a
    # float64 layer the ELL and tile sums are rounded to float32 (float64 doubled the
    # op's time)
    sparse = op.ScatterND(op.Cast(ell, to=1), op.Unsqueeze(tl_rows, op.Constant(value_ints=[2])),
                          op.Cast(tl, to=1), reduction="add")
    out = op.Add(y, op.Transpose(op.CastLike(sparse, y), perm=[1, 0]))
    return op.Reshape(out, op.Concat(lead, out_features, axis=0), allowzero=1)


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
