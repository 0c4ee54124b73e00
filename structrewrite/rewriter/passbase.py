"""What a pass is: typed options, a pattern with named constraints, a replacement, a cost.

A pass is data (see STYLE.md): it declares

* ``Options``: a frozen dataclass whose fields are the pass's policy parameters. Field
  metadata carries the validation (``choices``, ``range``) and the help text. A field
  listed in ``budget_for`` may be given as a budget instead (``params: 0.5``).
* ``pattern``: what it rewrites. A ``ModulePattern`` names module types and *named*
  constraint predicates; a failed match is a falsy ``NoMatch`` whose explanation is built
  only when someone reads it.
* ``replacement(ctx, module, options)``: a function without hidden state that returns the
  new module. Per-site state (seed, name, recorded inputs) lives in ``ctx``.
* ``cost``: sympy formulas for params, FLOPs per token and bytes, before and after.

The pass manager (``manager.py``) does the walking, verification and reporting.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

import sympy
import torch.nn as nn


def option(default, *, doc: str, choices: Optional[tuple] = None,
           range: Optional[tuple] = None):
    """A pass option: a dataclass field with validation metadata.

    ``range=(lo, hi)``: inclusive bounds, ``None`` for open; ``choices``: allowed values.
    """
    return field(default=default, metadata={"doc": doc, "choices": choices, "range": range})


# -- matching ----------------------------------------------------------------------

class NoMatch:
    """A failed match: falsy, with a message built only on demand."""

    __slots__ = ("_explain",)

    def __init__(self, explain: Callable[[], str]):
        self._explain = explain

    def __bool__(self) -> bool:
        return False

    @property
    def reason(self) -> str:
        return self._explain()

    def __repr__(self) -> str:
        return f"NoMatch({self.reason})"


@dataclass(frozen=True)
class Match:
    """A successful match: the matched module and the named captures."""
    module: nn.Module
    captures: Mapping[str, Any]

    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True)
class Constraint:
    """A named side condition on a candidate module (``requirement`` says what it needs)."""
    name: str
    check: Callable[[nn.Module], bool]
    requirement: str


def type_names(module: nn.Module) -> set[str]:
    """Class names of the module and its bases, short and qualified."""
    names = set()
    for cls in type(module).__mro__:
        names.add(cls.__name__)
        names.add(f"{cls.__module__}.{cls.__qualname__}")
    return names


@dataclass(frozen=True)
class ModulePattern:
    """Matches a module by type (class names, so optional dependencies need no import)
    and named constraints; ``capture`` extracts the named captures (dimensions, weight)."""
    types: tuple[str, ...]
    capture: Callable[[nn.Module], Mapping[str, Any]]
    constraints: tuple[Constraint, ...] = ()

    def match(self, module: nn.Module):
        names = type_names(module)
        if not names.intersection(self.types):
            return NoMatch(lambda: f"is a {type(module).__name__}, expected one of {', '.join(self.types)}")
        for c in self.constraints:
            if not c.check(module):
                return NoMatch(lambda c=c: f"fails constraint '{c.name}': {c.requirement}")
        return Match(module, self.capture(module))


# -- cost --------------------------------------------------------------------------

@dataclass(frozen=True)
class Cost:
    """Sympy formulas of a layer's dimensions and options."""
    params: sympy.Expr
    flops: sympy.Expr       # per token (one row of the input)
    bytes: sympy.Expr       # storage of parameters and index buffers

    def evaluate(self, values: Mapping[str, Any]) -> dict[str, float]:
        return {k: _num(_compiled(getattr(self, k))(values)) for k in ("params", "flops", "bytes")}

    def formulas(self) -> dict[str, str]:
        return {k: str(getattr(self, k)) for k in ("params", "flops", "bytes")}


@functools.lru_cache(maxsize=None)
def _compiled(expr: sympy.Expr):
    """A fast numeric function of a formula (sympy's subs is too slow for 7B-sized plans)."""
    names = sorted(str(sym) for sym in expr.free_symbols)
    fn = sympy.lambdify([sympy.Symbol(x) for x in names], expr, modules="math")
    return lambda values: fn(*(values[x] for x in names))


def _num(expr) -> float:
    v = float(expr)
    return int(v) if v.is_integer() else v


# -- results -----------------------------------------------------------------------

@dataclass
class PassResult:
    """What a pass did: sites matched, nodes/modules created and erased, time."""
    name: str
    sites: int = 0
    created: int = 0
    erased: int = 0
    unchanged: int = 0
    seconds: float = 0.0

    @property
    def modified(self) -> bool:
        return self.created > 0


# -- context -----------------------------------------------------------------------

@dataclass
class SiteContext:
    """Per-site state the driver creates for a replacement: nothing is kept in the pass."""
    fqn: str
    seed: int
    recorded: Optional[tuple] = None      # (args, kwargs) seen by the site on example inputs


# -- the pass ----------------------------------------------------------------------

class Pass:
    """Base class of a rewrite. Subclasses set the class attributes and implement
    ``replacement``, ``dims``, ``cost_before`` and ``cost_after``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type]
    pattern: ClassVar[ModulePattern]
    # option filled from a budget: {budget field: solved field}, e.g. {"params": "rank"}
    budget_for: ClassVar[Mapping[str, str]] = {}
    # module types that are this pass's own output (a second run leaves them alone)
    produces: ClassVar[tuple[type, ...]] = ()

    # -- to implement --
    def replacement(self, ctx: SiteContext, module: nn.Module, options) -> nn.Module:
        raise NotImplementedError

    def dims(self, match: Match) -> dict[str, Any]:
        raise NotImplementedError

    def cost_before(self) -> Cost:
        raise NotImplementedError

    def cost_after(self, options) -> Cost:
        raise NotImplementedError

    def option_values(self, options) -> dict[str, Any]:
        """Numeric values of the option symbols used in ``cost_after``."""
        return {}

    def solve_budget(self, dims: Mapping[str, Any], options, budget_field: str, fraction: float):
        raise NotImplementedError

    def check(self, options, dims: Mapping[str, Any]) -> None:
        """Raise ValueError where the options do not fit the site's dimensions."""

    def is_exact(self, options, dims: Mapping[str, Any]) -> bool:
        """True where the rewrite reproduces the site exactly by construction."""
        return False

    def error(self, options, original: nn.Module, new: nn.Module) -> Optional[float]:
        """Relative reconstruction error where defined (None otherwise)."""
        return None

    def cost_of(self, module: nn.Module) -> Optional[dict[str, float]]:
        """params, flops per token and bytes of a module already in the pass's output form
        (a site left unchanged), where the pass can tell; None otherwise."""
        return None

    # -- shared --
    def accepts(self, module: nn.Module):
        return self.pattern.match(module)

    def already_done(self, module: nn.Module) -> bool:
        return isinstance(module, self.produces) if self.produces else False

    @classmethod
    def schema(cls) -> dict[str, dict]:
        out = {}
        for f in dataclasses.fields(cls.Options):
            md = f.metadata
            out[f.name] = {
                "type": _type_name(f.type),
                "default": f.default,
                "doc": md.get("doc", ""),
                **({"choices": list(md["choices"])} if md.get("choices") else {}),
                **({"range": list(md["range"])} if md.get("range") else {}),
            }
        for budget, target in cls.budget_for.items():
            out[budget] = {"type": "float", "default": None, "range": [0, 1],
                           "doc": f"budget: fraction of the dense parameter count; solves for {target}"}
        return out


def _type_name(t) -> str:
    if isinstance(t, str):
        return t
    args = [a for a in getattr(t, "__args__", ()) if a is not type(None)]
    return getattr(args[0] if args else t, "__name__", str(t))
