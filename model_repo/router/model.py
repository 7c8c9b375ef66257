# Triton Python-backend model "router": embedding, per-layer top-k gates, fan-out of each
# expert's tokens to the expert servers over gRPC, weighted combine, head.
# The implementation lives in the autoglm package (operator/autoglm/backends/router.py).
from autoglm.backends.router import TritonPythonModel

__all__ = ["TritonPythonModel"]
