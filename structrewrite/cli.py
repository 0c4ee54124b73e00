"""The ``structrewrite`` command.

    structrewrite passes
    structrewrite plan    MODEL --policy POLICY
    structrewrite rewrite MODEL --policy POLICY --out DIR

MODEL is ``package.module:callable``; the callable returns a model, or a tuple of a model
and its example inputs (a tensor, a tuple or list of positional arguments, or a dict of
keyword arguments). Policy problems
print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

EXIT_USAGE = 2

# Further sub-commands: "module:function" of a function(subparsers) that adds the
# command's parser and sets `func` on it. A feature brings its own command; it is
# imported only when the parser is built.
EXTRA_COMMANDS: list[str] = ["structrewrite.codegen.onnx.cli:add_parser"]


class CliError(Exception):
    pass


def load_model_spec(spec: str):
    """``package.module:callable`` -> (model, example_inputs or None)."""
    if ":" not in spec:
        raise CliError(f"MODEL must look like package.module:callable, got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise CliError(f"cannot import {mod_name!r} for MODEL {spec!r}: {e}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise CliError(f"module {mod_name!r} has no attribute {attr!r}")
    made = factory() if callable(factory) else factory
    if isinstance(made, tuple):
        model, inputs = made[0], (made[1] if len(made) > 1 else None)
    else:
        model, inputs = made, None
    import torch.nn as nn
    if not isinstance(model, nn.Module):
        raise CliError(f"{spec} returned {type(model).__name__}, expected an nn.Module "
                       f"or (nn.Module, example_inputs)")
    return model, inputs


def example_call(spec: str, inputs) -> tuple[tuple, dict]:
    """A MODEL's example inputs as (positional, keyword) arguments: a tensor, a tuple or
    list of positional arguments, or a dict of keyword arguments."""
    if inputs is None:
        return (), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    import torch
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    raise CliError(f"{spec} returned example inputs of type {type(inputs).__name__}; give a "
                   "tensor, a tuple or list of positional arguments, or a dict of keyword "
                   "arguments")


def cmd_passes(args) -> int:
    import structrewrite as sr
    passes = sr.available_passes()
    if args.json:
        print(json.dumps(passes, indent=2, default=str))
        return 0
    console = Console()
    for name, info in passes.items():
        console.print(f"[bold]{name}[/bold]: {info['summary']}")
        for opt, schema in info["options"].items():
            extra = ""
            if "choices" in schema:
                extra = f" one of {schema['choices']}"
            elif "range" in schema:
                extra = f" in {schema['range']}"
            console.print(f"  {opt} ({schema['type']}, default {schema['default']}{extra}): {schema['doc']}")
    return 0


def cmd_plan(args) -> int:
    import structrewrite as sr
    model, _ = load_model_spec(args.model)
    plan = sr.plan(model, args.policy)
    if args.json:
        print(json.dumps(plan.to_rows(), indent=2, default=str))
    else:
        print(plan)
    return 0


def cmd_rewrite(args) -> int:
    import torch
    import structrewrite as sr
    model, inputs = load_model_spec(args.model)
    call_args, call_kwargs = example_call(args.model, inputs)
    policy = sr.Policy.coerce(args.policy)
    plan = sr.plan(model, policy)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with Progress(TextColumn("rewriting"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=len(plan))

        def step(fqn):
            bar.update(task, advance=1, description=fqn)
        result = sr.rewrite(model, policy, example_inputs=call_args if inputs is not None else None,
                            example_kwargs=call_kwargs or None, inplace=True, progress=step)
    torch.save(result.model.state_dict(), out / "model.pt")
    policy.dump(out / "policy.yaml")
    (out / "report.json").write_text(result.report.to_json())
    (out / "report.md").write_text(result.report.to_markdown())
    print(result.report)
    print(f"wrote {out / 'model.pt'}, {out / 'policy.yaml'}, {out / 'report.json'}, {out / 'report.md'}")
    if any(t.is_meta for t in result.model.state_dict().values()):
        print("note: the model is on the meta device, so model.pt holds shapes, no values; "
              "materialise it with to_empty() and reset_parameters() on each rewritten layer "
              "(README, 'Models built on the meta device')")
    return 0


def cmd_bench(args) -> int:
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        runner = importlib.import_module("benchmarks.__main__")
    except ImportError:
        raise CliError("benchmarks/ not found: run `structrewrite bench` from a source checkout") from None
    if args.name is None:   # the runner's usage, with the benchmarks it finds
        return runner.main(["--help"])
    return runner.main([args.name, *args.rest]) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structrewrite", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("passes", help="list the registered passes and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("plan", help="resolve a policy against a model (no rewriting)")
    p.add_argument("model", help="package.module:callable returning a model (or (model, inputs))")
    p.add_argument("--policy", "-p", required=True, help="YAML or JSON policy file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("rewrite", help="rewrite a model; write state dict, policy and report")
    p.add_argument("model", help="package.module:callable returning a model (or (model, inputs))")
    p.add_argument("--policy", "-p", required=True, help="YAML or JSON policy file")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("bench", help="run a benchmark from benchmarks/ (in a source checkout)")
    p.add_argument("name", nargs="?", help="benchmark name, e.g. sparse_lowrank (none: list them)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    p.set_defaults(func=cmd_bench)

    for target in EXTRA_COMMANDS:
        mod_name, _, fn = target.partition(":")
        getattr(importlib.import_module(mod_name), fn)(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from structrewrite.rewriter.policy import PolicyError
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PolicyError as e:
        print(f"structrewrite: policy error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as e:
        print(f"structrewrite: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
