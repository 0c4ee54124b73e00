"""The programmatic entry points: ``sr.plan`` and ``sr.rewrite``."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

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
    return resolve(Policy.coerce(policy), model)


def rewrite(model: nn.Module, policy, example_inputs=None,
            example_kwargs: Optional[Mapping[str, Any]] = None, inplace: bool = False,
            progress: Optional[Callable[[str], None]] = None) -> RewriteResult:
    """Rewrite ``model`` by ``policy``; the input model is left untouched unless ``inplace``.

    ``example_inputs`` (a tensor or a tuple of positional arguments) and ``example_kwargs``
    are run through the model once to record each site's inputs: exact rewrites are checked
    on them and block-level sites are traced with them.
    """
    pol = Policy.coerce(policy)
    the_plan = resolve(pol, model)
    target = model if inplace else copy.deepcopy(model)
    params_before = _count(target)
    todo = [e.fqn for e in the_plan if not e.done]
    recorded = record_inputs(target, todo, example_inputs, example_kwargs)
    report = run_plan(target, the_plan, recorded, progress=progress)
    report.model_params_before, report.model_params_after = params_before, _count(target)
    return RewriteResult(target, report, the_plan)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
