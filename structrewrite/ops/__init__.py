"""torch.library custom ops in the ``structrewrite::`` namespace.

Each op module defines the schema, the eager reference implementation (the
specification, also callable as ``reference``), the fake implementation and the autograd
formula. Importing this package registers them all, and the device implementations:
``structrewrite.codegen.cpu`` (PyTorch's sparse kernels) and ``structrewrite.codegen.triton``
(CUDA, when Triton and a CUDA device are available).
"""
from structrewrite.ops import sparse_lowrank_linear  # noqa: F401

OPS = {
    "sparse_lowrank_linear": "structrewrite::sparse_lowrank_linear",
}
import structrewrite.codegen.cpu  # noqa: E402,F401  (CPU implementations on PyTorch's sparse kernels)
import structrewrite.codegen.triton  # noqa: E402,F401  (CUDA kernels; registers nothing without Triton or a GPU)
