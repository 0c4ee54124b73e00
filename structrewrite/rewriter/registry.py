"""The pass registry: pass name -> the module that defines it, imported lazily.

A new pass arrives as one file in ``structrewrite/passes/`` and one line here. The
order of this table is the pipeline order: when a policy uses several passes, the
manager runs them in this order.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

# name -> "module:attribute" of the Pass instance
PASSES: dict[str, str] = {
    "sparse_lowrank": "structrewrite.passes.sparse_lowrank:sparse_lowrank",
}


class UnknownPass(KeyError):
    pass


@lru_cache(maxsize=None)
def get_pass(name: str):
    try:
        target = PASSES[name]
    except KeyError:
        raise UnknownPass(name) from None
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def pass_names() -> list[str]:
    return list(PASSES)


def available_passes() -> dict[str, dict]:
    """Names, summaries and parameter schemas of the registered passes."""
    out = {}
    for name in PASSES:
        p = get_pass(name)
        out[name] = {"summary": p.summary, "options": p.schema(),
                     "budget": dict(p.budget_for)}
    return out
