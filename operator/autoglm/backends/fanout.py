"""The router tier's calls to the expert servers: each selected expert gets only its tokens,
every expert of a layer at once, on the replica with the fewest calls in flight
(:mod:`autoglm.endpoints`). A failed call is retried once on the next replica; an expert with
no reachable replica fails with a clear error within ``AUTOGLM_EXPERT_TIMEOUT_SECONDS``, and
calls recover by themselves when a replica is back. Shared by every model of the router tier.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from autoglm.endpoints import Balancer, NoReplica, Resolver
from autoglm.plan import expert_model

MAX_TOKENS_PER_CALL = 4096  # the expert models' max_batch_size

# A replica that comes back is reconnected within a second or two, not gRPC's default
# backoff of up to two minutes.
CHANNEL_ARGS = [("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000)]


class ExpertUnavailable(RuntimeError):
    pass


def _connect(address: str) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url=address, channel_args=CHANNEL_ARGS)


def _close(client: grpcclient.InferenceServerClient) -> None:
    client.close()


class ExpertFanout:
    """Calls to the experts of one router model, with per-expert metrics."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.timeout = float(os.environ.get("AUTOGLM_EXPERT_TIMEOUT_SECONDS", "10"))
        self.resolver = Resolver.from_env()
        self.balancer: Balancer[grpcclient.InferenceServerClient] = Balancer(_connect, _close)
        self.pool = ThreadPoolExecutor(max_workers=min(2 * num_experts, 64),
                                       thread_name_prefix="fanout")
        self._metrics()
        self.refresh()
        self._stop = threading.Event()
        period = float(os.environ.get("AUTOGLM_RESOLVE_SECONDS", "2"))
        self._thread = threading.Thread(target=self._resolve_loop, args=(period,),
                                        daemon=True)
        self._thread.start()

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
                        for i in range(self.num_experts)]
                  for key, fam in fams.items()}
        self._families = fams  # kept alive with their metrics

    def count_routed(self, tokens: Mapping[int, int]) -> None:
        """User load, the autoscaling signal (canary requests are left out)."""
        for e, n in tokens.items():
            self.m["tokens"][e].increment(float(n))

    def refresh(self) -> None:
        self.balancer.update(self.resolver.resolve())
        for i in range(self.num_experts):
            self.m["replicas"][i].set(float(len(self.balancer.addresses(i))))

    def _resolve_loop(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.refresh()
            except Exception as e:
                pb_utils.Logger.log_warn(f"endpoint refresh failed: {e}")

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

    def call(self, expert: int, layer: int, h: torch.Tensor) -> torch.Tensor:
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

    def __call__(self, layer: int, sends: Mapping[int, torch.Tensor],
                 ) -> dict[int, torch.Tensor]:
        futures = {e: self.pool.submit(self.call, e, layer, h) for e, h in sends.items()}
        return {e: f.result() for e, f in futures.items()}

    def close(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.balancer.close()
