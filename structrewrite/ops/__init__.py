"""torch.library custom ops in the ``structrewrite::`` namespace.

Each op module defines the schema, the eager reference implementation (the
specification), the fake implementation and the autograd formula. Importing this
package registers them all; the Triton (CUDA) implementations are registered by
``structrewrite.codegen.triton`` when Triton and a CUDA device are available.
"""
from structrewrite.ops import sparse_lowrank_linear  # noqa: F401

OPS = {
    "sparse_lowrank_linear": "structrewrite::sparse_lowrank_linear",
}
import structrewrite.codegen.triton  # noqa: E402,F401  (CUDA kernels; registers nothing without Triton or a GPU)
