"""``router``: everything but the routed experts (embeddings, attention, norms, gates, shared
experts, dense MLPs, head), with each MoE layer's fan-out to the expert servers over gRPC
(:mod:`autoglm.backends.fanout`). Every answer carries the model version that computed it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from autoglm.backends.expect import check_expectations
from autoglm.backends.fanout import ExpertFanout, ExpertUnavailable
from autoglm.backends.placement import placement
from autoglm.models.decoder import RouterTier, forward
from autoglm.repository import load_part_config, load_weights


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        d = Path(args["model_repository"]) / args["model_version"]
        self.version = int(args["model_version"])
        _, self.cfg = load_part_config(d)
        check_expectations(self.cfg, self.version)  # refuses a version the spec disagrees with
        self.device, dtype = placement(args)
        self.router = RouterTier(self.cfg, load_weights(d, self.device, dtype))
        with np.load(d / "canary.npz") as z:
            self.canary = (z["input_ids"], z["logits"].astype(np.float32))
        # Instances scale out as processes; intra-op threads would only oversubscribe.
        torch.set_num_threads(int(os.environ.get("AUTOGLM_TORCH_THREADS", "1")))
        self.fanout = ExpertFanout(self.cfg.num_experts, self.version)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for r in requests:
            given = pb_utils.get_input_tensor_by_name(r, "INPUT_IDS")
            canary = given is None  # the version's canary: its input, and what to expect
            ids = self.canary[0] if canary else given.as_numpy()
            try:
                limit = self.cfg.max_position_embeddings
                if ids.ndim != 2 or ids.shape[1] > limit:
                    raise ValueError(f"INPUT_IDS must be [batch, seq<={limit}]")
                if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
                    raise ValueError(f"INPUT_IDS must lie in [0, {self.cfg.vocab_size})")
                with torch.no_grad():
                    logits, tokens = forward(
                        self.router, torch.from_numpy(ids.astype(np.int64)).to(self.device),
                        self.fanout)
            except (ValueError, ExpertUnavailable) as err:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(err))))
                continue
            outputs = [
                pb_utils.Tensor("LOGITS", logits.to(torch.float32).cpu().numpy()),
                pb_utils.Tensor("MODEL_VERSION", np.array([self.version], dtype=np.int64))]
            if canary:  # not user load: left out of the autoscaling signal
                outputs.append(pb_utils.Tensor("CANARY_EXPECTED", self.canary[1]))
            else:
                self.fanout.count_routed(tokens)
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def finalize(self) -> None:
        self.fanout.close()
