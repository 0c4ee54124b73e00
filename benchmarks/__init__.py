"""GPU benchmarks: ``python -m benchmarks <name>`` (or ``structrewrite bench <name>``).

Each benchmark is a module ``benchmarks/<name>.py`` with ``main(argv) -> int``; results
go to ``benchmarks/results/<name>.{md,json,png}``. See ``benchmarks/README.md``.
"""
BENCHMARKS = ("sparse_lowrank",)
