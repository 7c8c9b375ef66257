"""``expert_<i>``: expert *i* of every MoE layer, batched across requests and layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from autoglm.moe import ExpertStack, MoEConfig


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        d = Path(args["model_repository"]) / args["model_version"]
        meta = json.loads((d / "moe.json").read_text())
        self.expert = int(meta["expert"])
        self.stack = ExpertStack(MoEConfig(**meta["config"]))
        self.stack.load_state_dict(torch.load(d / "weights.pt", weights_only=True))
        self.stack.eval()
        torch.set_num_threads(1)  # replicas scale out; one core each
        # The family must outlive its metrics, so both are kept.
        self.family = pb_utils.MetricFamily(
            name="autoglm_expert_served_tokens_total",
            description="Tokens this expert server computed",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.tokens = self.family.Metric(labels={"expert": str(self.expert)})

    def execute(self, requests: list[Any]) -> list[Any]:
        # The dynamic batcher hands over several requests: run each layer's tokens at once.
        layers, hidden = [], []
        for r in requests:
            layers.append(pb_utils.get_input_tensor_by_name(r, "LAYER").as_numpy()[:, 0])
            hidden.append(pb_utils.get_input_tensor_by_name(r, "HIDDEN").as_numpy())
        lay = np.concatenate(layers)
        x = torch.from_numpy(np.concatenate(hidden))
        out = torch.empty_like(x)
        with torch.no_grad():
            for layer in np.unique(lay).tolist():
                rows = torch.from_numpy(np.nonzero(lay == layer)[0])
                out[rows] = self.stack(int(layer), x[rows])
        self.tokens.increment(float(x.shape[0]))
        result, start = [], 0
        arr = out.numpy()
        for h in hidden:
            n = h.shape[0]
            result.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("OUTPUT", arr[start:start + n])]))
            start += n
        return result
