"""Benchmarks: ``python -m benchmarks <name>`` (or ``structrewrite bench <name>``).

Each benchmark is a module ``benchmarks/<name>.py`` with ``main(argv) -> int``; results
go to ``benchmarks/results/<name>.{md,json,png}``. A module whose name starts with ``_``
is a helper, not a benchmark. See ``benchmarks/README.md``.
"""
from pathlib import Path

_NOT_BENCHMARKS = {"__init__", "__main__", "harness"}


def available(here: Path = Path(__file__).resolve().parent) -> list[str]:
    """Names of the benchmark modules in ``here`` (this folder)."""
    return sorted(p.stem for p in Path(here).glob("*.py")
                  if p.stem not in _NOT_BENCHMARKS and not p.stem.startswith("_"))


BENCHMARKS = tuple(available())
