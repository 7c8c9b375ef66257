"""``router``: everything but the routed experts (embeddings, attention, norms, gates, shared
experts, dense MLPs, head), with each MoE layer's fan-out to the expert servers over gRPC.

Each selected expert gets only its tokens, every expert of a layer at once, on the replica
with the fewest calls in flight (:mod:`autoglm.endpoints`). A failed call is retried once
on the next replica; an expert with no reachable replica fails the request with a clear
error within ``AUTOGLM_EXPERT_TIMEOUT_SECONDS``, and the router recovers by itself when a
replica is back. Every answer carries the model version that computed it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from autoglm.backends.expect import check_expectations
from autoglm.backends.placement import placement
from autoglm.endpoints import Balancer, NoReplica, Resolver
from autoglm.models.decoder import RouterTier, forward
from autoglm.plan import expert_model
from autoglm.repository import load_part_config, load_weights

MAX_TOKENS_PER_CALL = 4096  # the expert models' max_batch_size


class ExpertUnavailable(RuntimeError):
    pass


# A replica that comes back is reconnected within a second or two, not gRPC's default
# backoff of up to two minutes.
CHANNEL_ARGS = [("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000)]


def _connect(address: str) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url=address, channel_args=CHANNEL_ARGS)


def _close(client: grpcclient.InferenceServerClient) -> None:
    client.close()


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
        self.timeout = float(os.environ.get("AUTOGLM_EXPERT_TIMEOUT_SECONDS", "10"))
        self.resolver = Resolver.from_env()
        self.balancer: Balancer[grpcclient.InferenceServerClient] = Balancer(_connect, _close)
        self.pool = ThreadPoolExecutor(max_workers=min(2 * self.cfg.num_experts, 64),
                                       thread_name_prefix="fanout")
        self._metrics()
        self._refresh()
        self._stop = threading.Event()
        period = float(os.environ.get("AUTOGLM_RESOLVE_SECONDS", "2"))
        self._resolver_thread = threading.Thread(target=self._resolve_loop, args=(period,),
                                                 daemon=True)
        self._resolver_thread.start()

    def _metrics(self) -> None:
        def family(name: str, doc: str, kind: Any) -> Any:
            return pb_utils.MetricFamily(name=name, description=doc, kind=kind)

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        fams = {
            "tokens": family("autoglm_expert_tokens_total",
                             "Tokens the gate routed to each expert", counter),
            "calls": family("autoglm_expert_calls_total", "Calls to each expert", counter),
            "failures": family("autoglm_expert_call_failures_total",
                               "Failed calls to each expert replica", counter),
            "seconds": family("autoglm_expert_call_seconds_total",
                              "Time spent in calls to each expert", counter),
            "replicas": family("autoglm_expert_replicas",
                               "Replicas of each expert the router knows", gauge),
        }
        self.m = {key: [fam.Metric(labels={"expert": str(i)})
                        for i in range(self.cfg.num_experts)]
                  for key, fam in fams.items()}
        self._families = fams  # kept alive with their metrics

    def _refresh(self) -> None:
        self.balancer.update(self.resolver.resolve())
        for i in range(self.cfg.num_experts):
            self.m["replicas"][i].set(float(len(self.balancer.addresses(i))))

    def _resolve_loop(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self._refresh()
            except Exception as e:
                pb_utils.Logger.log_warn(f"endpoint refresh failed: {e}")

    # -- one expert call ---------------------------------------------------------------

    def _call_replica(self, client: grpcclient.InferenceServerClient, expert: int, layer: int,
                      h: NDArray[Any], timeout: float) -> NDArray[Any]:
        outs = []
        for start in range(0, h.shape[0], MAX_TOKENS_PER_CALL):
            chunk = h[start:start + MAX_TOKENS_PER_CALL]
            lay = grpcclient.InferInput("LAYER", [chunk.shape[0], 1], "INT32")
            lay.set_data_from_numpy(np.full((chunk.shape[0], 1), layer, dtype=np.int32))
            hid = grpcclient.InferInput("HIDDEN", list(chunk.shape), "FP32")
            hid.set_data_from_numpy(chunk)
            res = client.infer(expert_model(expert), [lay, hid],
                               outputs=[grpcclient.InferRequestedOutput("OUTPUT")],
                               client_timeout=timeout)
            outs.append(res.as_numpy("OUTPUT"))
        return np.concatenate(outs)

    def _call(self, expert: int, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Try the replicas, least busy first, each at most once, within one timeout: a
        dead replica refuses at once, so the next one still has time."""
        arr = np.ascontiguousarray(h.to(torch.float32).cpu().numpy())
        deadline = time.monotonic() + self.timeout
        tried: list[str] = []
        errors: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                replica = self.balancer.acquire(expert, exclude=tried)
            except NoReplica as e:
                if not tried:
                    errors.append(str(e))
                break
            t0 = time.monotonic()
            try:
                out = self._call_replica(replica.channel, expert, layer, arr, left)
            except InferenceServerException as e:
                self.balancer.release(replica, failed=True)
                self.m["failures"][expert].increment(1.0)
                tried.append(replica.address)
                errors.append(f"{replica.address}: {e.message() or e}")
                continue
            finally:
                self.m["seconds"][expert].increment(time.monotonic() - t0)
            self.balancer.release(replica)
            self.m["calls"][expert].increment(1.0)
            return torch.from_numpy(out).to(h.device, h.dtype)
        if not errors:
            errors.append(f"no answer within {self.timeout:g} s")
        raise ExpertUnavailable(f"expert {expert} unavailable: " + "; ".join(errors))

    def _fanout(self, layer: int, sends: Mapping[int, torch.Tensor],
                ) -> dict[int, torch.Tensor]:
        futures = {e: self.pool.submit(self._call, e, layer, h) for e, h in sends.items()}
        return {e: f.result() for e, f in futures.items()}

    # -- Triton entry points -----------------------------------------------------------

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
                        self._fanout)
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
                for e, n in tokens.items():
                    self.m["tokens"][e].increment(float(n))
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def finalize(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.balancer.close()
