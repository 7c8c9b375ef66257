# Triton Python-backend model "generate" (decoupled): text generation in the router tier,
# streaming tokens as they are made; beside "router" in every router server.
# The implementation lives in the autoglm package (operator/autoglm/backends/generate.py).
from autoglm.backends.generate import TritonPythonModel

__all__ = ["TritonPythonModel"]
