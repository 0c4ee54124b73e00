"""Benchmarks: ``python -m benchmarks <name>`` (or ``structrewrite bench <name>``).

Each benchmark is a module ``benchmarks/<name>.py`` with ``main(argv) -> int``; results
go to ``benchmarks/results/<name>.{md,json,png}``. See ``benchmarks/README.md``.
"""
from pathlib import Path

_NOT_BENCHMARKS = {"__init__", "__main__", "harness"}


def available() -> list[str]:
    """Names of the benchmark modules in this folder."""
    here = Path(__file__).resolve().parent
    return sorted(p.stem for p in here.glob("*.py") if p.stem not in _NOT_BENCHMARKS)


BENCHMARKS = tuple(available())
