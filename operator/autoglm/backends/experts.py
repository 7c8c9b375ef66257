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
from autoglm.models.layers import grouped_swiglu
from autoglm.plan import (
    GROUPED_ENV,
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
        # On a GPU a call runs as three batched matmuls over the experts it asks for: each
        # layer's held weights stacked [held, ...], and the slices kept as views of them.
        # (On a CPU the padding costs more than the launches it saves; GROUPED_ENV=1 forces it.)
        self.position = {e: j for j, e in enumerate(self.held)}
        self.stacked: dict[int, tuple[torch.Tensor, ...]] = {}
        grouped = os.environ.get(GROUPED_ENV, "1" if self.device != "cpu" else "0") == "1"
        if grouped and self.slices:
            for layer in cfg.moe_layers:
                self.stacked[layer] = tuple(
                    torch.stack([self.slices[e].layers[layer][m] for e in self.held])
                    for m in range(3))
                for j, e in enumerate(self.held):
                    self.slices[e].layers[layer] = tuple(
                        w[j] for w in self.stacked[layer])
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
        asked, rows = experts.tolist(), counts.tolist()
        missing = [e for e in asked if e not in self.slices]
        if missing:
            raise ValueError(f"expert {missing[0]} is not held here (held: {self.held})")
        if asked and layer not in self.slices[asked[0]].layers:
            raise ValueError(f"layer {layer} is not an MoE layer")
        x = torch.from_numpy(h).to(self.device, self.dtype)
        with torch.no_grad():
            if self.stacked:
                y = self._grouped(layer, asked, rows, x)
            else:  # one matmul chain per expert asked for, not per token
                y = torch.empty_like(x)
                start = 0
                for e, n in zip(asked, rows, strict=True):
                    y[start:start + n] = self.slices[e](layer, x[start:start + n])
                    start += n
        for e, n in zip(asked, rows, strict=True):
            self.served.add(e, float(n))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("OUTPUT", y.to(torch.float32).cpu().numpy())])

    def _grouped(self, layer: int, asked: list[int], rows: list[int],
                 x: torch.Tensor) -> torch.Tensor:
        weights = self.stacked[layer]
        if asked != self.held:  # the asked experts' weights, in the request's order
            index = torch.tensor([self.position[e] for e in asked], device=x.device)
            weights = tuple(w.index_select(0, index) for w in weights)
        return grouped_swiglu(x, rows, *weights)

    def finalize(self) -> None:
        self.served.close()
