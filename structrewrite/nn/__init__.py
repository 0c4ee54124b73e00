"""Structured modules that the passes install."""
from structrewrite.nn.sparse_lowrank import SparseLowRankLinear

__all__ = ["SparseLowRankLinear"]
