"""The ``torch.compile`` backend ``"structrewrite"``.

    torch.compile(model, backend="structrewrite")                                # 1
    torch.compile(model, backend="structrewrite", options={"policy": policy})    # 2

The backend is found through the ``torch_dynamo_backends`` entry point declared in
``pyproject.toml``, so the name works in a fresh interpreter without importing the package.
This module must not call ``register_backend`` itself (the lazy entry-point load would then
see the name twice). Run from a source tree that is not installed, where no entry point
declares the name, importing the package registers it (``structrewrite/__init__.py``).

1. Without a policy, the captured graph goes to Inductor as is: the ``structrewrite::``
   ops of an already rewritten model stay opaque custom ops (reference implementation on
   CPU, Triton kernels on CUDA where registered) and Inductor fuses the code around them.
   Training works through AOTAutograd: the ops have autograd formulas.

2. With a policy, the backend rewrites the captured graph before Inductor sees it:

   * sites: each ``F.linear`` call (``nn.Linear``) and ``torch.addmm`` call (HF ``Conv1D``)
     whose weight is a graph input or attribute, named by the FQN of the innermost module in
     the node's ``nn_module_stack`` (``L['self'].model.layers[0].mlp.gate_proj`` ->
     ``model.layers.0.mlp.gate_proj``; the same from a module held in a global,
     ``G['net']``, or compiled as a bound ``forward``; where a graph calls modules from
     several variables, the variable's name comes first: ``enc.0``, ``dec.0``, but not for
     the compiled module's own sites);
   * a stand-in module tree with modules of the original classes at those FQNs, holding the
     real weights (the example inputs dynamo passes are the live parameters), under empty
     parents of their original classes too (so that ``{type: LlamaMLP}`` selects the same
     blocks as in the model), is rewritten by ``sr.rewrite`` under the policy made relaxed
     (one graph sees only part of a model, and graph breaks split it further, so a rule
     that matches nothing here is no error). A module that uses a site's weight too
     (GPT-2's ``wte`` and ``lm_head``) holds the same weight in the tree, so tied sites are
     left as ``sr.rewrite`` leaves them, with its warning;
   * every rewritten site's new module is installed into the GraphModule and its calls are
     redirected to it. Its parameters are frozen (``requires_grad=False``): the graph is an
     inference graph with weights computed at compile time. Later changes to the eager
     model's weights are not seen by the compiled function. A recompile (new input
     shapes) reuses the modules computed for the same weights, policy and site.

   Only module-level passes whose sites are linear layers apply here; block-level rewrites
   (attention, FFN blocks) need ``sr.rewrite`` on the eager model. A graph that needs
   gradients (grad mode on and an input that requires grad) is refused with an error that
   points to ``sr.rewrite``; call the compiled model under ``torch.no_grad()`` or
   ``torch.inference_mode()``.

Options (``torch.compile(..., options={...})``): ``policy`` (path, dict or ``sr.Policy``);
``compiler``: ``"inductor"`` (default) or ``"eager"`` (run the rewritten graph without
Inductor: quick, for checking a policy); every other key is an Inductor config patch.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from structrewrite.codegen.triton.support_cache import version   # plain torch, no Triton
from structrewrite.rewriter.capture import innermost_module

log = logging.getLogger(__name__)

_LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
_ADDMM_TARGETS = (torch.addmm, torch.ops.aten.addmm.default)


class BackendError(RuntimeError):
    """The structrewrite backend cannot compile this graph as asked."""


# -- sites --------------------------------------------------------------------------

# the variable a module path starts from: a local (``L['self']``, ``L['args'][0]``), a
# global (``G['net']``), or the module of a bound method compiled as such
# (``L['fn'].__self__``)
_ROOT = re.compile(r"^[LG]\[['\"]?([^\]'\"]*)['\"]?\](\[\d+\])*(\.__self__)?")


# roots that are the compiled module itself (its ``forward``'s self; the module compiled
# directly; a bound ``forward``): their sites keep the module's own names
_SELF_ROOTS = ("L['self']", "L['fn']", "L['fn'].__self__")


def root_of(source: str) -> str:
    """The variable part of a module path (``G['net']`` of ``G['net'][0]``), or ''."""
    m = _ROOT.match(source)
    return m.group(0) if m else ""


def fqn_from_source(source: str, named_roots: bool = False) -> str:
    """Dynamo's module path (``L['self'].model.layers[0].mlp``, also with ``._modules['x']``
    or ``getattr(..)`` forms, from a global ``G['net']`` or a bound method's
    ``L['fn'].__self__``) -> the module's FQN in the compiled root (``model.layers.0.mlp``).
    ``named_roots``: keep the variable's name as the first part (``net.0``), for a graph
    that calls modules from more than one variable, whose names would otherwise clash
    (not for the compiled module itself, ``_SELF_ROOTS``, whose sites keep its names)."""
    m = _ROOT.match(source)
    s = source[m.end():] if m else source
    if named_roots and m and m.group(0) not in _SELF_ROOTS:
        s = f"{m.group(1)}{m.group(2) or ''}.{s.lstrip('.')}"
    s = re.sub(r"(^|\.)_modules\[['\"]([^'\"]+)['\"]\]", r".\2", s)
    s = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", s)
    s = re.sub(r"\[(\d+)\]", r".\1", s)
    return s.strip(".")


def _stack(node: torch.fx.Node) -> list:
    return list((node.meta.get("nn_module_stack") or {}).values())


def _named_roots(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` calls modules held in more than one variable, whose site names then
    keep the variable's name apart (``fqn_from_source``'s ``named_roots``)."""
    return len({root_of(stack[0][0]) for node in gm.graph.nodes if (stack := _stack(node))}) > 1


def _innermost_module(node: torch.fx.Node, named_roots: bool = False) -> Optional[tuple[str, type]]:
    where = innermost_module(node)
    return (fqn_from_source(where[0], named_roots), where[1]) if where else None


def _module_classes(node: torch.fx.Node, named_roots: bool = False) -> dict[str, type]:
    """FQN -> class of every module on the node's ``nn_module_stack``: its parents, and the
    compiled root ('') where Dynamo records it (a module called from a function or
    compiled itself; not the ``self`` of a compiled ``forward``)."""
    return {fqn_from_source(path, named_roots): cls for path, cls in _stack(node)
            if isinstance(cls, type) and issubclass(cls, nn.Module)}


@dataclass
class LinearSite:
    """One linear layer seen in the graph: its FQN, class, weight / bias and the calls."""
    fqn: str
    cls: type
    weight: torch.Tensor          # as the module stores it (out x in; in x out for Conv1D)
    bias: Optional[torch.Tensor]
    transposed: bool               # Conv1D: y = x W + b
    calls: list = field(default_factory=list)   # the F.linear / addmm nodes
    classes: dict = field(default_factory=dict)   # FQN -> class of the site and its parents
    # the other modules that use the weight (tied weights: GPT-2's lm_head and wte):
    # FQN -> (class, FQN -> class of its parents)
    shared_with: dict = field(default_factory=dict)


def _tensor_of(gm: torch.fx.GraphModule, node: Any, inputs: dict) -> Optional[torch.Tensor]:
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "placeholder":
        return inputs.get(node)
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def _input_of(node: torch.fx.Node):
    """The input of a linear call: read when the call is replaced, not before, since the
    replacement of an earlier site (its output is this input) replaces the node."""
    if node.target in _ADDMM_TARGETS:
        return node.args[1]
    return node.kwargs.get("input", node.args[0] if node.args else None)


def find_linear_sites(gm: torch.fx.GraphModule, example_inputs) -> dict[str, LinearSite]:
    """Linear layers called in ``gm`` whose weights are graph inputs or attributes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, example_inputs))
    named = _named_roots(gm)
    sites: dict[str, LinearSite] = {}
    weight_nodes: dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        where = _innermost_module(node, named)
        if where is None:
            continue
        fqn, cls = where
        if node.target in _LINEAR_TARGETS:
            args = list(node.args) + [None] * (3 - len(node.args))
            w_node = node.kwargs.get("weight", args[1])
            b_node = node.kwargs.get("bias", args[2])
            transposed = False
        elif node.target in _ADDMM_TARGETS and len(node.args) == 3 and not node.kwargs:
            b_node, _, w_node = node.args
            transposed = True
        else:
            continue
        weight = _tensor_of(gm, w_node, inputs)
        bias = _tensor_of(gm, b_node, inputs) if b_node is not None else None
        if (weight is None or weight.dim() != 2 or (b_node is not None and bias is None)
                or _input_of(node) is None):
            continue
        site = sites.get(fqn)
        if site is None:
            site = sites[fqn] = LinearSite(fqn, cls, weight, bias, transposed,
                                           classes=_module_classes(node, named))
            weight_nodes[fqn] = w_node
        elif site.weight is not weight:
            continue   # another call under the same module with other weights: not this layer
        site.calls.append(node)
    for fqn, site in sites.items():
        calls = set(site.calls)
        for user in weight_nodes[fqn].users:
            where = _innermost_module(user, named) if user not in calls else None
            if where is not None and where[0] != fqn:
                site.shared_with.setdefault(where[0], (where[1], _module_classes(user, named)))
    return sites


# -- rewriting through a stand-in module tree -----------------------------------------

def _stand_in(site: LinearSite, params: dict) -> nn.Module:
    """A module of the site's class holding the real weight and bias, without running the
    class's __init__ (which would allocate and initialise a fresh weight). ``params``: one
    Parameter per tensor (by id) for all stand-ins, so that the policy sees tied weights."""
    def param(t):
        if id(t) not in params:
            params[id(t)] = nn.Parameter(t.detach(), requires_grad=False)
        return params[id(t)]
    mod = site.cls.__new__(site.cls)
    nn.Module.__init__(mod)
    mod.weight = param(site.weight)
    mod.bias = param(site.bias) if site.bias is not None else None
    if site.transposed:
        mod.nf = site.weight.shape[1]
    else:
        mod.in_features, mod.out_features = site.weight.shape[1], site.weight.shape[0]
    mod.eval()
    return mod


def _bare(cls: type) -> nn.Module:
    """An empty module of class ``cls`` (its __init__ not run), so that the policy's type
    selectors see a parent block as the class it is (``{type: LlamaMLP}``); a plain
    nn.Module where the class cannot be made so."""
    try:
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        return mod
    except Exception:   # noqa: BLE001 (a class with its own __new__)
        return nn.Module()


def _install(root: nn.Module, fqn: str, module: nn.Module, classes: dict) -> None:
    """Puts ``module`` at ``fqn`` under ``root``, making the parents it needs, each of its
    class in the compiled model (``classes``: FQN -> class)."""
    *parents, name = fqn.split(".")
    node = root
    for k, part in enumerate(parents):
        if not hasattr(node, part):
            node.add_module(part, _bare(classes.get(".".join(parents[:k + 1]), nn.Module)))
        node = getattr(node, part)
    node.add_module(name, module)


def _linear_only(policy):
    """``policy`` relaxed (every rule optional: one graph sees part of a model), with the
    rules whose pass the backend cannot apply (``unsupported_rules``) keeping their
    modules as they are, which is what the backend does with them, instead of asking a
    stand-in parent to be rewritten."""
    skip = {r.index for r in unsupported_rules(policy)}
    relaxed = policy.relaxed()
    return replace(relaxed, rules=tuple(replace(r, rewrite=None) if r.index in skip else r
                                        for r in relaxed.rules))


# Rewritten modules by weight tensor, so that a recompile of the same model (a new input
# shape, a guard failure) reuses them instead of recomputing the SVDs. Keyed weakly by the
# parameter object; the entry also records the policy, the site, and the weight's and
# bias's storage, dtype, device and version, so that an in-place update, ``Module.to``
# or another policy rewrites again. Inference tensors keep no version: sites whose
# weight or bias is one are rewritten at every compile. Writes through ``.data`` move no
# version either; ``forget_rewrites()`` drops what is kept.
_REWRITTEN = WeakIdKeyDictionary()


def _tensor_key(t: Optional[torch.Tensor]) -> Optional[tuple]:
    if t is None:
        return None
    return (t.data_ptr(), t.dtype, t.device, version(t))


def _cache_key(fingerprint: str, site: LinearSite) -> tuple:
    return (fingerprint, site.fqn, _tensor_key(site.weight), _tensor_key(site.bias))


def _cacheable(site: LinearSite) -> bool:
    return not any(t is not None and t.is_inference() for t in (site.weight, site.bias))


def forget_rewrites() -> None:
    """Drops the modules kept for recompiles: the next compile rewrites every site from the
    weights as they are then (needed after writes the version counter does not see, such
    as ``p.data.copy_(...)``)."""
    _REWRITTEN.clear()


_LINEAR_TYPE_NAMES = ("torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D")
_WARNED_RULES: set = set()   # (policy fingerprint, rule index) already reported


def unsupported_rules(policy) -> list:
    """Rules whose pass does not rewrite linear layers: the backend cannot apply them."""
    from structrewrite.rewriter import registry

    out = []
    for rule in policy.rules:
        if rule.rewrite is None:
            continue
        types = getattr(registry.get_pass(rule.rewrite).pattern, "types", ())
        if not any(t in _LINEAR_TYPE_NAMES for t in types):
            out.append(rule)
    return out


def _warn_unsupported(policy, fingerprint: str) -> None:
    rules = [r for r in unsupported_rules(policy) if (fingerprint, r.index) not in _WARNED_RULES]
    if not rules:
        return
    _WARNED_RULES.update((fingerprint, r.index) for r in rules)
    shown = "; ".join(f"rule {r.index} ({r.describe()})" for r in rules)
    warnings.warn(
        f"structrewrite backend: {shown} rewrite(s) blocks, which the compile backend does not "
        "apply (it rewrites linear layers of the captured graph only); those sites stay as "
        "they are. Rewrite the model eagerly with sr.rewrite(model, policy) and compile the "
        "result to get them.", UserWarning, stacklevel=3)


def _warn_unseen(gm: torch.fx.GraphModule, sites: dict, policy, fingerprint: str) -> None:
    """Names the linear layers (``nn.Linear`` and ``Conv1D`` classes) that ran in the graph
    and that a rule selects, but whose forward made no linear call to replace (Falcon's
    ``FalconLinear`` computes ``x @ W.T + b``): ``sr.rewrite`` rewrites them, the backend
    cannot."""
    from structrewrite.rewriter.passbase import type_names
    named = _named_roots(gm)
    ran: dict[str, type] = {}
    for node in gm.graph.nodes:
        ran.update(_module_classes(node, named))
    skipped = {r.index for r in unsupported_rules(policy)}   # block-level: warned of apart
    rules = [r for r in policy.rules if r.rewrite is not None and r.index not in skipped]
    unseen = []
    for fqn, cls in ran.items():
        if not fqn or fqn in sites or not isinstance(cls, type):
            continue
        bare = _bare(cls)
        if not type_names(bare).intersection(_LINEAR_TYPE_NAMES):
            continue
        if any(r.selector.matches(fqn, bare) for r in rules):
            unseen.append(f"{fqn} ({cls.__name__})")
    key = (fingerprint, tuple(unseen))
    if not unseen or key in _WARNED_RULES:
        return
    _WARNED_RULES.add(key)
    warnings.warn(
        f"structrewrite backend: {len(unseen)} linear layer(s) that the policy selects made no "
        f"linear call in the captured graph ({', '.join(unseen[:3])}"
        f"{', ...' if len(unseen) > 3 else ''}: their forward computes the product itself), so "
        "they stay as they are. Rewrite the model eagerly with sr.rewrite(model, policy) and "
        "compile the result to get them.", UserWarning, stacklevel=3)


def rewrite_graph(gm: torch.fx.GraphModule, example_inputs, policy) -> dict[str, nn.Module]:
    """Apply ``policy`` to the linear sites of ``gm`` in place; returns FQN -> new module."""
    from structrewrite.rewriter.api import rewrite
    from structrewrite.rewriter.policy import Policy

    sites = find_linear_sites(gm, example_inputs)
    pol = Policy.coerce(policy)
    fingerprint = json.dumps(pol.to_dict(), sort_keys=True, default=str)
    _warn_unseen(gm, sites, pol, fingerprint)
    if not sites:
        return {}
    _warn_unsupported(pol, fingerprint)
    new = {}
    root_cls = next((s.classes[""] for s in sites.values() if "" in s.classes), None)
    root = _bare(root_cls) if root_cls is not None else nn.Module()
    stand_ins, params = {}, {}
    for fqn, site in sites.items():
        if not fqn:
            continue
        hit = _REWRITTEN.get(site.weight, {}).get(_cache_key(fingerprint, site)) \
            if _cacheable(site) else None
        if hit is not None:
            new[fqn] = hit
            continue
        stand_ins[fqn] = _stand_in(site, params)
        _install(root, fqn, stand_ins[fqn], site.classes)
    modules = dict(root.named_modules())
    for fqn, site in sites.items():   # the modules that share a site's weight, holding it
        for other, (cls, classes) in site.shared_with.items():
            if fqn in stand_ins and other and other not in modules:
                holder = _bare(cls)
                holder.weight = params[id(site.weight)]
                _install(root, other, holder, classes)
                modules = dict(root.named_modules())
    if stand_ins:
        with torch.no_grad():
            rewrite(root, _linear_only(pol), inplace=True)
        modules = dict(root.named_modules())
        for fqn, old in stand_ins.items():
            if modules.get(fqn) is not old:
                new[fqn] = modules[fqn]
                if _cacheable(sites[fqn]):
                    _REWRITTEN.setdefault(sites[fqn].weight, {})[
                        _cache_key(fingerprint, sites[fqn])] = modules[fqn]
    for fqn, module in new.items():
        module.requires_grad_(False)
        module.eval()
        name = "structrewrite__" + fqn.replace(".", "__")
        gm.add_submodule(name, module)
        for node in sites[fqn].calls:
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(name, (_input_of(node),))
            call.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            call.meta["from_pass"] = "structrewrite_backend"
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return new


# -- the backend ----------------------------------------------------------------------

def _needs_grad(example_inputs) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


_ANNOUNCED = []   # the inference-mode notice is given once per process


def _announce_frozen(sites) -> None:
    if _ANNOUNCED:
        log.info("structrewrite backend: frozen rewrite of %d site(s)", len(sites))
        return
    _ANNOUNCED.append(True)
    warnings.warn(
        "structrewrite backend: policy applied at compile time to "
        f"{len(sites)} site(s) ({', '.join(sorted(sites)[:3])}{', ...' if len(sites) > 3 else ''}); "
        "this is an inference mode: the new weights are computed once from the current "
        "parameters and frozen as constants. For training the rewritten model, use "
        "sr.rewrite(model, policy).", UserWarning, stacklevel=2)


def _without_param_sources(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` without dynamo's parameter-to-source table: the frozen modules
    installed by the rewrite own parameters that no user-code source names, so AOTAutograd
    must lift them as it lifts the parameters of an exported graph."""
    out = torch.fx.GraphModule(gm, gm.graph)
    out.meta.update(gm.meta)
    return out


def structrewrite_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None,
                          mode: Optional[str] = None, **kwargs):
    """``torch.compile`` backend; see the module docstring. Reached by name through the
    ``torch_dynamo_backends`` entry point, so it is never registered here."""
    options = {**(options or {}), **kwargs}
    policy = options.pop("policy", None)
    compiler = options.pop("compiler", "inductor")
    if compiler not in ("inductor", "eager"):
        raise BackendError(f"option 'compiler' must be 'inductor' or 'eager', not {compiler!r}")
    if options:   # what is left goes to Inductor as config patches
        from torch._inductor import config as inductor_config
        unknown = sorted(set(options) - set(inductor_config.get_config_copy()))
        if unknown:
            raise BackendError(
                f"unknown option(s) {unknown}: the backend's own options are 'policy' and "
                "'compiler'; any other option must be an Inductor config key")

    if policy is not None:
        if _needs_grad(example_inputs):
            raise BackendError(
                "torch.compile(backend='structrewrite', options={'policy': ...}) rewrites the "
                "graph with weights frozen at compile time, so it compiles inference graphs only; "
                "this graph needs gradients (grad mode is on and an input requires grad). To "
                "train the rewritten model, rewrite it eagerly and compile the result: "
                "model = sr.rewrite(model, policy).model; torch.compile(model, "
                "backend='structrewrite'). For inference, call the compiled model under "
                "torch.no_grad() or torch.inference_mode().")
        new = rewrite_graph(gm, example_inputs, policy)
        if new:
            _announce_frozen(new)
            gm = _without_param_sources(gm)
        log.info("structrewrite backend: rewrote %d site(s): %s", len(new), sorted(new))

    if compiler == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = dict(options)
    if mode and mode != "default":
        from torch._inductor import list_mode_options
        patches = {**list_mode_options(mode), **patches}
    return compile_fx(gm, example_inputs, config_patches=patches or None)
