"""``sparse_lowrank``: Linear W -> s·B·A + S (SLTrain; LOST).

Sites: ``nn.Linear`` and HF ``Conv1D`` (a linear layer stored transposed: y = x W + b
with W of shape in x out). The bias is kept. The replacement is a
``SparseLowRankLinear``; its ``init`` chooses between pretraining from scratch
(``random``, SLTrain), conversion of a trained weight (``svd``) and LOST's channel-wise
sparse residual (``lost``). See structrewrite/nn/sparse_lowrank.py for the algebra.

Cost (m = out, n = in, r = rank, d = density, b = bytes per element, β = has bias):
  dense   params m·n + β·m            FLOPs/token 2·m·n + β·m
  after   params r·(m+n) + nnz + β·m  FLOPs/token 2·r·(m+n) + 2·nnz + β·m
  nnz = round(d·m·n) (random, svd) or m·round(d·n) (lost); indices are int32.
  With ``block: k`` (k x k tiles): nnz = k²·min(round(d·m·n/k²), ⌊m/k⌋·⌊n/k⌋).
A budget ``params: f`` solves params_after(r) = f · params_before for r.
"""
import warnings
from dataclasses import dataclass
from typing import Optional

import sympy
import torch
import torch.nn as nn

from structrewrite.nn.sparse_lowrank import BLOCKS, INITS, SparseLowRankLinear, support_size
from structrewrite.rewriter.passbase import Constraint, Cost, ModulePattern, Pass, option

m, n, r, d, b, beta = sympy.symbols("m n r d b beta")


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    """The (out x in) weight of a Linear, or of a Conv1D (stored in x out)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


_PLAIN_FORWARDS = {("torch.nn.modules.linear", "Linear.forward"),
                   ("transformers.pytorch_utils", "Conv1D.forward")}


@torch.no_grad()
def _computes_linear(module: nn.Module) -> bool:
    """Whether the module's forward is the linear map of its weight and bias. A subclass
    with a forward of its own (HF's MoE routers, which return a tuple; Falcon's
    ``FalconLinear``, which computes ``x @ W.T + b``) is called once, hooks aside, on two
    random rows and compared with ``F.linear``; on ``meta``, by the output's shape."""
    fwd = type(module).forward
    if (getattr(fwd, "__module__", ""), getattr(fwd, "__qualname__", "")) in _PLAIN_FORWARDS:
        return True
    w = _weight_out_in(module)
    # (a generator of its own: planning leaves the caller's random stream as it was)
    x = torch.randn(2, w.shape[1], generator=torch.Generator(device="cpu").manual_seed(0),
                    device="cpu")
    x = x.to(device=w.device, dtype=w.dtype)
    # nor does the forward's own use of it (dropout in train mode), on the CPU and on the
    # weight's device
    fork = ({"devices": []} if w.device.type in ("cpu", "meta") else
            {"devices": [w.device.index or 0], "device_type": w.device.type})
    try:
        with torch.random.fork_rng(**fork):
            y = fwd(module, x)
    except Exception:   # noqa: BLE001 (any failure: not a plain linear map)
        return False
    if not isinstance(y, torch.Tensor) or y.shape != (2, w.shape[0]) or y.dtype != w.dtype:
        return False
    if w.is_meta:
        return True
    want = torch.nn.functional.linear(x, w, module.bias).double()
    tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
    return bool((y.double() - want).norm() <= tol * want.norm().clamp_min(1e-30))


def _capture(module: nn.Module):
    w = _weight_out_in(module)
    return {"weight": w, "bias": module.bias}


pattern = ModulePattern(
    types=("torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D"),
    capture=_capture,
    constraints=(
        Constraint("weight_2d", lambda mod: getattr(mod, "weight", None) is not None and mod.weight.dim() == 2,
                   "a 2-D weight"),
        Constraint("floating_weight", lambda mod: mod.weight.is_floating_point(),
                   "a floating-point weight (quantized layers are not supported)"),
        # nn.MultiheadAttention never calls its out_proj: it reads out_proj.weight itself
        Constraint("called_as_a_layer",
                   lambda mod: type(mod).__name__ != "NonDynamicallyQuantizableLinear",
                   "a layer that its parent calls (nn.MultiheadAttention reads its "
                   "out_proj's weight directly)"),
        Constraint("linear_forward", _computes_linear,
                   "a forward that computes x Wᵀ + b (a subclass with a forward of its own, "
                   "such as a MoE router returning a tuple, is not a linear layer)"),
    ),
)


@dataclass(frozen=True)
class SparseLowRankOptions:
    rank: Optional[int] = option(None, doc="rank r of the low-rank part (or give the budget 'params')",
                                 range=(1, None))
    density: float = option(0.03, doc="fraction of the out x in positions held by the sparse part",
                            range=(0.0, 1.0))
    init: str = option("svd", doc="random: SLTrain init for pretraining; svd: convert a trained "
                       "weight (top-r SVD + largest residual entries); lost: SVD + channel-wise "
                       "sparse residual (LOST)", choices=INITS)
    alpha: float = option(32.0, doc="scaling s = alpha / rank of the low-rank part", range=(1e-6, None))
    seed: int = option(0, doc="seed of the random support and init (combined with the site name)",
                       range=(0, None))
    block: int = option(1, doc="1: element-wise support; 16/32/64: the support is whole k x k "
                        "tiles (random or svd init), which the GPU kernels run on the tensor cores",
                        choices=BLOCKS)


def _nnz_expr(init: str, block: int = 1):
    half = sympy.Rational(1, 2)
    if init == "lost":
        return m * sympy.floor(d * n + half)
    if block > 1:
        tiles = sympy.Min(sympy.floor(d * m * n / block**2 + half),
                          sympy.floor(m / block) * sympy.floor(n / block))
        return block**2 * tiles
    return sympy.floor(d * m * n + half)


_NNZ = sympy.Symbol("nnz")


def _cost_with(nnz) -> Cost:
    """The layer's cost with ``nnz`` stored entries (a formula of the options, or ``_NNZ``
    for a layer whose support is known)."""
    params = r * (m + n) + nnz + beta * m
    return Cost(params=params, flops=2 * r * (m + n) + 2 * nnz + beta * m,
                bytes=b * params + 4 * (2 * nnz + m + 1))


class SparseLowRankPass(Pass):
    name = "sparse_lowrank"
    summary = "Linear W -> s·B·A + S: low rank plus fixed-support sparse (SLTrain; LOST)"
    Options = SparseLowRankOptions
    pattern = pattern
    budget_for = {"params": "rank"}
    produces = (SparseLowRankLinear,)

    def dims(self, match):
        w = match.captures["weight"]
        return {"m": w.shape[0], "n": w.shape[1], "beta": int(match.captures["bias"] is not None),
                "b": w.element_size()}

    def check(self, options, dims):
        if options.rank is None:
            raise ValueError("sparse_lowrank needs 'rank' or the budget 'params'")
        if options.rank > min(dims["m"], dims["n"]):
            raise ValueError(f"rank {options.rank} exceeds min(out, in) = {min(dims['m'], dims['n'])} "
                             f"of this {dims['m']}x{dims['n']} layer")
        if options.block > 1 and options.init == "lost":
            raise ValueError("init 'lost' has a channel-wise support; 'block' needs init "
                             "'random' or 'svd'")
        if options.block > 1 and min(dims["m"], dims["n"]) < options.block:
            raise ValueError(f"this {dims['m']}x{dims['n']} layer holds no whole "
                             f"{options.block}x{options.block} tile; use a smaller block")

    def cost_before(self) -> Cost:
        params = m * n + beta * m
        return Cost(params=params, flops=2 * m * n + beta * m, bytes=b * params)

    def cost_after(self, options) -> Cost:
        return _cost_with(_nnz_expr(options.init, options.block))

    def option_values(self, options):
        return {"r": options.rank, "d": options.density}

    def cost_of(self, module):
        """``cost_after``'s formulas for a layer already rewritten, at its own rank and
        support size."""
        return _cost_with(_NNZ).evaluate({
            "m": module.out_features, "n": module.in_features, "r": module.rank,
            "beta": int(module.bias is not None), "b": module.A.element_size(),
            "nnz": module.values.numel()})

    def solve_budget(self, dims, values, budget_field, fraction):
        init = values.get("init", SparseLowRankOptions.init)
        density = values.get("density", SparseLowRankOptions.density)
        block = values.get("block", SparseLowRankOptions.block)
        opts = SparseLowRankOptions(rank=1, init=init, density=density, block=block)
        sub = {sympy.Symbol(k): v for k, v in dims.items()} | {d: density}
        before = self.cost_before().params.subs(sub)
        after = self.cost_after(opts).params.subs(sub)
        (rank_real,) = sympy.solve(sympy.Eq(after, fraction * before), r)
        rank = min(int(sympy.floor(rank_real)), min(dims["m"], dims["n"]))
        if rank < 1:
            sparse = int(after.subs(r, 0))
            raise ValueError(f"the budget params={fraction} ({int(fraction * before)} parameters) "
                             f"leaves no room for rank >= 1: the sparse part and bias alone take {sparse}")
        return rank

    def replacement(self, ctx, module, options):
        captures = self.pattern.match(module).captures
        if options.block > 1 and options.density > 0 and support_size(
                *_weight_out_in(module).shape, options.density, options.init, options.block) == 0:
            warnings.warn(f"at density {options.density} a layer holds no whole {options.block}x"
                          f"{options.block} tile: its sparse part is empty (the report's nnz "
                          "shows which); block supports are meant for full-size layers",
                          UserWarning, stacklevel=2)
        new = SparseLowRankLinear.from_dense(
            captures["weight"], captures["bias"], rank=options.rank, density=options.density,
            init=options.init, alpha=options.alpha, seed=options.seed, key=ctx.fqn,
            block=options.block)
        if not isinstance(module, nn.Linear):   # HF Conv1D: to_dense() gives one back
            new.merges_into = "conv1d"
        new.train(module.training)
        return new

    def is_exact(self, options, dims):
        full = options.rank == min(dims["m"], dims["n"])
        return options.init != "random" and (full or (options.density == 1.0 and options.block == 1))

    def error(self, options, original, new):
        if options.init == "random" or new.A.device.type == "meta":
            return None
        w = _weight_out_in(original).detach().float()
        return float((new.dense_weight() - w).norm() / w.norm().clamp_min(1e-30))


sparse_lowrank = SparseLowRankPass()
