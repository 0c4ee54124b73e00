"""CPU implementations of the ``structrewrite::`` ops, on PyTorch's sparse kernels.

Importing this package registers them (``register``). The ops' reference
implementations stay the specification (``structrewrite.ops``): the tests compare these
against them, and the ops fall back to them for what these do not cover.
"""
from __future__ import annotations

REGISTERED: list[str] = []


def register() -> list[str]:
    """Register every CPU implementation once; return the names of the ops covered."""
    if not REGISTERED:
        from structrewrite.codegen.cpu import sparse_lowrank
        REGISTERED.extend(sparse_lowrank.register())
    return REGISTERED


register()
