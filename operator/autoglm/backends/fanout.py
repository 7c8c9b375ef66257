"""The router tier's calls to the expert servers: each selected expert gets only its tokens,
every expert of a layer at once, on the replica with the fewest calls in flight
(:mod:`autoglm.endpoints`). A failed call is retried once on the next replica; an expert with
no reachable replica fails with a clear error within ``AUTOGLM_EXPERT_TIMEOUT_SECONDS``, and
calls recover by themselves when a replica is back. Shared by every model of the router tier.

Counters are summed in this process and handed to Triton at most every
``AUTOGLM_METRICS_FLUSH_SECONDS`` (0.5): each ``pb_utils`` metric update is a blocking message
to the Triton process, and a decode step would otherwise send three per expert call.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc  # type: ignore[import-untyped]
import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from numpy.typing import NDArray
from tritonclient.grpc import service_pb2

from autoglm.endpoints import Balancer, NoReplica, Replica, Resolver
from autoglm.plan import expert_model

MAX_TOKENS_PER_CALL = 4096  # the expert models' max_batch_size

# A replica that comes back is reconnected within a second or two, not gRPC's default
# backoff of up to two minutes.
CHANNEL_ARGS = [("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000)]


class ExpertUnavailable(RuntimeError):
    pass


INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class _Conn:
    """A channel to one expert replica and its ModelInfer method. Raw protobufs, not
    tritonclient: its per-call Python work, times every expert of every layer of every
    decode step, was most of the router's time in a step."""

    channel: grpc.Channel
    infer: Any


def _connect(address: str) -> _Conn:
    channel = grpc.insecure_channel(address, options=CHANNEL_ARGS)
    return _Conn(channel, channel.unary_unary(
        INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=service_pb2.ModelInferResponse.FromString))


def _close(conn: _Conn) -> None:
    conn.channel.close()


def _requests(expert: int, layer: int, h: NDArray[Any]) -> list[Any]:
    """ModelInferRequests carrying ``h`` [T, d] (fp32) for ``layer``, at most the expert
    model's max_batch_size tokens each."""
    out = []
    for start in range(0, h.shape[0], MAX_TOKENS_PER_CALL):
        chunk = h[start:start + MAX_TOKENS_PER_CALL]
        n = chunk.shape[0]
        r = service_pb2.ModelInferRequest(model_name=expert_model(expert))
        r.inputs.add(name="LAYER", datatype="INT32", shape=[n, 1])
        r.inputs.add(name="HIDDEN", datatype="FP32", shape=list(chunk.shape))
        r.outputs.add(name="OUTPUT")
        r.raw_input_contents.extend([np.full((n, 1), layer, dtype=np.int32).tobytes(),
                                     chunk.tobytes()])
        out.append(r)
    return out


def _output(responses: list[Any]) -> NDArray[Any]:
    arrays = [np.frombuffer(r.raw_output_contents[0], dtype=np.float32).reshape(
        tuple(r.outputs[0].shape)) for r in responses]
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0].copy()


class ExpertFanout:
    """Calls to the experts of one router model, with per-expert metrics."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.timeout = float(os.environ.get("AUTOGLM_EXPERT_TIMEOUT_SECONDS", "10"))
        self.flush_seconds = float(os.environ.get("AUTOGLM_METRICS_FLUSH_SECONDS", "0.5"))
        # (counter, expert) → what it gained since the last flush
        self._sums: dict[tuple[str, int], float] = {}
        self._sums_lock = threading.Lock()
        self._flushed = time.monotonic()
        self.resolver = Resolver.from_env()
        self.balancer: Balancer[_Conn] = Balancer(_connect, _close)
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
            self._add("tokens", e, float(n))
        self.flush_metrics()

    def _add(self, counter: str, expert: int, value: float) -> None:
        with self._sums_lock:
            key = (counter, expert)
            self._sums[key] = self._sums.get(key, 0.0) + value

    def flush_metrics(self, force: bool = False) -> None:
        """Hand the summed counters to Triton, when a flush period has passed (``force``:
        now)."""
        if not force and time.monotonic() - self._flushed < self.flush_seconds:
            return
        with self._sums_lock:
            sums, self._sums = self._sums, {}
            self._flushed = time.monotonic()
        for (counter, expert), value in sums.items():
            self.m[counter][expert].increment(value)

    def refresh(self) -> None:
        self.balancer.update(self.resolver.resolve())
        for i in range(self.num_experts):
            self.m["replicas"][i].set(float(len(self.balancer.addresses(i))))

    def _resolve_loop(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.flush_metrics()  # what an idle router summed last
                self.refresh()
            except Exception as e:
                pb_utils.Logger.log_warn(f"endpoint refresh failed: {e}")

    def _start(self, replica: Replica[_Conn], expert: int, layer: int, h: NDArray[Any],
               timeout: float) -> list[Any]:
        return [replica.channel.infer.future(r, timeout=timeout)
                for r in _requests(expert, layer, h)]

    def _finish(self, replica: Replica[_Conn], expert: int, calls: list[Any], t0: float,
                ) -> NDArray[Any]:
        """The answer of a call started on ``replica``; grpc.RpcError if it failed."""
        try:
            out = _output([c.result() for c in calls])
        except grpc.RpcError:
            self.balancer.release(replica, failed=True)
            self._add("failures", expert, 1.0)
            raise
        finally:
            self._add("seconds", expert, time.monotonic() - t0)
        self.balancer.release(replica)
        self._add("calls", expert, 1.0)
        return out

    def _retry(self, expert: int, layer: int, h: NDArray[Any], deadline: float,
               tried: list[str], errors: list[str]) -> NDArray[Any]:
        """The replicas not ``tried`` yet, least busy first, each at most once, until the
        deadline: a dead replica refuses at once, so the next one still has time."""
        while (left := deadline - time.monotonic()) > 0:
            try:
                replica = self.balancer.acquire(expert, exclude=tried)
            except NoReplica as e:
                if not tried:
                    errors.append(str(e))
                break
            t0 = time.monotonic()
            try:
                return self._finish(replica, expert,
                                    self._start(replica, expert, layer, h, left), t0)
            except grpc.RpcError as e:
                tried.append(replica.address)
                errors.append(f"{replica.address}: {e.details() or e.code()}")
        if not errors:
            errors.append(f"no answer within {self.timeout:g} s")
        raise ExpertUnavailable(f"expert {expert} unavailable: " + "; ".join(errors))

    def __call__(self, layer: int, sends: Mapping[int, torch.Tensor],
                 ) -> dict[int, torch.Tensor]:
        """Every expert's call in flight at once (gRPC futures: no thread per call), then
        their answers; a failed one is retried on the expert's other replicas."""
        deadline = time.monotonic() + self.timeout
        arrays = {e: np.ascontiguousarray(h.to(torch.float32).cpu().numpy())
                  for e, h in sends.items()}
        started: dict[int, tuple[Replica[_Conn], list[Any], float] | None] = {}
        for e, arr in arrays.items():
            try:
                replica = self.balancer.acquire(e)
            except NoReplica:
                started[e] = None  # _retry says why
                continue
            started[e] = (replica, self._start(replica, e, layer, arr, self.timeout),
                          time.monotonic())
        out: dict[int, torch.Tensor] = {}
        for e, first in started.items():
            tried: list[str] = []
            errors: list[str] = []
            if first is not None:
                replica, calls, t0 = first
                try:
                    result = self._finish(replica, e, calls, t0)
                except grpc.RpcError as err:
                    tried.append(replica.address)
                    errors.append(f"{replica.address}: {err.details() or err.code()}")
                    result = self._retry(e, layer, arrays[e], deadline, tried, errors)
            else:
                result = self._retry(e, layer, arrays[e], deadline, tried, errors)
            h = sends[e]
            out[e] = torch.from_numpy(result).to(h.device, h.dtype)
        self.flush_metrics()
        return out

    def close(self) -> None:
        self._stop.set()
        self.flush_metrics(force=True)
        self.balancer.close()
