"""Registry of ONNX translations: one entry per ``structrewrite::`` op.

A translation has two halves:

* ``translate``: called by ``torch.onnx.export`` (through its custom translation table)
  for each call of the op; it emits exactly one node ``com.structrewrite::<op_type>``.
* ``function``: an onnxscript function in domain ``com.structrewrite`` named ``op_type``
  whose body, in standard ONNX operators, is the op's reference semantics. It is attached
  to the saved model as a FunctionProto after export (the exporter would otherwise inline
  it and the op would vanish into standard operators).

A new op adds one line to ``_MODULES``: the module that defines its ``TRANSLATION``.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

DOMAIN = "com.structrewrite"
DOMAIN_VERSION = 1

# op name -> module defining TRANSLATION
_MODULES = {
    "structrewrite::sparse_lowrank_linear": "structrewrite.codegen.onnx.sparse_lowrank",
}


@dataclasses.dataclass(frozen=True)
class Translation:
    op: str                      # "namespace::name" of the torch op
    op_type: str                 # op_type of the node in DOMAIN
    translate: Callable[..., Any]
    function: Any                # onnxscript.OnnxFunction with the reference body


def translations() -> dict[str, Translation]:
    """All registered translations, keyed by op name (``structrewrite::...``)."""
    out = {}
    for name, module in _MODULES.items():
        t = importlib.import_module(module).TRANSLATION
        assert t.op == name, (name, t.op)
        out[name] = t
    return out
