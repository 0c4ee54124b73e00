import os
import sys
from pathlib import Path

# examples/ and benchmarks/ are importable from the tests (they live beside the package).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# tests/ itself, for the shared helpers (hf_tiny.py)
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

FLOWS = ROOT / "tests" / "flows"


def _flows_only(args) -> bool:
    paths = [Path(a.split("::")[0]).resolve() for a in args if not a.startswith("-")]
    return bool(paths) and all(p == FLOWS or FLOWS in p.parents for p in paths)


def pytest_configure(config):
    """One way of running Triton kernels per process. Triton fixes at each kernel's
    definition whether it is compiled or runs under its CPU interpreter
    (``TRITON_INTERPRET``), so a process whose modules import the kernels before and
    after the variable changes holds both kinds, and an interpreted kernel that calls a
    compiled helper fails. The kernel tests (tests/codegen) need the interpreter (CPU
    tensors); the user flows on a GPU need the compiled kernels. A run of tests/flows
    alone keeps them compiled (and runs on CUDA where there is a device); every other run
    turns the interpreter on here, before any test module imports a kernel, and its
    flows run on the CPU implementation."""
    if not _flows_only(config.args):
        os.environ["TRITON_INTERPRET"] = "1"
        _scalar_loop_bounds()


def _scalar_loop_bounds():
    """Triton 3.6's interpreter (the oldest Triton the package supports) turns a loaded
    scalar into a Python int with ``int()`` of a one-element array, which NumPy 2.4 and
    later refuse, so every kernel whose loop bounds are loaded (``range(start, stop)``)
    fails there. Later interpreters squeeze the array first; so does this one after the
    patch. Nothing changes where the interpreter has no such hook."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "squeezes", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    patched.squeezes = True
    interpreter._patch_lang_tensor = patched
