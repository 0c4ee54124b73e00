"""The pass manager: runs the plan's passes in pipeline order, verifies after each.

The pipeline, in one place:

1. resolve the policy against the module tree (``policy.resolve``) -> plan;
2. record each site's inputs on the example inputs (one run of the whole model), when
   inputs are given: exact rewrites are checked on them, block-level passes trace with them;
3. for each pass in registry order (``registry.PASSES``), for each of its sites: match the
   pass's pattern, build the replacement (``SiteContext`` carries the per-site state),
   install it at the site's FQN, verify it, and report;
4. after each pass: every site it claimed holds the pass's output type, and graph
   modules lint.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from structrewrite.rewriter import registry
from structrewrite.rewriter.policy import Plan, PlanEntry
from structrewrite.rewriter.passbase import PassResult, SiteContext
from structrewrite.rewriter.report import Report, SiteReport

# Relative tolerance of the numerical check of exact rewrites (float32 compute).
EXACT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


class RewriteError(RuntimeError):
    """An exception inside a pass, re-raised with the pass and the site."""


class VerificationError(RewriteError):
    pass


def set_submodule(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def names_by_module(root: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every name it is registered under in ``root`` (a module shared by
    two parents has two), read in one walk of the tree."""
    names: dict[int, list[str]] = {}
    for n, m in root.named_modules(remove_duplicate=False):
        if n:
            names.setdefault(id(m), []).append(n)
    return names


def run_plan(model: nn.Module, plan: Plan, recorded: dict[str, tuple],
             progress: Optional[Callable[[str], None]] = None) -> Report:
    report = Report()
    by_pass: dict[str, list[PlanEntry]] = {}
    for entry in plan:
        by_pass.setdefault(entry.pass_name, []).append(entry)
    for name in registry.pass_names():
        if name not in by_pass:
            continue
        p = registry.get_pass(name)
        result = PassResult(name)
        t_pass = time.perf_counter()
        # one walk per pass: a pass's sites are disjoint subtrees, so replacing one leaves
        # the names of the others as they are
        names = names_by_module(model)
        for entry in by_pass[name]:
            if progress:
                progress(entry.fqn)
            result.sites += 1
            if entry.done:
                result.unchanged += 1
                report.sites.append(_unchanged_site(p, entry, model.get_submodule(entry.fqn)))
                continue
            report.sites.append(_rewrite_site(model, p, entry, recorded.get(entry.fqn), names))
            result.created += 1
            result.erased += 1
        _verify_pass(model, p, by_pass[name])
        result.seconds = time.perf_counter() - t_pass
        report.passes.append(dataclasses.asdict(result) | {"modified": result.modified})
    return report


def _rewrite_site(model, p, entry: PlanEntry, recorded, names: dict) -> SiteReport:
    """``names``: ``names_by_module`` of the model; the new module goes under every name of
    the old one, so that a module shared by two parents stays shared."""
    t0 = time.perf_counter()
    original = model.get_submodule(entry.fqn)
    match = p.accepts(original)
    if not match:
        raise RewriteError(f"pass {p.name} cannot rewrite {entry.fqn}: it {match.reason}")
    ctx = SiteContext(fqn=entry.fqn, seed=entry.options.seed, recorded=recorded)
    try:
        new = p.replacement(ctx, original, entry.options)
    except Exception as e:
        raise RewriteError(f"pass {p.name} failed on site {entry.fqn} "
                           f"({type(original).__name__}): {type(e).__name__}: {e}") from e
    new._structrewrite_from_pass = p.name
    _carry_hooks(original, new, entry.fqn)
    exact = p.is_exact(entry.options, entry.dims)
    verified = _check_exact(p, entry, original, new, recorded) if exact else None
    error = p.error(entry.options, original, new)
    for fqn in names.get(id(original), [entry.fqn]):
        set_submodule(model, fqn, new)
    values = dict(entry.dims) | p.option_values(entry.options)
    before, after = p.cost_before(), p.cost_after(entry.options)
    return SiteReport(site=entry.fqn, pass_name=p.name, module_type=entry.module_type,
                      options=dataclasses.asdict(entry.options), before=before.evaluate(values),
                      after=after.evaluate(values), formulas_before=before.formulas(),
                      formulas_after=after.formulas(), dims=dict(entry.dims), error=error,
                      exact=exact, verified=verified, seconds=time.perf_counter() - t0)


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
          "_backward_pre_hooks", "_is_full_backward_hook")


def _reparametrizations() -> tuple:
    """The classes of PyTorch's weight reparametrization pre-hooks (weight_norm,
    spectral_norm, pruning): they read attributes only the replaced module has."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    return (WeightNorm, SpectralNorm, prune.BasePruningMethod)


def _carry_hooks(old: nn.Module, new: nn.Module, fqn: str) -> None:
    """The forward and backward hooks registered on the replaced module go on with the new
    one: the new module takes the very dicts, so the handles the user holds still remove
    them (the model's own handles: ``sr.rewrite`` without ``inplace`` works on a copy).
    Weight reparametrizations (``weight_norm``, ``spectral_norm``, pruning) stay behind:
    they compute ``weight`` from tensors of the old module; the new one was made from the
    effective weight of the last call. State-dict hooks stay behind too (they name the
    old module's tensors)."""
    kinds = _reparametrizations()
    left = [type(h).__name__ for h in old._forward_pre_hooks.values() if isinstance(h, kinds)]
    if left:
        warnings.warn(f"{fqn}: {', '.join(left)} is not carried to the rewritten layer, which "
                      "holds the effective weight of the last call and trains its own "
                      "factors", UserWarning, stacklevel=4)
    for name in _HOOKS:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))
    if left:
        new._forward_pre_hooks = type(old._forward_pre_hooks)(
            (k, h) for k, h in old._forward_pre_hooks.items() if not isinstance(h, kinds))


def _unchanged_site(p, entry: PlanEntry, module) -> SiteReport:
    """A site already in the pass's output form: its cost as it is (FLOPs and bytes None
    where the pass cannot tell them)."""
    cost = p.cost_of(module) or {"params": sum(t.numel() for t in module.parameters()),
                                 "flops": None, "bytes": None}
    return SiteReport(site=entry.fqn, pass_name=p.name, module_type=entry.module_type, options={},
                      before=cost, after=cost, formulas_before={}, formulas_after={}, dims={},
                      status="unchanged")


def _check_exact(p, entry, original, new, recorded) -> Optional[float]:
    """An exact-by-construction rewrite must reproduce the site on its recorded inputs
    (or, for a module without recorded inputs, on random rows of its input width)."""
    if next(new.parameters()).device.type == "meta":
        return None
    if recorded is not None:
        args, kwargs = recorded
    elif "n" in entry.dims:
        w = next(original.parameters())
        gen = torch.Generator(device="cpu").manual_seed(0)
        args, kwargs = (torch.randn(8, entry.dims["n"], generator=gen, device="cpu").to(w),), {}
    else:
        return None
    with torch.no_grad():   # forward itself: the rewrite alone, without the modules' hooks
        ref, out = original.forward(*args, **kwargs), new.forward(*args, **kwargs)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    tol = EXACT_RTOL.get(ref.dtype, 1e-4)
    if not rel <= tol:
        raise VerificationError(f"pass {p.name} on {entry.fqn}: the rewrite is exact by construction "
                                f"but differs from the original by {rel:.3g} (relative, > {tol})")
    return rel


def _verify_pass(model: nn.Module, p, entries: list[PlanEntry]) -> None:
    for entry in entries:
        mod = model.get_submodule(entry.fqn)
        if p.produces and not isinstance(mod, p.produces):
            raise VerificationError(f"after pass {p.name}: site {entry.fqn} holds a "
                                    f"{type(mod).__name__}, expected {p.produces[0].__name__}")
    for mod in model.modules():
        if isinstance(mod, fx.GraphModule):
            mod.graph.lint()
