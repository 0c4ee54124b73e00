"""The programmatic entry points: ``sr.plan`` and ``sr.rewrite``."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from structrewrite.rewriter.capture import record_inputs
from structrewrite.rewriter.manager import run_plan
from structrewrite.rewriter.policy import Plan, Policy, resolve
from structrewrite.rewriter.report import Report


@dataclass
class RewriteResult:
    model: nn.Module
    report: Report
    plan: Plan


def plan(model: nn.Module, policy) -> Plan:
    """Resolve ``policy`` (path, dict or Policy) against ``model`` without rewriting."""
    _not_compiled(model)
    return resolve(Policy.coerce(policy), model)


def rewrite(model: nn.Module, policy, example_inputs=None,
            example_kwargs: Optional[Mapping[str, Any]] = None, inplace: bool = False,
            progress: Optional[Callable[[str], None]] = None) -> RewriteResult:
    """Rewrite ``model`` by ``policy``; the input model is left untouched unless ``inplace``.

    ``example_inputs`` (a tensor or a tuple of positional arguments) and ``example_kwargs``
    are run through the model once to record each site's inputs: exact rewrites are checked
    on them and block-level sites are traced with them.

    Runs with autocast off (a call inside ``torch.autocast``, the compile backend's under
    an autocast region): factorizations, checks and recorded inputs in the model's own
    dtypes.
    """
    _not_compiled(model)
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        return _rewrite(model, policy, example_inputs, example_kwargs, inplace, progress)


def _not_compiled(model) -> None:
    """``torch.compile(model)`` returns a wrapper whose module names all start with
    ``_orig_mod.``: a policy's names would match nothing, and a rewrite of it would save
    checkpoints under those names."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "this is torch.compile's wrapper of a model (its names start with '_orig_mod.'): "
            "rewrite the model itself (wrapper._orig_mod, or before compiling), then compile "
            "the result; or compile with backend='structrewrite' and the policy as an option")


def _rewrite(model, policy, example_inputs, example_kwargs, inplace, progress) -> RewriteResult:
    pol = Policy.coerce(policy)
    the_plan = resolve(pol, model)
    target = model if inplace else copy.deepcopy(model)
    params_before = _count(target)
    todo = [e.fqn for e in the_plan if not e.done]
    _warn_fast_path(target, todo)
    recorded = record_inputs(target, todo, example_inputs, example_kwargs)
    if example_inputs is not None or example_kwargs:
        unused = [fqn for fqn in todo if fqn not in recorded]
        if unused:
            warnings.warn(
                f"{len(unused)} site(s) were not called by the example inputs "
                f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}): they are "
                "rewritten all the same, but a parent that reads such a layer's weight "
                "instead of calling it will fail, and exact rewrites there are checked on "
                "random rows only", UserWarning, stacklevel=2)
    report = run_plan(target, the_plan, recorded, progress=progress)
    report.model_params_before, report.model_params_after = params_before, _count(target)
    return RewriteResult(target, report, the_plan)


def _warn_fast_path(model: nn.Module, fqns: list) -> None:
    """nn.TransformerEncoderLayer's inference fast path (eval mode, no grad) reads its
    linear layers' weights instead of calling them, which a rewritten layer does not
    hold."""
    inside = [f for f in fqns if isinstance(model.get_submodule(f.rpartition(".")[0]),
                                            nn.TransformerEncoderLayer)]
    if inside:
        warnings.warn(
            f"{', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}: layers of an "
            "nn.TransformerEncoderLayer, whose inference fast path (eval mode without grad) "
            "reads their weights directly; run the rewritten model with "
            "torch.backends.mha.set_fastpath_enabled(False)", UserWarning, stacklevel=3)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
