"""Policies: which pass rewrites which site, with which options.

A policy is a YAML or JSON file, a dict, or a ``Policy``::

    version: 1
    defaults: {seed: 0}
    rules:
      - match: "model.layers.*.mlp.*_proj"     # glob on the FQN
        rewrite: sparse_lowrank
        with: {rank: 128, density: 0.03, init: lost}
      - match: "lm_head"
        rewrite: null                           # keep dense

Selectors (``match``):

* a string: a glob on the module's fully qualified name, where ``*`` matches within one
  dotted segment and ``**`` across segments (none too, where it stands for whole segments:
  ``**.lm_head`` matches ``lm_head``); ``re:<regex>`` is a regular expression that
  must match the whole name;
* a mapping with any of ``name`` (a string as above), ``type`` (class name, short or
  qualified, of the module or one of its bases), ``every`` and ``offset`` (position among
  repeated blocks: the first integer segment of the name, e.g. the ``7`` of
  ``model.layers.7.mlp``, must satisfy ``index % every == offset``); all given keys must hold.

Resolution walks ``model.named_modules()`` parent before child. For each module not
already inside a claimed subtree, a rule whose ``match`` is exactly the module's name
wins; else the first rule in file order whose selector matches *and* whose pass can
rewrite the module (``rewrite: null`` accepts anything). The chosen rule claims the
module and its whole subtree. A rule that claims nothing is an error unless it says
``optional: true``.

``defaults`` are option values given to every rule whose pass has that option.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch.nn as nn
import yaml

from structrewrite.rewriter import registry
from structrewrite.rewriter.passbase import NoMatch, type_names

TOP_KEYS = ("version", "defaults", "rules")
RULE_KEYS = ("match", "rewrite", "with", "optional")
SELECTOR_KEYS = ("name", "type", "every", "offset")


class PolicyError(ValueError):
    """A problem with a policy. The message names the file, the rule (index and line)
    and the fix; the parts are also attributes."""

    def __init__(self, problem: str, *, source: Optional[str] = None,
                 rule: Optional[int] = None, line: Optional[int] = None,
                 fix: Optional[str] = None):
        self.problem, self.source, self.rule, self.line, self.fix = problem, source, rule, line, fix
        where = source or "<policy>"
        if line is not None:
            where += f":{line}"
        if rule is not None:
            where += f": rule {rule}"
        msg = f"{where}: {problem}"
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)


# -- selectors ---------------------------------------------------------------------

def _glob_to_regex(glob: str) -> re.Pattern:
    """``*`` within a segment, ``**`` across them; ``**.`` also stands for no segment
    (``**.lm_head`` matches ``lm_head``, ``model.**.norm`` matches ``model.norm``)."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**.", i):
            out.append(r"(?:.*\.)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^.]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out))


def _is_pattern(s: str) -> bool:
    return s.startswith("re:") or any(c in s for c in "*?")


_INT_SEGMENT = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def block_index(fqn: str) -> Optional[int]:
    m = _INT_SEGMENT.search(fqn)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Selector:
    name: Optional[re.Pattern] = None
    exact: Optional[str] = None          # set when the name is a plain name (no pattern)
    types: tuple[str, ...] = ()
    every: Optional[int] = None
    offset: int = 0

    def matches(self, fqn: str, module: nn.Module) -> bool:
        if self.name is not None and not self.name.fullmatch(fqn):
            return False
        if self.types and not type_names(module).intersection(self.types):
            return False
        if self.every is not None:
            idx = block_index(fqn)
            if idx is None or idx % self.every != self.offset:
                return False
        return True


# -- policy ------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    index: int
    line: Optional[int]
    match: Any
    rewrite: Optional[str]
    options: Mapping[str, Any]          # the rule's `with`, merged over defaults
    optional: bool
    selector: Selector

    def describe(self) -> str:
        return f"match {self.match!r} -> {self.rewrite}"


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    source: Optional[str] = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    # -- construction --
    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Policy":
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text()
        except (OSError, ValueError) as e:   # ValueError: a path with a NUL byte
            raise PolicyError(f"cannot read the policy file ({getattr(e, 'strerror', None) or e})",
                              source=source,
                              fix="give the path of an existing YAML or JSON file") from None
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise PolicyError(f"malformed JSON: {e.msg}", source=source, line=e.lineno,
                                  fix="correct the JSON syntax at that line") from None
        else:
            data = _load_yaml(text, source)
        return cls.from_dict(data, source=source, lines=_rule_lines(text))

    @classmethod
    def from_dict(cls, data: Any, source: Optional[str] = None,
                  lines: Optional[list[int]] = None) -> "Policy":
        return _parse(data, source, lines or [])

    @classmethod
    def coerce(cls, policy: Union["Policy", Mapping, str, os.PathLike]) -> "Policy":
        """A Policy from a Policy, a dict, or a path to a YAML/JSON file."""
        if isinstance(policy, Policy):
            return policy
        if isinstance(policy, Mapping):
            return cls.from_dict(policy)
        if isinstance(policy, (str, os.PathLike)):
            return cls.load(policy)
        raise PolicyError(f"a policy must be a path, a dict or a Policy, not {type(policy).__name__}",
                          fix="pass sr.Policy.load(path) or a dict with 'version' and 'rules'")

    def relaxed(self) -> "Policy":
        """A copy in which every rule is optional (used where only part of a model is seen,
        e.g. one graph of several under torch.compile)."""
        return dataclasses.replace(self, rules=tuple(dataclasses.replace(r, optional=True)
                                                     for r in self.rules))

    def to_dict(self) -> dict:
        return copy.deepcopy(dict(self.raw))

    def dump(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _load_yaml(text: str, source: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PolicyError(f"malformed YAML: {problem}", source=source, line=line,
                          fix="correct the YAML syntax at that line") from None


def _rule_lines(text: str) -> list[int]:
    """1-based line of each rule, from the YAML node tree (JSON is YAML here)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if getattr(key, "value", None) == "rules" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def _parse(data: Any, source: Optional[str], lines: list[int]) -> Policy:
    def err(problem, fix, rule=None):
        line = lines[rule] if rule is not None and rule < len(lines) else None
        return PolicyError(problem, source=source, rule=rule, line=line, fix=fix)

    if not isinstance(data, Mapping):
        raise err(f"the policy must be a mapping, not {type(data).__name__}",
                  "write a mapping with keys 'version: 1' and 'rules: [...]'")
    for key in data:
        if key not in TOP_KEYS:
            raise err(f"unknown top-level key {key!r}", f"use only {', '.join(TOP_KEYS)}")
    if data.get("version", 1) != 1 or isinstance(data.get("version"), bool):
        raise err(f"unsupported version {data.get('version')!r}", "write 'version: 1'")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise err("'defaults' must be a mapping of option names to values",
                  "write e.g. 'defaults: {seed: 0}'")
    known = {"seed"} | {f.name for n in registry.pass_names()
                        for f in dataclasses.fields(registry.get_pass(n).Options)}
    for key in defaults:
        if key not in known:
            raise err(f"unknown option {key!r} in 'defaults'",
                      f"use options that a pass has: {', '.join(sorted(known))}")
    if "seed" in defaults:
        _check_value("seed", defaults["seed"], int, None, (0, None),
                     lambda p, f: err(p + " in 'defaults'", f))
    for n in registry.pass_names():   # each default as every pass that has the option takes it
        for f in dataclasses.fields(registry.get_pass(n).Options):
            if f.name in defaults and f.name != "seed":
                _check_value(f.name, defaults[f.name], _field_type(f), f.metadata.get("choices"),
                             f.metadata.get("range"), lambda p, fix: err(p + " in 'defaults'", fix))
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list):
        raise err("'rules' must be a list of rules",
                  "write 'rules:' followed by items like '- {match: ..., rewrite: ...}'")
    rules = []
    for i, raw in enumerate(raw_rules):
        rules.append(_parse_rule(i, raw, defaults, lambda p, f, i=i: err(p, f, i),
                                 lines[i] if i < len(lines) else None))
    return Policy(rules=tuple(rules), defaults=dict(defaults), source=source,
                  raw=copy.deepcopy(dict(data)))


def _parse_rule(i, raw, defaults, err, line) -> Rule:
    if not isinstance(raw, Mapping):
        raise err(f"a rule must be a mapping, not {type(raw).__name__}",
                  "write '- {match: <name pattern>, rewrite: <pass or null>}'")
    for key in raw:
        if key not in RULE_KEYS:
            hint = " (did you mean 'with'?)" if key in ("options", "params", "args") else ""
            raise err(f"unknown key {key!r}{hint}", f"use only {', '.join(RULE_KEYS)}")
    if "match" not in raw:
        raise err("the rule has no 'match'", "add 'match: <glob, re:regex or {type: ...}>'")
    if "rewrite" not in raw:
        raise err("the rule has no 'rewrite'",
                  f"add 'rewrite: <one of {', '.join(registry.pass_names())}, or null>'")
    selector = _parse_selector(raw["match"], err)
    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        raise err(f"'optional' must be true or false, not {optional!r}", "write 'optional: true'")
    name = raw["rewrite"]
    if name is None:
        if raw.get("with"):
            raise err("'with' given for 'rewrite: null'", "remove 'with' or name a pass")
        return Rule(i, line, raw["match"], None, {}, optional, selector)
    if not isinstance(name, str) or name not in registry.PASSES:
        raise err(f"unknown pass {name!r}",
                  f"use one of {', '.join(registry.pass_names())}, or null to keep the site dense")
    given = raw.get("with") or {}
    if not isinstance(given, Mapping):
        raise err("'with' must be a mapping of option names to values",
                  "write e.g. 'with: {rank: 128}'")
    options = validate_options(registry.get_pass(name), given, defaults, err)
    return Rule(i, line, raw["match"], name, options, optional, selector)


def _parse_selector(match, err) -> Selector:
    if isinstance(match, str):
        match = {"name": match}
    if not isinstance(match, Mapping) or not match:
        raise err(f"'match' must be a name pattern or a mapping, not {match!r}",
                  "write a glob ('model.layers.*.mlp'), 're:<regex>' or {type: Linear}")
    for key in match:
        if key not in SELECTOR_KEYS:
            raise err(f"unknown selector key {key!r} in 'match'", f"use {', '.join(SELECTOR_KEYS)}")
    kw: dict[str, Any] = {}
    name = match.get("name")
    if name is not None:
        if not isinstance(name, str) or not name:
            raise err(f"'name' must be a non-empty string, not {name!r}", "write a glob or 're:<regex>'")
        if name.startswith("re:"):
            try:
                kw["name"] = re.compile(name[3:])
            except re.error as e:
                raise err(f"invalid regular expression {name[3:]!r}: {e}", "correct the regex") from None
        else:
            kw["name"] = _glob_to_regex(name)
            if not _is_pattern(name):
                kw["exact"] = name
    t = match.get("type")
    if t is not None:
        types = [t] if isinstance(t, str) else t
        if not isinstance(types, list) or not types or not all(isinstance(x, str) and x for x in types):
            raise err(f"'type' must be a class name or a list of them, not {t!r}", "write e.g. 'type: Linear'")
        kw["types"] = tuple(types)
    if "every" in match:
        every = match["every"]
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise err(f"'every' must be a positive integer, not {every!r}", "write e.g. 'every: 4'")
        offset = match.get("offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < every:
            raise err(f"'offset' must be an integer in [0, every), not {offset!r}",
                      f"write an offset from 0 to {every - 1}")
        kw["every"], kw["offset"] = every, offset
    elif "offset" in match:
        raise err("'offset' without 'every'", "add 'every: k' or remove 'offset'")
    return Selector(**kw)


def _check_value(key, value, typ, choices, rng, err):
    if typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, typ)
    if not ok:
        if typ is float and isinstance(value, str) and "e" in value.lower() and _numeric(value):
            raise err(f"option {key!r} must be a number, got the string {value!r} (YAML reads "
                      f"an exponent without a decimal point, such as 3e-2, as text)",
                      f"write {key} as {float(value)!r} or with a decimal point (3.0e-2)")
        raise err(f"option {key!r} must be of type {typ.__name__}, got {value!r}",
                  f"give {key} {'an' if typ.__name__[0] in 'aeiou' else 'a'} {typ.__name__} value")
    if choices and value not in choices:
        raise err(f"option {key!r} must be one of {', '.join(map(str, choices))}, got {value!r}",
                  f"set {key} to one of {', '.join(map(str, choices))}")
    if rng:
        lo, hi = rng
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise err(f"option {key!r} = {value!r} is out of range {span}",
                      f"choose {key} in {span}")


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _field_type(f) -> type:
    """The plain type of an Options field (``Optional[int]`` -> int)."""
    t = f.type
    if isinstance(t, str):
        t = t.replace("Optional[", "").rstrip("]")
        return {"int": int, "float": float, "str": str, "bool": bool}.get(t, object)
    args = [a for a in getattr(t, "__args__", ()) if a is not type(None)]
    return args[0] if args else t


def validate_options(pass_, given: Mapping[str, Any], defaults: Mapping[str, Any], err) -> dict:
    """Check a rule's options against the pass's Options dataclass and budgets; returns the
    merged option values (defaults, then the rule's own), without the class defaults."""
    fields = {f.name: f for f in dataclasses.fields(pass_.Options)}
    allowed = list(fields) + list(pass_.budget_for)
    for key in given:
        if key not in allowed:
            raise err(f"unknown option {key!r} for pass {pass_.name!r}",
                      f"use options of {pass_.name}: {', '.join(allowed)}")
    merged = {k: v for k, v in defaults.items() if k in fields}
    merged.update(given)
    for key, value in merged.items():
        if key in pass_.budget_for:
            _check_value(key, value, float, None, (1e-9, 1.0), err)
            if key in given and pass_.budget_for[key] in given:
                raise err(f"both {pass_.budget_for[key]!r} and the budget {key!r} given",
                          f"give either {pass_.budget_for[key]} or {key}, not both")
            continue
        f = fields[key]
        _check_value(key, value, _field_type(f), f.metadata.get("choices"),
                     f.metadata.get("range"), err)
    return merged


# -- resolution --------------------------------------------------------------------

@dataclass(frozen=True)
class PlanEntry:
    """One site of a plan: which pass, which options, from which rule."""
    fqn: str
    pass_name: str
    options: Any                 # the pass's Options instance (budgets solved)
    rule: int
    module_type: str
    dims: Mapping[str, Any]
    done: bool = False           # already in the pass's output form: nothing to do


@dataclass
class Plan:
    """The resolved policy: site FQN -> pass and options, in module order."""
    entries: dict[str, PlanEntry]
    kept: list[str]              # sites a `rewrite: null` rule keeps dense
    policy: Policy

    def __iter__(self):
        return iter(self.entries.values())

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, fqn: str) -> PlanEntry:
        return self.entries[fqn]

    def __contains__(self, fqn: str) -> bool:
        return fqn in self.entries

    def to_rows(self) -> list[dict]:
        return [{"site": e.fqn, "type": e.module_type, "pass": e.pass_name, "rule": e.rule,
                 "options": _options_dict(e), "done": e.done}
                for e in self.entries.values()]

    def __str__(self) -> str:
        from structrewrite.rewriter.report import render_table
        rows = [[e.fqn, e.module_type, e.pass_name, str(e.rule),
                 ", ".join(f"{k}={v}" for k, v in _options_dict(e).items()),
                 "already rewritten" if e.done else ""] for e in self.entries.values()]
        return render_table(f"plan: {len(self.entries)} sites, {len(self.kept)} kept dense",
                            ["site", "type", "pass", "rule", "options", "note"], rows)


def _options_dict(entry: PlanEntry) -> dict:
    """The entry's options as a dict; none for a site already rewritten."""
    return dataclasses.asdict(entry.options) if entry.options is not None else {}


def _tied(named: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """FQN -> why, for each module holding a parameter that a module outside its own
    subtree holds too (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``)."""
    owners: dict[int, list[str]] = {}
    for fqn, module in named:
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(fqn)
    tied = {}
    for names in owners.values():
        for fqn in names:
            others = [o for o in names if o != fqn and not o.startswith(fqn + ".")
                      and not fqn.startswith(o + ".")]
            if others and fqn not in tied:
                tied[fqn] = (f"shares its weight with {others[0]} (tied weights): rewriting it "
                             f"would untie the two and add parameters; untie them first "
                             f"(give it a copy of the weight) to rewrite it")
    return tied


_SOURCES: dict[type, str] = {}


def _class_source(cls: type) -> str:
    """The source of ``cls`` and of its bases up to ``nn.Module`` (read once per class;
    empty where Python has none, as for classes made at run time)."""
    if cls not in _SOURCES:
        parts = []
        for c in cls.__mro__:
            if c in (nn.Module, object) or c.__module__.startswith("torch.nn.modules"):
                continue
            try:
                parts.append(inspect.getsource(c))
            except (OSError, TypeError):
                pass
        _SOURCES[cls] = "\n".join(parts)
    return _SOURCES[cls]


def _read_by_parent(fqn: str, modules: Mapping[str, nn.Module]) -> Optional[str]:
    """Why ``fqn`` is held, where its parent's code reads its ``weight`` itself
    (``self.wo.weight.dtype`` in HF's T5) besides calling it: a rewritten layer has no
    ``weight``, so the parent would fail. Read from the parent class's source."""
    parent_name, _, child = fqn.rpartition(".")
    parent = modules.get(parent_name)
    if parent is None or not re.search(rf"self\.{re.escape(child)}\.weight\b",
                                       _class_source(type(parent))):
        return None
    return (f"is read by its parent ({type(parent).__name__}'s code reads self.{child}.weight), "
            f"not only called: the rewritten layer has no weight, and the parent would fail")


def resolve(policy: Policy, modules: Union[nn.Module, Iterable[tuple[str, nn.Module]]]) -> Plan:
    """Resolve ``policy`` against a module tree (or (fqn, module) pairs in pre-order). A
    module whose weight another module holds too (tied weights), or whose parent reads its
    weight itself (``_read_by_parent``), is not rewritten: a rule that names it alone
    fails with the reason, a broader rule leaves it as it is with a warning."""
    named = list(modules.named_modules() if isinstance(modules, nn.Module) else modules)
    by_name = dict(named)
    held = _tied(named)   # FQN -> why; the parents' reads are added as sites come up
    left_held: list[tuple[Rule, str]] = []
    claimed: set[str] = set()
    entries: dict[str, PlanEntry] = {}
    kept: list[str] = []
    hits = [0] * len(policy.rules)
    refused: list[list[tuple]] = [[] for _ in policy.rules]   # (fqn, NoMatch): explained on error only
    exact = {r.selector.exact: r for r in reversed(policy.rules) if r.selector.exact is not None}

    claimed_by: dict[str, int] = {}      # claimed module -> the rule that claimed it
    shadowed: dict[str, str] = {}        # module inside a claimed subtree -> that subtree

    def claimer(fqn):
        parts = fqn.split(".")
        return next((p for p in (".".join(parts[:k]) for k in range(1, len(parts))) if p in claimed),
                    None)

    for fqn, module in named:
        if fqn == "":
            continue
        outer = claimer(fqn)
        if outer is not None:
            shadowed[fqn] = outer
            continue
        candidates = ([exact[fqn]] if fqn in exact and exact[fqn].selector.matches(fqn, module) else [])
        candidates += [r for r in policy.rules if r.selector.exact is None or r.selector.exact != fqn]
        for rule in candidates:
            if not rule.selector.matches(fqn, module):
                continue
            if rule.rewrite is None:
                kept.append(fqn)
            else:
                p = registry.get_pass(rule.rewrite)
                if p.already_done(module):
                    entries[fqn] = PlanEntry(fqn, p.name, None, rule.index, type(module).__name__,
                                             {}, done=True)
                else:
                    m = p.accepts(module)
                    if m and fqn not in held and (why := _read_by_parent(fqn, by_name)):
                        held[fqn] = why
                    if m and fqn in held:   # a site the pass would rewrite, but tied or read
                        m = NoMatch(lambda why=held[fqn]: why)
                        left_held.append((rule, fqn))
                    if not m:
                        refused[rule.index].append((fqn, m))
                        continue
                    dims = p.dims(m)
                    options = _instantiate(p, rule, fqn, dims, policy)
                    entries[fqn] = PlanEntry(fqn, p.name, options, rule.index,
                                             type(module).__name__, dims)
            hits[rule.index] += 1
            claimed.add(fqn)
            claimed_by[fqn] = rule.index
            break
    for rule, fqn in left_held:   # (a required rule that matches nothing else fails below)
        if (hits[rule.index] or rule.optional) and fqn not in claimed:
            warnings.warn(f"rule {rule.describe()}: {fqn} is left as it is: it {held[fqn]}",
                          UserWarning, stacklevel=3)
    for rule in policy.rules:
        if hits[rule.index] == 0 and not rule.optional:
            why = ""
            if refused[rule.index]:
                shown = "; ".join(f"{fqn} ({m.reason})" for fqn, m in refused[rule.index][:3])
                more = len(refused[rule.index]) - 3
                why = f": it selects modules that {rule.rewrite} cannot rewrite: {shown}" + \
                    (f" and {more} more" if more > 0 else "")
            fix = ("select modules that the pass can rewrite, or add 'optional: true'" if why else
                   "correct the pattern (see `structrewrite plan` for the model's module names) "
                   "or add 'optional: true'")
            name = rule.selector.exact
            if not why and name in claimed_by:
                why = f": rule {claimed_by[name]} names {name} first"
                fix = "keep one rule per module"
            elif not why and name in shadowed:
                why = (f": {name} lies inside {shadowed[name]}, which rule "
                       f"{claimed_by[shadowed[name]]} claims with its whole subtree")
                fix = f"narrow rule {claimed_by[shadowed[name]]} or drop this one"
            raise PolicyError(f"rule {rule.describe()} matches nothing{why}", source=policy.source,
                              rule=rule.index, line=rule.line, fix=fix)
    return Plan(entries, kept, policy)


def _instantiate(p, rule: Rule, fqn: str, dims, policy: Policy):
    values = dict(rule.options)
    for budget, target in p.budget_for.items():
        if budget in values:
            fraction = values.pop(budget)
            try:
                values[target] = p.solve_budget(dims, values, target, fraction)
            except ValueError as e:
                raise PolicyError(f"at {fqn}: {e}", source=policy.source, rule=rule.index, line=rule.line,
                                  fix=f"raise '{budget}' or lower the other size options") from None
    try:
        options = p.Options(**values)
        p.check(options, dims)
        return options
    except ValueError as e:
        raise PolicyError(f"at {fqn}: {e}", source=policy.source, rule=rule.index, line=rule.line,
                          fix="choose options that fit the site's dimensions") from None
