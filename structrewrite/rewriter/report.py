"""The rewrite report: per site, what was done and what it costs before and after."""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from rich.console import Console
from rich.table import Table


@dataclass
class SiteReport:
    site: str
    pass_name: str
    module_type: str
    options: dict[str, Any]
    before: dict[str, float]            # params, flops (per token), bytes
    after: dict[str, float]
    formulas_before: dict[str, str]
    formulas_after: dict[str, str]
    dims: dict[str, Any]
    error: Optional[float] = None       # relative reconstruction error, where defined
    exact: bool = False                 # exact by construction (and verified numerically)
    verified: Optional[float] = None    # max relative output difference on recorded inputs
    seconds: float = 0.0
    status: str = "rewritten"           # rewritten | unchanged (already in target form)


@dataclass
class Report:
    sites: list[SiteReport] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)     # per pass: sites, created, erased, seconds
    model_params_before: int = 0
    model_params_after: int = 0

    # -- totals --
    def totals(self) -> dict[str, dict[str, float]]:
        out = {"before": {}, "after": {}}
        for key in ("params", "flops", "bytes"):   # sites whose cost is unknown (None) add nothing
            out["before"][key] = sum(s.before.get(key) or 0 for s in self.sites)
            out["after"][key] = sum(s.after.get(key) or 0 for s in self.sites)
        return out

    def to_dict(self) -> dict:
        return {"sites": [asdict(s) for s in self.sites], "passes": self.passes,
                "totals": self.totals(), "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def _rows(self):
        for s in self.sites:
            opts = ", ".join(f"{k}={v}" for k, v in s.options.items() if v is not None and k != "seed")
            err = "exact" if s.exact else ("-" if s.error is None else f"{s.error:.3g}")
            yield [s.site, s.pass_name, opts, _human(s.before["params"]), _human(s.after["params"]),
                   _human(s.before["flops"]), _human(s.after["flops"]), _human(s.after["bytes"]),
                   err, f"{s.seconds * 1e3:.0f}" if s.status == "rewritten" else "unchanged"]

    _HEAD = ["site", "pass", "options", "params", "params'", "FLOPs/tok", "FLOPs/tok'", "bytes'",
             "rel. error", "ms"]

    def _total_row(self):
        t = self.totals()
        return ["total", "", f"{len(self.sites)} sites", _human(t["before"]["params"]),
                _human(t["after"]["params"]), _human(t["before"]["flops"]), _human(t["after"]["flops"]),
                _human(t["after"]["bytes"]), "", f"{sum(s.seconds for s in self.sites) * 1e3:.0f}"]

    def _formula_lines(self):
        seen = {}
        for s in self.sites:
            key = (s.pass_name, tuple(s.formulas_after.items()))
            seen.setdefault(key, s)
        for (name, _), s in seen.items():
            if s.formulas_before and s.formulas_after:   # none for sites left unchanged
                yield name, s.formulas_before, s.formulas_after

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self._HEAD) + " |", "|" + "---|" * len(self._HEAD)]
        for row in list(self._rows()) + [self._total_row()]:
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
        lines.append("")
        lines.append(f"Model parameters: {self.model_params_before:,} -> {self.model_params_after:,}")
        lines.append("")
        lines.append("Formulas (m = out, n = in, r = rank, d = density, b = bytes per element, "
                     "beta = has bias):")
        lines.append("")
        for name, before, after in self._formula_lines():
            for k in ("params", "flops", "bytes"):
                lines.append(f"- {name} {k}: `{before[k]}` -> `{after[k]}`")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        table = _table("rewrite report", self._HEAD, list(self._rows()), self._total_row())
        buf = io.StringIO()
        console = Console(file=buf, width=160, force_terminal=False)
        console.print(table)
        console.print(f"model parameters: {self.model_params_before:,} -> {self.model_params_after:,}")
        return buf.getvalue()


def _human(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.4g}"


def _table(title, head, rows, total=None) -> Table:
    table = Table(title=title, show_lines=False)
    for h in head:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    if total is not None:
        table.add_section()
        table.add_row(*[str(c) for c in total])
    return table


def render_table(title, head, rows) -> str:
    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False).print(_table(title, head, rows))
    return buf.getvalue()
