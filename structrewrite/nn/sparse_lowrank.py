"""SparseLowRankLinear: a linear layer whose weight is W = s·B·A + S (SLTrain, LOST).

* ``A`` (rank x in), ``B`` (out x rank), ``s = alpha / rank`` (SLTrain's scaling);
* ``S`` is sparse with a *fixed* support, stored in the state dict as the int32 buffers
  ``sparse_crow`` / ``sparse_col`` / ``sparse_row`` (CSR by output row, the layout the
  kernels read) and trained through ``values``. ``values`` is 1-D: optimizer recipes that
  choose weight decay by ``p.dim() >= 2`` (nanoGPT's) leave it out; choose by name
  (``.A``, ``.B``, ``.values``, ``.bias``) instead. To change a support, load it
  (``load_state_dict``), assign the buffers, or ``copy_`` into them under
  ``torch.no_grad()``: the layouts derived from it are cached by the buffers' storage and
  version counter, and a write through ``.data`` moves no version counter, so the layer
  would go on with the old support's layouts. Buffers made under
  ``torch.inference_mode`` keep no version counter at all: there, load supports.

The weight is never formed in forward or backward: the layer computes through the op
``structrewrite::sparse_lowrank_linear``, except that under ``torch.compile`` a
channel-wise support (``init: lost``) is given to Inductor as its two GEMMs on widened
operands (``ops.sparse_lowrank_linear.channel_decomposition``), which need no kernel of
their own. ``to_dense()`` merges it back into nn.Linear (or HF's Conv1D where it
replaced one).

Initialisations (``init``):

``random``  pretraining from scratch (SLTrain): B = 0, A Kaiming-uniform, support uniform
            at random over the out x in positions at ``density``, values uniform in
            ±1/sqrt(in). Deterministic from ``seed`` and the layer's ``key`` (its FQN).
``svd``     converting a trained weight: B, A from the top-``rank`` SVD; S keeps the
            largest-magnitude entries of the residual at ``density``. Exact at full rank.
``lost``    LOST: top-``rank`` SVD for the low-rank part; the residual's input channels
            (columns) ranked by L2 norm choose ``round(density * in)`` channels that S
            holds densely (channel-wise sparse component).

Block supports (``block`` = 16, 32 or 64; ``random`` and ``svd`` only): the support is a
set of whole, aligned ``block x block`` tiles of the out x in grid, ``round(density *
out * in / block²)`` of them (at most the number of whole tiles), chosen uniformly at
random (``random``) or by the residual's tile norms (``svd``). It is still stored as
element CSR (same buffers, same op, same export); the GPU kernels detect the tiles and
run the sparse part on the tensor cores (codegen/triton/sparse_lowrank_block.py).
Element-wise random supports at a few percent density cannot use the tensor cores and
are bound by gathers; benchmarks/README.md has the measured difference.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
import torch.nn as nn

from structrewrite.ops import sparse_lowrank_linear  # noqa: F401  (registers the op)
from structrewrite.ops.sparse_lowrank_linear import channel_count, channel_decomposition
from structrewrite.codegen.triton.support_cache import forget, mark_written, version   # plain torch, no Triton

INITS = ("random", "svd", "lost")
BLOCKS = (1, 16, 32, 64)


_EAGER: list = []   # the CUDA kernels' eager autograd entry, where they are registered
_SUPPORT_BUFFERS = ("sparse_crow", "sparse_col", "sparse_row")
_PLAIN = (torch.Tensor, nn.Parameter)


def _eager_ok(x, A, B, values) -> bool:
    """Eager mode on plain CUDA tensors: call the kernels directly (no dispatcher layers,
    ``codegen/triton/sparse_lowrank.py: EagerFunction``). Tracing, export (fake or proxy
    tensors), ``torch.compile``, ``torch.jit.trace`` (which records an autograd.Function
    as a Python call that it cannot save), ``torch.func`` transforms (which refuse an
    autograd.Function without ``setup_context``), dispatch modes (which would see the
    kernels' GEMMs but not the Triton kernels; selective activation checkpointing runs
    one too, so there the backward computes x Aᵀ again) and tensor subclasses keep the
    op."""
    if not x.is_cuda or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._are_functorch_transforms_active():
        return False   # under torch.func (vmap, grad), wrapped operands or not: the op
    if torch._C._len_torch_dispatch_stack():
        return False   # a dispatch mode (FlopCounterMode, a debug mode) sees the op, not its parts
    if not _EAGER:
        from structrewrite.codegen import triton as tr
        if not tr.REGISTERED:
            return False
        from structrewrite.codegen.triton.sparse_lowrank import eager
        _EAGER.append(eager)
    return type(A) in _PLAIN and type(B) in _PLAIN and type(values) in _PLAIN


def site_seed(seed: int, key: str) -> int:
    """A 63-bit seed that depends only on the policy seed and the site's name."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def support_size(out_features: int, in_features: int, density: float, init: str,
                 block: int = 1) -> int:
    """Number of stored sparse entries (the nnz formula of the cost model)."""
    if init == "lost":
        return out_features * lost_channels(in_features, density)
    if block > 1:
        return block_count(out_features, in_features, density, block) * block * block
    return int(math.floor(density * out_features * in_features + 0.5))


def block_count(out_features: int, in_features: int, density: float, block: int) -> int:
    """Number of ``block x block`` tiles of a block support (at most the whole tiles)."""
    whole = (out_features // block) * (in_features // block)
    return min(int(math.floor(density * out_features * in_features / block**2 + 0.5)), whole)


def block_flat(tiles: torch.Tensor, in_features: int, block: int) -> torch.Tensor:
    """Flat indices (row * in + col), unsorted, of the tiles (flat ids over the grid of
    whole tiles, ``in // block`` per tile row)."""
    per_row = in_features // block
    ti, tj = torch.div(tiles, per_row, rounding_mode="floor"), tiles % per_row
    d = torch.arange(block, device=tiles.device)
    rows = (ti * block).view(-1, 1, 1) + d.view(1, -1, 1)
    cols = (tj * block).view(-1, 1, 1) + d.view(1, 1, -1)
    return (rows * in_features + cols).flatten()


def lost_channels(in_features: int, density: float) -> int:
    return int(math.floor(density * in_features + 0.5))


def channel_flat(cols: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Flat indices (row * in + col), unsorted, of a channel-wise support: every row holds ``cols``."""
    rows = torch.arange(out_features, device=cols.device).unsqueeze(1)
    return (rows * in_features + cols.unsqueeze(0)).flatten()


def csr_from_flat(flat: torch.Tensor, out_features: int, in_features: int):
    """Sorted flat indices (row * in + col) -> int32 (crow, col, row)."""
    flat = torch.sort(flat).values
    row = torch.div(flat, in_features, rounding_mode="floor")
    col = flat - row * in_features
    counts = torch.bincount(row, minlength=out_features)
    crow = torch.zeros(out_features + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow.int(), col.int(), row.int()


def check_support(crow: torch.Tensor, col: torch.Tensor, row: torch.Tensor, out_features: int,
                  in_features: int) -> None:
    """Raises ValueError unless (crow, col, row) is a support of an out x in matrix in the
    order the kernels read: CSR by output row, columns strictly ascending within a row, and
    ``row`` the row of each entry. A support loaded from elsewhere is checked here, since a
    kernel would read past its operands on an index out of range."""
    nnz = col.numel()
    dtypes = {t.dtype for t in (crow, col, row)}
    if dtypes != {torch.int32}:
        raise ValueError(f"support buffers must be int32, got {sorted(map(str, dtypes))} (a "
                         "Module.type() call casts every buffer; .to(dtype), .half() and the "
                         "like leave them alone)")
    if crow.shape != (out_features + 1,) or row.shape != (nnz,) or col.dim() != 1:
        raise ValueError(f"support shapes: crow {tuple(crow.shape)}, col {tuple(col.shape)}, "
                         f"row {tuple(row.shape)}; expected ({out_features + 1},), (nnz,), (nnz,)")
    crow, col, row = crow.long(), col.long(), row.long()
    _check_crow(crow, nnz)
    if nnz == 0:
        return
    _check_range(col, "sparse_col", in_features)
    rows = torch.repeat_interleave(torch.arange(out_features, device=crow.device),
                                   crow[1:] - crow[:-1])
    if not torch.equal(rows, row):
        raise ValueError("sparse_row does not match sparse_crow (the row of each entry)")
    flat = row * in_features + col
    if bool((flat[1:] <= flat[:-1]).any()):
        raise ValueError("support entries must be sorted by row, then by column, without "
                         "repeats")


def _check_crow(crow: torch.Tensor, nnz: int) -> None:
    """``check_support``'s test of the row pointers alone (int64)."""
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow[1:] < crow[:-1]).any()):
        raise ValueError(f"sparse_crow must rise from 0 to nnz = {nnz}")


def _check_range(t: torch.Tensor, name: str, bound: int) -> None:
    """``check_support``'s test of one index buffer's range (int64)."""
    if t.numel() and bool(((t < 0) | (t >= bound)).any()):
        raise ValueError(f"{name} holds indices outside [0, {bound})")


def _same(buffer: torch.Tensor, value) -> bool:
    """Whether a state dict's ``value`` holds what ``buffer`` holds already, on its device."""
    if not isinstance(value, torch.Tensor) or buffer.is_meta or value.is_meta:
        return False
    if value.shape != buffer.shape or value.dtype != buffer.dtype or value.device != buffer.device:
        return False
    return bool(torch.equal(value, buffer))


def _is_buffer(buffer: torch.Tensor, value) -> bool:
    """Whether a state dict's ``value`` is ``buffer`` itself (or a view of all of it)."""
    return (isinstance(value, torch.Tensor) and not buffer.is_meta and buffer.numel() > 0
            and value.shape == buffer.shape and value.dtype == buffer.dtype
            and value.device == buffer.device and value.data_ptr() == buffer.data_ptr())


def _int32_support(state_dict, keys):
    """(``state_dict`` with the support tensors at ``keys`` that hold other integer dtypes
    as int32, a copy of the dict where any changes; the keys whose indices do not fit)."""
    ints = (torch.int64, torch.int16, torch.int8, torch.uint8)
    wide = [k for k in keys if isinstance(state_dict[k], torch.Tensor)
            and not state_dict[k].is_meta and state_dict[k].dtype in ints]
    beyond = [k for k in wide if state_dict[k].numel() and int(state_dict[k].abs().max()) >= 2**31]
    if not wide or beyond:
        return state_dict, beyond
    return {**state_dict, **{k: state_dict[k].to(torch.int32) for k in wide}}, []


def _exporting() -> bool:
    """Whether ``torch.export`` is tracing. Reads the flag that ``torch.compiler.is_exporting``
    returns: while tracing for ``torch.compile``, Dynamo in torch 2.11 folds that call to
    True (later versions read the flag), which would keep compiled training off
    ``sparse_lowrank_linear_train``."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for the device type; False for types without autocast
    (``meta``: shape inference), for which ``torch.is_autocast_enabled`` raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


class SparseLowRankLinear(nn.Module):
    """y = s·(x Aᵀ) Bᵀ + x Sᵀ + bias with a fixed sparse support; see the module docstring."""

    #: what ``to_dense`` merges back into: ``"linear"`` (nn.Linear), or ``"conv1d"`` (HF's
    #: Conv1D, weight stored in x out), which the sparse_lowrank pass sets at Conv1D sites
    merges_into = "linear"

    def __init__(self, in_features: int, out_features: int, rank: int, density: float,
                 bias: bool = True, alpha: float = 32.0, init: str = "random",
                 seed: int = 0, key: str = "", block: int = 1, device=None, dtype=None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block}")
        if block > 1 and init == "lost":
            raise ValueError("init 'lost' has a channel-wise support; block supports need "
                             "init 'random' or 'svd'")
        if block > 1 and (out_features < block or in_features < block):
            raise ValueError(f"a {out_features}x{in_features} layer holds no whole "
                             f"{block}x{block} tile; use a smaller block")
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.density, self.alpha = rank, density, float(alpha)
        self.init, self.seed, self.key, self.block = init, seed, key, block
        nnz = support_size(out_features, in_features, density, init, block)
        if nnz >= 2**31:
            raise ValueError(f"support of {nnz} entries does not fit int32 indices")
        fk = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, **fk))
        self.B = nn.Parameter(torch.empty(out_features, rank, **fk))
        self.values = nn.Parameter(torch.empty(nnz, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        self.register_buffer("sparse_crow", torch.empty(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("sparse_col", torch.empty(nnz, dtype=torch.int32, device=device))
        self.register_buffer("sparse_row", torch.empty(nnz, dtype=torch.int32, device=device))
        # k where the support is channel-wise (every row holds the same k input channels),
        # else 0; set where the support is set or loaded (``_support_changed``)
        self._channel_k, self._support_seen = 0, ()
        # how many times the support was set, loaded or seen changed (``_support_changed``);
        # compiled code guards on it (``forward``)
        self._support_gen = 0
        # the support as last built or checked (``_support_id``), and the support buffers a
        # load in parts has brought so far (``_load_from_state_dict``)
        self._support_valid, self._support_parts = (), frozenset()
        self._parts_changed = False   # whether a part of a support loaded in parts changed it
        if self.A.device.type != "meta":
            self.reset_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def _apply(self, fn, recurse=True):
        """As nn.Module's. A channel-wise layer then checks its support once more: under
        ``torch.compile`` it runs as two GEMMs from ``_channel_k`` without the op (which
        checks supports), and after ``to_empty()`` the buffers hold whatever memory held.
        An invalid support clears ``_channel_k``, so compiled code reaches the op, which
        refuses it, as an eager call does."""
        out = super()._apply(fn, recurse)
        if self._channel_k and not self.sparse_col.is_meta and not torch.compiler.is_compiling():
            try:
                check_support(*self._support_buffers(), self.out_features, self.in_features)
            except ValueError:
                self._channel_k, self._support_seen = 0, ()
        return out

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in _SUPPORT_BUFFERS and "_support_gen" in self.__dict__ \
                and not torch.compiler.is_compiling():
            self._support_assigned()

    def _support_assigned(self) -> None:
        """A support buffer replaced by assignment (``layer.sparse_col = t``): what was
        read from the old support no longer holds, and compiled code, which guards on the
        support's generation, compiles again (it went on as channel-wise after a
        scattered support was assigned: 1.3 off). Where the three buffers now make a
        valid support, it is read at once, as a load reads it; otherwise (after the
        first of three assignments, or for a bad support) the next call checks it."""
        self._channel_k, self._support_seen = 0, ()
        self._support_gen += 1
        bufs = self._support_buffers()
        if any(not isinstance(t, torch.Tensor) or t.is_meta for t in bufs):
            return
        try:
            check_support(*bufs, self.out_features, self.in_features)
        except (ValueError, RuntimeError):
            return
        self._support_valid = self._support_id()
        self._support_changed()

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        """As nn.Module's, except that the layer takes no ``weight``: it has no dense weight
        matrix, and one set from outside would be a parameter that nothing reads (HF's
        ``tie_weights`` onto a rewritten head: the logits would not follow the tied
        embedding)."""
        if name == "weight":
            raise AttributeError(
                f"{self.key or 'SparseLowRankLinear'} has no dense weight to set or tie (it "
                "holds A, B and a sparse part; dense_weight() builds the matrix): leave a "
                "layer whose weight is tied or set from outside dense (a policy rule with "
                "rewrite: null)")
        super().register_parameter(name, param)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "SparseLowRankLinear cannot be compiled by torch.jit.script: use torch.jit.trace, "
            "torch.export, structrewrite.export_onnx or torch.compile")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, density={self.density}, nnz={self.nnz}, "
                f"bias={self.bias is not None}, init={self.init}"
                + (f", block={self.block}" if self.block > 1 else ""))

    # -- initialisation -------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(site_seed(self.seed, self.key))
        return g

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SLTrain's initialisation from scratch; regenerates the same support and the same
        initial values for the same (seed, key), on any device (also after ``to_empty``).

        For ``init: lost`` the support is a random choice of whole input channels, for a
        block support a random choice of whole tiles."""
        g = self._generator()
        cpu = {"generator": g, "device": "cpu"}   # drawn on the CPU whatever the default device
        m, n = self.out_features, self.in_features
        if self.init == "lost":
            cols = torch.randperm(n, **cpu)[: lost_channels(n, self.density)]
            flat = channel_flat(cols, m, n)
        elif self.block > 1:
            b = self.block
            tiles = torch.randperm((m // b) * (n // b), **cpu)[: self.nnz // (b * b)]
            flat = block_flat(tiles, n, b)
        else:
            flat = torch.randperm(m * n, **cpu)[: self.nnz]
        self._set_support(flat)
        A = torch.empty(self.A.shape, dtype=torch.float32, device="cpu")
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
        bound = 1.0 / math.sqrt(n)
        vals = torch.rand(self.nnz, dtype=torch.float32, **cpu) * (2 * bound) - bound
        self.A.copy_(A)
        self.B.zero_()
        self.values.copy_(vals)
        if self.bias is not None:
            self.bias.copy_(torch.rand(m, dtype=torch.float32, **cpu) * (2 * bound) - bound)

    def _set_support(self, flat: torch.Tensor) -> None:
        crow, col, row = csr_from_flat(flat.to(torch.int64).cpu(), self.out_features, self.in_features)
        self.sparse_crow.copy_(crow)
        self.sparse_col.copy_(col)
        self.sparse_row.copy_(row)
        for t in self._support_buffers():
            mark_written(t)   # an inference tensor keeps no version counter
        self._support_changed()
        self._support_valid = self._support_id()

    def _support_changed(self) -> None:
        """Reads the support once more where it was set or loaded: whether it is
        channel-wise (``_channel_k``), which decides how ``torch.compile`` sees the layer.
        An eager call also reads it again where the buffers changed since (moved, or
        written in place); a support written in place and then only run compiled is not
        seen: set supports through ``load_state_dict``. Each time moves the support's
        generation on, which compiled code guards on."""
        self._channel_k = channel_count(self.sparse_crow, self.sparse_col, self.out_features)
        self._support_seen = self._loaded_id = self._support_id()
        self._support_gen += 1

    def _support_seen_id(self) -> tuple:
        """``_support_id`` for ``forward``, which names the cause where the buffers have no
        storage of their own: ``torch.func.vmap`` over buffers stacked by
        ``stack_module_state``."""
        try:
            return self._support_id()
        except RuntimeError as exc:
            if any(torch._C._functorch.is_functorch_wrapped_tensor(t)
                   for t in self._support_buffers()):
                raise RuntimeError(
                    "SparseLowRankLinear: torch.func.vmap over the support buffers "
                    "(sparse_crow, sparse_col, sparse_row) is not supported. For an ensemble "
                    "of layers that share a support (the same seed and key), stack only the "
                    "parameters and pass them to functional_call on a real (not meta) "
                    "member, whose own buffers then serve every member") from exc
            raise

    def _support_buffers(self) -> tuple:
        """(sparse_crow, sparse_col, sparse_row)."""
        return tuple(getattr(self, n) for n in _SUPPORT_BUFFERS)

    def _support_id(self) -> tuple:
        return tuple((t.data_ptr(), version(t)) for t in self._support_buffers())

    def _check_support(self) -> None:
        """Checks a support that this layer did not build and has not checked since it
        last changed (``check_support``): one the buffers got from ``to_empty`` (never
        set), from a load in parts, or from a write in place (such as an average taken
        in floating point, which truncates indices). Raises ValueError rather than let a
        kernel read past its operands."""
        try:
            check_support(*self._support_buffers(), self.out_features, self.in_features)
        except ValueError as exc:
            raise ValueError(
                f"{self.key or 'SparseLowRankLinear'}: the sparse support is not valid ({exc}). "
                "Its buffers hold indices: after to_empty(), call reset_parameters() or load "
                "a state dict that holds sparse_crow, sparse_col and sparse_row (a loader that "
                "writes into the buffers, such as torch.distributed.checkpoint's, leaves the "
                "check of what it loaded to this call: a checkpoint with a bad support, or "
                "one whose shards have not all been loaded, ends here); an average "
                "of the model's buffers (AveragedModel(use_buffers=True), an EMA over the "
                "whole state dict) must copy them, not average them; and a load while other "
                "threads call the layer reads them half written (load into a second model "
                "and swap the two instead)") from None
        self._support_valid = self._support_id()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self._load_support(state_dict, prefix, local_metadata, strict, missing_keys,
                           unexpected_keys, error_msgs)
        self._loaded_id = self._support_id()   # the buffers as this load left them

    def _load_support(self, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs):
        """Loads as nn.Module does, then checks the support (``check_support``) once all
        three of its buffers have come. Where the load fails for this layer (a support of
        another size: PyTorch copies the buffers whose shapes agree, ``sparse_crow``, and
        reports the others), or the loaded support is not valid, the layer keeps its own
        support whole and the fault joins PyTorch's error messages, raised by
        ``load_state_dict``.

        A state dict in parts (a sharded checkpoint, loaded one shard at a time with
        ``strict=False``) may hold some of the three buffers: the support is checked when
        the last of them comes. A call in between checks the support as it stands (old
        and new buffers mixed) and refuses it unless it is valid. A layer built on
        ``meta`` and loaded with ``assign=True`` is checked like any other. A buffer whose
        incoming value equals what it holds is not written (``_same``): a reload of the
        whole support as it was changes nothing, and compiled code keeps running."""
        names = _SUPPORT_BUFFERS
        came = frozenset(n for n in names if prefix + n in state_dict)
        # other integer index dtypes (int64 from elsewhere) come in as the int32 the kernels
        # read, with assign=True too; indices beyond int32 are refused (a copy would wrap)
        state_dict, beyond = _int32_support(state_dict, [prefix + n for n in came])
        if beyond:
            error_msgs.append(f"{prefix.rstrip('.') or 'layer'}: loaded support: {beyond} hold "
                              "indices beyond int32")
            return
        # a buffer loaded with what it holds already is left as it is: its layouts stay
        # cached and compiled code keeps running (a reload of the same checkpoint, EMA
        # weights swapped in for evaluation, compiled again at every load before). Not
        # under assign=True, which hands the state dict's own tensors over.
        assign = local_metadata.get("assign_to_params_buffers", False)
        same = frozenset() if assign else frozenset(
            n for n in came if _same(getattr(self, n), state_dict[prefix + n]))
        # values that are the buffers themselves: what a loader that goes shard by shard
        # and fills the keys a shard lacks with the module's own tensors hands over
        # (torch.distributed.checkpoint's set_model_state_dict, which accelerate's sharded
        # loader calls per shard). They did not come from the checkpoint.
        fillers = frozenset(n for n in same if _is_buffer(getattr(self, n), state_dict[prefix + n]))
        arrived = came - fillers
        if came and not arrived and self._support_id() != getattr(self, "_loaded_id", ()):
            # the state dict is the buffers, written in place since the last load (a
            # layer.state_dict() edited and loaded back): all of it came
            arrived = came
        # buffers written in place since the layer last read its support (or a support never
        # read): changed, although equal to the state dict
        written = self._support_id() != self._support_seen
        if same:
            state_dict = {k: v for k, v in state_dict.items()
                          if k not in {prefix + n for n in same}}
        kept = {n: getattr(self, n).clone() for n in came - same}
        forget([getattr(self, n) for n in came - same])   # under swap_tensors, no weak references
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for n in same:
            if prefix + n in missing_keys:
                missing_keys.remove(prefix + n)
        pending = self._support_parts
        if not came or (same == frozenset(names) and not pending and not written):
            return   # nothing, or the whole support as it was: nothing changed
        if len(error_msgs) > errors:   # copied in place or assigned (assign=True): undo
            for n in came - same:
                self._buffers[n] = kept[n]
            return
        for n in came - same:   # seen by a call also where the buffers keep no version counter
            mark_written(getattr(self, n))
        changed = getattr(self, "_parts_changed", False) or bool(came - same) or written
        parts = pending | arrived
        if len(parts) < len(names) and not fillers:   # part of a sharded state dict: checked
            self._support_parts, self._parts_changed = parts, changed   # with the rest
            if changed:
                self._channel_k, self._support_seen = 0, ()
            return
        if not changed:   # every part as it was
            self._support_parts, self._parts_changed = frozenset(), False
            return
        real = not any(getattr(self, n).is_meta for n in names)
        if real:
            try:
                check_support(*self._support_buffers(), self.out_features, self.in_features)
            except ValueError as exc:
                fault = exc
                if len(parts) < len(names):
                    # a shard with fillers: what came is kept for the buffers still to
                    # come where it is valid by itself (a call in between refuses the mix)
                    try:
                        self._check_parts(arrived)
                    except ValueError as own:
                        fault = own
                    else:
                        self._support_parts, self._parts_changed = parts, True
                        self._channel_k, self._support_seen = 0, ()
                        return
                self._support_parts, self._parts_changed = frozenset(), False
                error_msgs.append(f"{prefix.rstrip('.') or 'layer'}: loaded support: {fault}")
                if came - same != frozenset(names):
                    # what this load brought is undone; what earlier parts left is checked
                    # by the next call (a mix of two supports is refused there)
                    for n in came - same:
                        self._buffers[n] = kept[n]
                    self._channel_k, self._support_seen = 0, ()
                    return
                for n in came - same:   # all three came in this load: keep the layer's own
                    self._buffers[n] = kept[n]
                real = False
        self._support_parts, self._parts_changed = frozenset(), False
        self._support_changed()
        if real:
            self._support_valid = self._support_id()

    def _check_parts(self, parts) -> None:
        """Raises ValueError where one of the support buffers ``parts`` is not valid by
        itself, whatever the others hold: sizes, ranges and order within the buffer."""
        out_features, in_features, nnz = self.out_features, self.in_features, self.nnz
        if "sparse_crow" in parts:
            crow = self.sparse_crow.long()
            if crow.shape != (out_features + 1,):
                raise ValueError(f"sparse_crow must rise from 0 to nnz = {nnz}")
            _check_crow(crow, nnz)
        for name, bound in (("sparse_col", in_features), ("sparse_row", out_features)):
            if name in parts:
                t = getattr(self, name).long()
                if t.shape != (nnz,):
                    raise ValueError(f"{name} holds indices outside [0, {bound})")
                _check_range(t, name, bound)
        if "sparse_row" in parts and nnz and bool((self.sparse_row[1:] < self.sparse_row[:-1]).any()):
            raise ValueError("sparse_row must not fall")

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], rank: int,
                   density: float, init: str = "svd", alpha: float = 32.0, seed: int = 0,
                   key: str = "", block: int = 1) -> "SparseLowRankLinear":
        """Build from a dense (out x in) weight. ``init: random`` ignores the weight's values
        (pretraining from scratch) but keeps its shape, device and dtype."""
        out_features, in_features = weight.shape
        mod = cls(in_features, out_features, rank, density, bias=bias is not None, alpha=alpha,
                  init=init, seed=seed, key=key, block=block, device=weight.device,
                  dtype=weight.dtype)
        if weight.device.type == "meta" or init == "random":
            return mod
        # float64 SVD on CPU (exactness of full-rank conversion) and of float64 weights;
        # float32 for the others on accelerators
        wide = weight.device.type == "cpu" or weight.dtype == torch.float64
        W = weight.detach().to(torch.float64 if wide else torch.float32)
        U, sig, Vh = torch.linalg.svd(W, full_matrices=False)
        root = sig[:rank].sqrt()
        A = root.unsqueeze(1) * Vh[:rank]
        B = U[:, :rank] * root.unsqueeze(0) / mod.scale
        R = W - mod.scale * (B @ A)
        if init == "svd" and block > 1:   # the tiles of largest residual norm
            wm, wn = out_features // block * block, in_features // block * block
            tiles = R[:wm, :wn].reshape(wm // block, block, wn // block, block)
            norms = tiles.square().sum(dim=(1, 3)).flatten()
            top = torch.topk(norms, mod.nnz // (block * block), sorted=False).indices
            flat = block_flat(top, in_features, block)
        elif init == "svd":
            flat = torch.topk(R.abs().flatten(), mod.nnz, sorted=False).indices
        else:  # lost: channel-wise support from the residual's column norms
            k = lost_channels(in_features, density)
            cols = torch.topk(R.norm(dim=0), k).indices
            flat = channel_flat(cols, out_features, in_features)
        mod._set_support(flat)
        vals = R[mod.sparse_row.long().to(R.device), mod.sparse_col.long().to(R.device)]
        mod.A.copy_(A)
        mod.B.copy_(B)
        mod.values.copy_(vals)
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    # -- compute --------------------------------------------------------------------
    def forward(self, input: torch.Tensor) -> torch.Tensor:   # noqa: A002 (nn.Linear's name)
        x = input
        A, B, values, bias = self.A, self.B, self.values, self.bias
        plain = type(x) in _PLAIN          # not a proxy or fake tensor of a tracer
        if plain and _autocast_on(x.device.type):   # AMP: compute in the autocast dtype
            dt = torch.get_autocast_dtype(x.device.type)
            # as autocast casts the operands of F.linear: float64 ones stay as they are
            x, A, B, values, bias = (t if t is None or t.dtype == torch.float64 else t.to(dt)
                                     for t in (x, A, B, values, bias))
        if plain and not torch.jit.is_tracing() and (x.dim() == 0
                                                     or x.shape[-1] != self.in_features):
            raise RuntimeError(f"{self.key or 'SparseLowRankLinear'}: an input of shape "
                               f"{tuple(x.shape)} for a layer of {self.in_features} -> "
                               f"{self.out_features} features")
        if plain and self.sparse_col.is_meta and not x.is_meta:
            raise ValueError(f"{self.key or 'SparseLowRankLinear'}: the sparse support is on the "
                             "meta device (never loaded): load a state dict that holds "
                             "sparse_crow, sparse_col and sparse_row, or call to_empty() and "
                             "reset_parameters()")
        if plain and not torch.compiler.is_compiling() and not torch.jit.is_tracing() \
                and self._support_seen_id() != self._support_seen:
            # buffers moved, written or loaded in parts since the support was read (not
            # while torch.jit.trace records: its second run, which must record the same
            # graph, would find the support seen; the op checks a support it has not seen)
            if self._support_id() != self._support_valid and not self.sparse_col.is_meta:
                self._check_support()
            self._support_changed()
        if torch.compiler.is_compiling() and self._support_gen < 0:
            # never true: the read makes Dynamo guard on the support's generation, so code
            # compiled before a support was loaded (or seen written) compiles again. The
            # kernels' layouts derived from a support are cached outside the graph, and a
            # CUDA graph (mode="reduce-overhead") replays the ones it was recorded with.
            raise AssertionError("negative support generation")
        if self._channel_k and torch.compiler.is_compiling() and not _exporting():
            # a channel-wise support is two GEMMs: Inductor compiles them with the code
            # around them, where the op would cost a Python call per layer and pass
            cols = self.sparse_col[: self._channel_k]
            return channel_decomposition(x, A, B, values, cols, bias, self.scale)
        args = (x, A, B, values, self.sparse_crow, self.sparse_col, self.sparse_row, bias,
                self.scale)
        if plain and _eager_ok(x, A, B, values):
            return _EAGER[0](*args)
        if self._keeps_xa(x, A, B, values):
            return torch.ops.structrewrite.sparse_lowrank_linear_train(*args)[0]
        return torch.ops.structrewrite.sparse_lowrank_linear(*args)

    def _keeps_xa(self, *tensors) -> bool:
        """Whether the call goes through ``sparse_lowrank_linear_train``, which hands x Aᵀ
        from the forward to the backward instead of computing it twice: a training step
        under ``torch.compile`` (not export, which keeps the op) of a tile support (or a
        channel-wise one whose support ``_channel_k`` does not know), whose backward uses
        x Aᵀ (for dB, and for the channel-wise support's d values too). A random support's
        folded path needs none, nor a layer whose B and values are frozen."""
        return (torch.compiler.is_compiling() and not _exporting()
                and torch.is_grad_enabled() and (self.init == "lost" or self.block > 1)
                and any(t.requires_grad for t in tensors[2:4]))

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The (out x in) weight this layer represents (for checks, export and ``to_dense``),
        in float32, or in float64 for a float64 layer."""
        dtype = torch.float64 if self.A.dtype == torch.float64 else torch.float32
        W = self.scale * (self.B.to(dtype) @ self.A.to(dtype))
        W.index_put_((self.sparse_row.long(), self.sparse_col.long()), self.values.to(dtype),
                     accumulate=True)
        return W

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """Merge back (the reverse of the rewrite): into an nn.Linear, or into HF's
        ``Conv1D`` where the layer replaced one (``merges_into``), whose weight is stored
        in x out: a model merged back then has the state dict of the original. The module
        is built on the meta device and then given memory: its random initialisation,
        which the merge overwrites, draws nothing from the caller's random stream."""
        if self.merges_into == "conv1d":
            from transformers.pytorch_utils import Conv1D
            with torch.device("meta"):
                mod = Conv1D(self.out_features, self.in_features).to(self.A.dtype)
            mod = mod.to_empty(device=self.A.device)
            mod.weight.copy_(self.dense_weight().t())
            if self.bias is not None:
                mod.bias.copy_(self.bias)
            else:
                mod.bias.zero_()
            return mod
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta", dtype=self.A.dtype).to_empty(device=self.A.device)
        lin.weight.copy_(self.dense_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin
