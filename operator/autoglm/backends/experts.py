"""``experts``: the routed experts one expert server holds, every MoE layer of each.

Which experts: ``AUTOGLM_SERVER_EXPERTS`` (``0,5,9``; unset: all of the version's), read from
``expert_<i>/<V>/`` of the repository. One request carries one layer's rows for any of them:
``LAYER`` [1], ``EXPERTS`` [k] and ``COUNTS`` [k] (the rows of each, in order), ``HIDDEN``
[Σ counts, d]. A request without ``HIDDEN`` asks what the server holds: ``HELD`` and
``MODEL_VERSION`` (the router sends an expert's rows only to servers that report it).

Experts move while the server serves (no restart, no Triton reload, which would hold both
copies): ``CONTROL`` ``{"load": [...], "drop": [...]}`` loads experts from the repository in
the background and reports them once loaded; a dropped expert is reported no more at once,
but served for ``AUTOGLM_DRAIN_SECONDS`` (6: three router probe periods) while routers still
send it rows, then freed.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
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
        self.root = Path(args["model_repository"]).parent
        _, self.cfg = load_part_config(Path(args["model_repository"]) / args["model_version"])
        check_expectations(self.cfg, self.version)
        held = held_experts(self.cfg.num_experts, self.version,
                            os.environ.get(SERVER_EXPERTS_ENV))
        self.device, self.load_dtype = placement(args)
        folders = [self._folder(e) for e in held]
        self._check_fits(len(held))
        self.slices = {e: self._load(e, f) for e, f in zip(held, folders, strict=True)}
        # On a GPU a call runs as three batched matmuls over the experts it asks for: each
        # layer's held weights stacked [held, ...], and the slices kept as views of them.
        # (On a CPU the padding costs more than the launches it saves; GROUPED_ENV=1 forces it.)
        self.grouped = os.environ.get(GROUPED_ENV, "1" if self.device != "cpu" else "0") == "1"
        self.stacked: dict[int, tuple[torch.Tensor, ...]] = {}
        self.position: dict[int, int] = {}
        self.dtype = (next(iter(next(iter(self.slices.values())).layers.values()))[0].dtype
                      if self.slices else torch.float32)
        torch.set_num_threads(int(os.environ.get("AUTOGLM_TORCH_THREADS", "1")))
        # The family must outlive its metrics, so both are kept.
        self.family = pb_utils.MetricFamily(
            name="autoglm_expert_served_tokens_total",
            description="Tokens this expert server computed, per expert",
            kind=pb_utils.MetricFamily.COUNTER)
        self.served = Counters({})
        # Live moves (CONTROL): slices loading in the background, installed by execute();
        # dropped ones still served until their deadline (routers stop asking at their next
        # probe), then freed.
        self.loading: set[int] = set()
        self.loaded: queue.SimpleQueue[tuple[int, ExpertSlice | Exception]] = \
            queue.SimpleQueue()
        self.draining: dict[int, float] = {}
        self.drain_seconds = float(os.environ.get("AUTOGLM_DRAIN_SECONDS", "6"))
        self._held(sorted(held))

    def _folder(self, e: int) -> Path:
        folder = self.root / expert_folder(e) / str(self.version)
        if not (folder / "moe.json").is_file():
            raise CheckpointError(f"expert {e} of version {self.version} is missing from "
                                  f"the repository ({folder})")
        return folder

    def _check_fits(self, experts: int) -> None:
        if self.device == "cpu":  # fp32 in host memory; on a GPU they live in GPU memory
            check_fits(experts, self.cfg.slice_bytes(), memory_limit(os.environ))

    def _load(self, e: int, folder: Path) -> ExpertSlice:
        return ExpertSlice(self.cfg, e, load_weights(folder, self.device, self.load_dtype))

    def _held(self, held: list[int]) -> None:
        """What the server reports (and, grouped, the stacked layout of what it serves)."""
        self.held = held
        for e in held:
            if e not in self.served.metrics:
                self.served.metrics[e] = self.family.Metric(labels={"expert": str(e)})
        self.report = [pb_utils.Tensor("HELD", np.array(held, dtype=np.int32)),
                       pb_utils.Tensor("MODEL_VERSION",
                                       np.array([self.version], dtype=np.int64))]
        if self.grouped and self.slices:
            serving = sorted(self.slices)
            self.position = {e: j for j, e in enumerate(serving)}
            self.stacked = {layer: tuple(torch.stack([self.slices[e].layers[layer][m]
                                                      for e in serving]) for m in range(3))
                            for layer in self.cfg.moe_layers}
            for j, e in enumerate(serving):
                for layer, weights in self.stacked.items():
                    self.slices[e].layers[layer] = tuple(w[j] for w in weights)

    def execute(self, requests: list[Any]) -> list[Any]:
        self._settle()
        out = []
        for r in requests:
            try:
                out.append(self._one(r))
            except ValueError as e:  # a malformed request; the server goes on
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return out

    # -- live moves ----------------------------------------------------------------------

    def _control(self, raw: Any) -> Any:
        """``CONTROL`` {"load": [...], "drop": [...]}: load experts in the background (held,
        and reported, once loaded) and drop others (no longer reported at once; served until
        routers stop asking, then freed). Answers what the server reports now."""
        try:
            order = json.loads(raw.as_numpy().reshape(-1)[0])
            load = sorted({int(e) for e in order.get("load", [])})
            drop = sorted({int(e) for e in order.get("drop", [])})
        except (ValueError, TypeError, AttributeError, IndexError):
            raise ValueError('CONTROL must be JSON {"load": [experts], "drop": [experts]}') \
                from None
        new = [e for e in load if e not in self.held and e not in self.loading]
        try:
            held_experts(self.cfg.num_experts, self.version, ",".join(map(str, new)) or None)
            folders = {e: self._folder(e) for e in new}
            self._check_fits(len(set(self.slices) | self.loading) + len(new))
        except CheckpointError as err:
            raise ValueError(str(err)) from None
        for e in new:
            self.draining.pop(e, None)
            if e in self.slices:  # still draining: serve it again
                self.held = sorted({*self.held, e})
                continue
            self.loading.add(e)
            threading.Thread(target=self._load_in_background, args=(e, folders[e]),
                             name=f"load-expert-{e}", daemon=True).start()
        gone = [e for e in drop if e in self.held]
        for e in gone:
            self.draining[e] = time.monotonic() + self.drain_seconds
        self._held([e for e in self.held if e not in gone])
        return pb_utils.InferenceResponse(output_tensors=self.report)

    def _load_in_background(self, e: int, folder: Path) -> None:
        try:
            self.loaded.put((e, self._load(e, folder)))
        except Exception as err:  # reported in the log; the expert is simply not held
            self.loaded.put((e, err))

    def _settle(self) -> None:
        """Install what finished loading; free what has drained (on the model's thread)."""
        changed = False
        while not self.loaded.empty():
            e, result = self.loaded.get()
            self.loading.discard(e)
            if isinstance(result, Exception):
                pb_utils.Logger.log_error(f"expert {e} did not load: {result}")
                continue
            self.slices[e] = result
            self.held = sorted({*self.held, e})
            changed = True
        now = time.monotonic()
        for e in [e for e, until in self.draining.items() if until <= now]:
            del self.draining[e]
            self.slices.pop(e, None)
            changed = True
        if changed:
            self._held(self.held)

    def _one(self, r: Any) -> Any:
        control = pb_utils.get_input_tensor_by_name(r, "CONTROL")
        if control is not None:
            return self._control(control)
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
        if asked != list(self.position):  # the asked experts' weights, in the request's order
            index = torch.tensor([self.position[e] for e in asked], device=x.device)
            weights = tuple(w.index_select(0, index) for w in weights)
        return grouped_swiglu(x, rows, *weights)

    def finalize(self) -> None:
        self.served.close()
