# Triton Python-backend model "expert_<i>": expert i of every MoE layer (SwiGLU), with
# dynamic batching across requests and layers.
# The implementation lives in the autoglm package (operator/autoglm/backends/expert.py).
from autoglm.backends.expert import TritonPythonModel

__all__ = ["TritonPythonModel"]
