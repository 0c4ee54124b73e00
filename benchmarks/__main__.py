"""Runner: ``python -m benchmarks <name> [args]``; ``main(argv)`` is also the entry of
``structrewrite bench``."""
from __future__ import annotations

import importlib
import sys
from typing import Optional

from benchmarks import BENCHMARKS


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m benchmarks <name> [args]\nbenchmarks: " + ", ".join(BENCHMARKS))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    mod = importlib.import_module(f"benchmarks.{name}")
    return mod.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
