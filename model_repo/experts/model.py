# Triton Python-backend model "experts": the routed experts one expert server holds (SwiGLU),
# one call per layer carrying the rows of every expert it asks for.
# The implementation lives in the autoglm package (operator/autoglm/backends/experts.py).
from autoglm.backends.experts import TritonPythonModel

__all__ = ["TritonPythonModel"]
