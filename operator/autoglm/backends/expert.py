"""``expert_<i>``: routed expert *i* of every MoE layer, batched across requests and layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from autoglm.backends.expect import check_expectations
from autoglm.backends.placement import placement
from autoglm.models.decoder import ExpertSlice
from autoglm.repository import load_part_config, load_weights


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        d = Path(args["model_repository"]) / args["model_version"]
        meta, cfg = load_part_config(d)
        check_expectations(cfg, int(args["model_version"]))
        self.expert = int(meta["expert"])
        self.device, dtype = placement(args)
        self.slice = ExpertSlice(cfg, self.expert, load_weights(d, self.device, dtype))
        self.dtype = next(iter(self.slice.layers.values()))[0].dtype
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
        x = torch.from_numpy(np.concatenate(hidden)).to(self.device, self.dtype)
        out = torch.empty_like(x)
        with torch.no_grad():
            for layer in np.unique(lay).tolist():
                rows = torch.from_numpy(np.nonzero(lay == layer)[0]).to(self.device)
                out[rows] = self.slice(int(layer), x[rows])
        self.tokens.increment(float(x.shape[0]))
        result, start = [], 0
        arr = out.to(torch.float32).cpu().numpy()
        for h in hidden:
            n = h.shape[0]
            result.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("OUTPUT", arr[start:start + n])]))
            start += n
        return result
