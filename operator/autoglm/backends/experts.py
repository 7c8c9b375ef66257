"""``experts``: the routed experts one expert server holds, every MoE layer of each.

Which experts: ``AUTOGLM_SERVER_EXPERTS`` (``0,5,9``; unset: all of the version's), read from
``expert_<i>/<V>/`` of the repository. One request carries one layer's rows for any of them:
``LAYER`` [1], ``EXPERTS`` [k] and ``COUNTS`` [k] (the rows of each, in order), ``HIDDEN``
[Σ counts, d]. A request without ``HIDDEN`` asks what the server holds: ``HELD`` and
``MODEL_VERSION`` (the router sends an expert's rows only to servers that report it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from autoglm.backends.counters import Counters
from autoglm.backends.expect import check_expectations, check_fits, memory_limit
from autoglm.backends.placement import placement
from autoglm.models.decoder import ExpertSlice
from autoglm.models.errors import CheckpointError
from autoglm.plan import (
    SERVER_EXPERTS_ENV,
    expert_folder,
    parse_server_experts,
)
from autoglm.repository import load_part_config, load_weights


def held_experts(num_experts: int, version: int, value: str | None) -> list[int]:
    """The experts a server was given, checked against the version (one-line errors)."""
    if value is None:
        return list(range(num_experts))
    try:
        held = parse_server_experts(value)
    except ValueError as e:
        raise CheckpointError(f"{SERVER_EXPERTS_ENV}={value!r}: {e}") from None
    beyond = [e for e in held if e >= num_experts]
    if beyond:
        raise CheckpointError(f"this server was assigned expert {beyond[0]} but version "
                              f"{version} has {num_experts} routed experts "
                              f"(0..{num_experts - 1})")
    return held


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self.version = int(args["model_version"])
        root = Path(args["model_repository"]).parent
        _, cfg = load_part_config(Path(args["model_repository"]) / args["model_version"])
        check_expectations(cfg, self.version)
        self.held = held_experts(cfg.num_experts, self.version,
                                 os.environ.get(SERVER_EXPERTS_ENV))
        self.device, dtype = placement(args)
        folders = {e: root / expert_folder(e) / str(self.version) for e in self.held}
        for e, folder in folders.items():
            if not (folder / "moe.json").is_file():
                raise CheckpointError(f"expert {e} of version {self.version} is missing from "
                                      f"the repository ({folder})")
        if self.device == "cpu":  # fp32 in host memory; on a GPU they live in GPU memory
            check_fits(len(self.held), cfg.slice_bytes(), memory_limit(os.environ))
        self.slices = {e: ExpertSlice(cfg, e, load_weights(folder, self.device, dtype))
                       for e, folder in folders.items()}
        self.dtype = (next(iter(next(iter(self.slices.values())).layers.values()))[0].dtype
                      if self.slices else torch.float32)
        torch.set_num_threads(int(os.environ.get("AUTOGLM_TORCH_THREADS", "1")))
        # The family must outlive its metrics, so both are kept.
        self.family = pb_utils.MetricFamily(
            name="autoglm_expert_served_tokens_total",
            description="Tokens this expert server computed, per expert",
            kind=pb_utils.MetricFamily.COUNTER)
        self.served = Counters({e: self.family.Metric(labels={"expert": str(e)})
                                for e in self.held})
        self.report = [pb_utils.Tensor("HELD", np.array(self.held, dtype=np.int32)),
                       pb_utils.Tensor("MODEL_VERSION",
                                       np.array([self.version], dtype=np.int64))]

    def execute(self, requests: list[Any]) -> list[Any]:
        out = []
        for r in requests:
            try:
                out.append(self._one(r))
            except ValueError as e:  # a malformed request; the server goes on
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return out

    def _one(self, r: Any) -> Any:
        hidden = pb_utils.get_input_tensor_by_name(r, "HIDDEN")
        if hidden is None:
            return pb_utils.InferenceResponse(output_tensors=self.report)
        layer = int(pb_utils.get_input_tensor_by_name(r, "LAYER").as_numpy().reshape(-1)[0])
        experts = pb_utils.get_input_tensor_by_name(r, "EXPERTS").as_numpy().reshape(-1)
        counts = pb_utils.get_input_tensor_by_name(r, "COUNTS").as_numpy().reshape(-1)
        h = hidden.as_numpy()
        if experts.shape != counts.shape or int(counts.sum()) != h.shape[0]:
            raise ValueError("EXPERTS and COUNTS must have one entry per expert and COUNTS "
                             f"must sum to HIDDEN's {h.shape[0]} rows")
        x = torch.from_numpy(h).to(self.device, self.dtype)
        y = torch.empty_like(x)
        start = 0
        with torch.no_grad():  # one matmul chain per expert asked for, not per token
            for e, n in zip(experts.tolist(), counts.tolist(), strict=True):
                s = self.slices.get(e)
                if s is None:
                    raise ValueError(f"expert {e} is not held here (held: {self.held})")
                if layer not in s.layers:
                    raise ValueError(f"layer {layer} is not an MoE layer")
                y[start:start + n] = s(layer, x[start:start + n])
                self.served.add(e, float(n))
                start += n
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("OUTPUT", y.to(torch.float32).cpu().numpy())])

    def finalize(self) -> None:
        self.served.close()
