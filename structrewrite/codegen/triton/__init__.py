"""Triton kernels, registered as the CUDA implementations of the ``structrewrite::`` ops.

Importing this package registers them when Triton is importable and a CUDA device is
present; otherwise it does nothing, and the ops keep their reference implementations.
The kernel modules themselves import on any machine with Triton, so that the tests can
run them on the CPU under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

REGISTERED: list[str] = []


def register() -> list[str]:
    """Register every Triton implementation once; return the names of the ops covered."""
    if REGISTERED:
        return REGISTERED
    import torch

    if not torch.cuda.is_available():
        return REGISTERED
    try:
        import triton  # noqa: F401
    except ImportError:
        return REGISTERED
    from structrewrite.codegen.triton import sparse_lowrank

    REGISTERED.extend(sparse_lowrank.register())
    return REGISTERED


register()
