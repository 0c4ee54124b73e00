"""SparseLowRankLinear: a linear layer whose weight is W = s·B·A + S (SLTrain, LOST).

* ``A`` (rank x in), ``B`` (out x rank), ``s = alpha / rank`` (SLTrain's scaling);
* ``S`` is sparse with a *fixed* support, stored in the state dict as the int32 buffers
  ``sparse_crow`` / ``sparse_col`` / ``sparse_row`` (CSR by output row, the layout the
  kernels read) and trained through ``values``.

The weight is never formed in forward or backward: the layer computes through the op
``structrewrite::sparse_lowrank_linear``. ``to_dense()`` merges it back into nn.Linear.

Initialisations (``init``):

``random``  pretraining from scratch (SLTrain): B = 0, A Kaiming-uniform, support uniform
            at random over the out x in positions at ``density``, values uniform in
            ±1/sqrt(in). Deterministic from ``seed`` and the layer's ``key`` (its FQN).
``svd``     converting a trained weight: B, A from the top-``rank`` SVD; S keeps the
            largest-magnitude entries of the residual at ``density``. Exact at full rank.
``lost``    LOST: top-``rank`` SVD for the low-rank part; the residual's input channels
            (columns) ranked by L2 norm choose ``round(density * in)`` channels that S
            holds densely (channel-wise sparse component).
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
import torch.nn as nn

from structrewrite.ops import sparse_lowrank_linear  # noqa: F401  (registers the op)

INITS = ("random", "svd", "lost")


def site_seed(seed: int, key: str) -> int:
    """A 63-bit seed that depends only on the policy seed and the site's name."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def support_size(out_features: int, in_features: int, density: float, init: str) -> int:
    """Number of stored sparse entries (the nnz formula of the cost model)."""
    if init == "lost":
        return out_features * lost_channels(in_features, density)
    return int(math.floor(density * out_features * in_features + 0.5))


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


class SparseLowRankLinear(nn.Module):
    """y = s·(x Aᵀ) Bᵀ + x Sᵀ + bias with a fixed sparse support; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, rank: int, density: float,
                 bias: bool = True, alpha: float = 32.0, init: str = "random",
                 seed: int = 0, key: str = "", device=None, dtype=None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.density, self.alpha = rank, density, float(alpha)
        self.init, self.seed, self.key = init, seed, key
        nnz = support_size(out_features, in_features, density, init)
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
        if self.A.device.type != "meta":
            self.reset_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, density={self.density}, nnz={self.nnz}, "
                f"bias={self.bias is not None}, init={self.init}")

    # -- initialisation -------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(site_seed(self.seed, self.key))
        return g

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SLTrain's initialisation from scratch; regenerates the same support and the same
        initial values for the same (seed, key), on any device (also after ``to_empty``).

        For ``init: lost`` the support is a random choice of whole input channels."""
        g = self._generator()
        m, n = self.out_features, self.in_features
        if self.init == "lost":
            cols = torch.randperm(n, generator=g)[: lost_channels(n, self.density)]
            flat = channel_flat(cols, m, n)
        else:
            flat = torch.randperm(m * n, generator=g)[: self.nnz]
        self._set_support(flat)
        A = torch.empty(self.A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
        bound = 1.0 / math.sqrt(n)
        vals = torch.rand(self.nnz, generator=g, dtype=torch.float32) * (2 * bound) - bound
        self.A.copy_(A)
        self.B.zero_()
        self.values.copy_(vals)
        if self.bias is not None:
            self.bias.copy_(torch.rand(m, generator=g) * (2 * bound) - bound)

    def _set_support(self, flat: torch.Tensor) -> None:
        crow, col, row = csr_from_flat(flat.to(torch.int64).cpu(), self.out_features, self.in_features)
        self.sparse_crow.copy_(crow)
        self.sparse_col.copy_(col)
        self.sparse_row.copy_(row)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], rank: int,
                   density: float, init: str = "svd", alpha: float = 32.0, seed: int = 0,
                   key: str = "") -> "SparseLowRankLinear":
        """Build from a dense (out x in) weight. ``init: random`` ignores the weight's values
        (pretraining from scratch) but keeps its shape, device and dtype."""
        out_features, in_features = weight.shape
        mod = cls(in_features, out_features, rank, density, bias=bias is not None, alpha=alpha,
                  init=init, seed=seed, key=key, device=weight.device, dtype=weight.dtype)
        if weight.device.type == "meta" or init == "random":
            return mod
        # float64 SVD on CPU (exactness of full-rank conversion); float32 on accelerators
        W = weight.detach().to(torch.float64 if weight.device.type == "cpu" else torch.float32)
        U, sig, Vh = torch.linalg.svd(W, full_matrices=False)
        root = sig[:rank].sqrt()
        A = root.unsqueeze(1) * Vh[:rank]
        B = U[:, :rank] * root.unsqueeze(0) / mod.scale
        R = W - mod.scale * (B @ A)
        if init == "svd":
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
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.structrewrite.sparse_lowrank_linear(
            x, self.A, self.B, self.values, self.sparse_crow, self.sparse_col,
            self.sparse_row, self.bias, self.scale)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The (out x in) weight this layer represents, in float32 (for checks and export)."""
        W = self.scale * (self.B.float() @ self.A.float())
        W.index_put_((self.sparse_row.long(), self.sparse_col.long()), self.values.float(),
                     accumulate=True)
        return W

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """Merge back into an nn.Linear (the reverse of the rewrite)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.A.device, dtype=self.A.dtype)
        lin.weight.copy_(self.dense_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin
