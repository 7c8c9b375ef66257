"""The router tier's calls to the expert servers: one request per server per layer, carrying
the rows of every expert it is chosen for (:mod:`autoglm.endpoints`), every server of a layer
in flight at once (gRPC futures: no thread per call). The router learns what each server
holds from the server itself, and sends an expert's rows only to a server that reports it,
at the router's version. A failed call's experts are retried on their other servers; an
expert with none fails with a clear error within ``AUTOGLM_EXPERT_TIMEOUT_SECONDS``, and
calls recover by themselves when a server is back. Shared by every model of the router tier.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc  # type: ignore[import-untyped]
import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from numpy.typing import NDArray
from tritonclient.grpc import service_pb2

from autoglm.backends.counters import Counters
from autoglm.endpoints import Balancer, Resolver, Server
from autoglm.plan import experts_model

# A server that comes back is reconnected within a second or two, not gRPC's default
# backoff of up to two minutes; a layer's rows of a long prompt exceed gRPC's 4 MiB default.
CHANNEL_ARGS = [("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1)]
INFER = "/inference.GRPCInferenceService/ModelInfer"
PROBE_TIMEOUT = 2.0


class ExpertUnavailable(RuntimeError):
    pass


class _Conn:
    """A channel to one expert server and its ModelInfer method. Raw protobufs, not
    tritonclient: its per-call Python work was most of the router's time in a step."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_ARGS)
        self.infer = self.channel.unary_unary(
            INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString)


def _request(layer: int, experts: Sequence[int], rows: Sequence[NDArray[Any]]) -> Any:
    r = service_pb2.ModelInferRequest(model_name=experts_model())
    hidden = np.concatenate(rows) if len(rows) > 1 else rows[0]
    for name, arr in (("LAYER", np.array([layer], dtype=np.int32)),
                      ("EXPERTS", np.array(experts, dtype=np.int32)),
                      ("COUNTS", np.array([len(x) for x in rows], dtype=np.int32)),
                      ("HIDDEN", hidden)):
        r.inputs.add(name=name, datatype="INT32" if arr.dtype == np.int32 else "FP32",
                     shape=list(arr.shape))
        r.raw_input_contents.append(arr.tobytes())
    r.outputs.add(name="OUTPUT")
    return r


def _probe_request() -> Any:
    r = service_pb2.ModelInferRequest(model_name=experts_model())
    r.outputs.add(name="HELD")
    r.outputs.add(name="MODEL_VERSION")
    return r


PROBE = _probe_request()  # the same request every time: built once


def _report(response: Any) -> tuple[int, list[int]]:
    """(version, experts held) from a probe's answer."""
    out = {o.name: i for i, o in enumerate(response.outputs)}
    held = np.frombuffer(response.raw_output_contents[out["HELD"]], dtype=np.int32)
    version = np.frombuffer(response.raw_output_contents[out["MODEL_VERSION"]],
                            dtype=np.int64)
    return int(version[0]), [int(e) for e in held]


@dataclass
class _Call:
    server: Server
    experts: list[int]
    future: Any
    t0: float


class ExpertFanout:
    """Calls to the expert servers for one router model, with per-expert metrics."""

    def __init__(self, num_experts: int, version: int) -> None:
        self.num_experts = num_experts
        self.version = version
        self.timeout = float(os.environ.get("AUTOGLM_EXPERT_TIMEOUT_SECONDS", "10"))
        self.resolver = Resolver.from_env()
        self.balancer = Balancer()
        self.conns: dict[str, _Conn] = {}
        self._conns_lock = threading.Lock()
        self._refused: set[tuple[str, int]] = set()  # (address, version) warned about
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
        per_expert = {
            "tokens": family("autoglm_expert_tokens_total",
                             "Tokens the gate routed to each expert", counter),
            "calls": family("autoglm_expert_calls_total",
                            "Calls to expert servers that carried each expert's rows", counter),
            "failures": family("autoglm_expert_call_failures_total",
                               "Failed calls that carried each expert's rows", counter),
            "seconds": family("autoglm_expert_call_seconds_total",
                              "Time spent in calls that carried each expert's rows", counter),
        }
        self._replicas_family = family("autoglm_expert_replicas",
                                       "Servers that report each expert", gauge)
        self._server_calls_family = family(
            "autoglm_expert_server_calls_total",
            "Calls to expert servers (one per server per layer and step)", counter)
        self.replicas = [self._replicas_family.Metric(labels={"expert": str(i)})
                         for i in range(self.num_experts)]
        self._replica_counts: list[int] = [-1] * self.num_experts
        self._families = per_expert  # kept alive with their metrics
        metrics: dict[Any, Any] = {
            (key, i): fam.Metric(labels={"expert": str(i)})
            for key, fam in per_expert.items() for i in range(self.num_experts)}
        metrics["server_calls"] = self._server_calls_family.Metric(labels={})
        self.counters = Counters(metrics)

    def count_routed(self, tokens: Mapping[int, int]) -> None:
        """User load, the autoscaling signal (canary requests are left out)."""
        for e, n in tokens.items():
            self.counters.add(("tokens", e), float(n))

    def _conn(self, address: str) -> _Conn:
        with self._conns_lock:
            conn = self.conns.get(address)
            if conn is None:
                conn = self.conns[address] = _Conn(address)
            return conn

    def refresh(self) -> None:
        """Ask every server the resolver names what it holds; a server that does not
        answer keeps what it last reported (a failed call rests it), a new one is used
        once it answers, and one at another version is never used. A known server the
        resolver no longer names stays while it still answers (a pod that missed a
        readiness probe under load, a DNS answer that came back short) and goes at its
        first failed probe (a pod gone; its calls meanwhile go to other replicas)."""
        named = set(self.resolver.resolve())
        known = self.balancer.holdings()  # address → what it last reported
        addresses = sorted(named | set(known))
        probes = {a: self._conn(a).infer.future(PROBE, timeout=PROBE_TIMEOUT)
                  for a in addresses}
        holdings: dict[str, Collection[int]] = {}
        for a, f in probes.items():
            try:
                version, held = _report(f.result())
            except (grpc.RpcError, KeyError, IndexError, ValueError):
                if a in known and a in named:
                    holdings[a] = known[a]
                continue
            if version != self.version:
                if (a, version) not in self._refused:
                    self._refused.add((a, version))
                    pb_utils.Logger.log_warn(f"expert server {a} serves version {version}, "
                                             f"not {self.version}: not used")
                continue
            holdings[a] = [e for e in held if 0 <= e < self.num_experts]
        self.balancer.update(holdings)
        with self._conns_lock:
            gone = [self.conns.pop(a) for a in list(self.conns)
                    if a not in named and a not in holdings]
        for conn in gone:  # calls in flight on it end with an error and are retried
            conn.channel.close()
        for e in range(self.num_experts):  # a gauge update is a message: only on change
            n = sum(e in held for held in holdings.values())
            if n != self._replica_counts[e]:
                self._replica_counts[e] = n
                self.replicas[e].set(float(n))

    def _resolve_loop(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.refresh()
            except Exception as e:
                pb_utils.Logger.log_warn(f"expert server refresh failed: {e}")

    def _send(self, layer: int, arrays: Mapping[int, NDArray[Any]], experts: Sequence[int],
              tried: Mapping[int, list[str]], deadline: float,
              ) -> tuple[list[_Call], dict[int, str]]:
        chosen, missing = self.balancer.assign(experts, tried)
        groups: dict[str, list[int]] = {}
        for e, s in chosen.items():
            groups.setdefault(s.address, []).append(e)
        calls = []
        left = max(deadline - time.monotonic(), 0.001)
        for address, group in groups.items():
            group.sort()
            request = _request(layer, group, [arrays[e] for e in group])
            calls.append(_Call(chosen[group[0]], group,
                               self._conn(address).infer.future(request, timeout=left),
                               time.monotonic()))
            self.counters.add("server_calls", 1.0)
        return calls, missing

    def start(self, layer: int, sends: Mapping[int, torch.Tensor],
              ) -> Callable[[], dict[int, torch.Tensor]]:
        """Send one layer's rows; the returned function waits for the answers (the caller
        computes its shared experts meanwhile)."""
        deadline = time.monotonic() + self.timeout
        arrays = {e: np.ascontiguousarray(h.to(torch.float32).cpu().numpy())
                  for e, h in sends.items()}
        tried: dict[int, list[str]] = {e: [] for e in arrays}
        calls, missing = self._send(layer, arrays, sorted(arrays), tried, deadline)

        def finish() -> dict[int, torch.Tensor]:
            got = self._gather(layer, arrays, calls, missing, tried, deadline)
            return {e: torch.from_numpy(got[e]).to(h.device, h.dtype)
                    for e, h in sends.items()}
        return finish

    def __call__(self, layer: int, sends: Mapping[int, torch.Tensor],
                 ) -> dict[int, torch.Tensor]:
        return self.start(layer, sends)()

    def _gather(self, layer: int, arrays: Mapping[int, NDArray[Any]], calls: list[_Call],
                missing: dict[int, str], tried: dict[int, list[str]], deadline: float,
                ) -> dict[int, NDArray[Any]]:
        got: dict[int, NDArray[Any]] = {}
        errors: dict[int, list[str]] = {e: [] for e in arrays}
        failed: set[int] = set()
        while True:
            retry: list[int] = []
            for c in calls:  # every call ends (and is released) before anything is raised
                try:
                    response = c.future.result()
                    out = np.frombuffer(response.raw_output_contents[0], dtype=np.float32
                                        ).reshape(tuple(response.outputs[0].shape))
                except grpc.RpcError as err:
                    self.balancer.release(c.server, failed=True)
                    why = f"{c.server.address}: {err.details() or err.code()}"
                    for e in c.experts:
                        tried[e].append(c.server.address)
                        errors[e].append(why)
                        self.counters.add(("failures", e), 1.0)
                    retry.extend(c.experts)
                    continue
                finally:
                    for e in c.experts:
                        self.counters.add(("seconds", e), time.monotonic() - c.t0)
                self.balancer.release(c.server)
                start = 0
                for e in c.experts:
                    n = arrays[e].shape[0]
                    got[e] = out[start:start + n]
                    start += n
                    self.counters.add(("calls", e), 1.0)
            for e, why in missing.items():
                if not tried[e]:
                    errors[e].append(why)
            failed.update(missing)
            if retry and deadline - time.monotonic() > 0:
                calls, missing = self._send(layer, arrays, sorted(retry), tried, deadline)
                continue
            failed.update(retry)
            if failed:
                e = min(failed)
                if not errors[e]:
                    errors[e].append(f"no answer within {self.timeout:g} s")
                raise ExpertUnavailable(f"expert {e} unavailable: " + "; ".join(errors[e]))
            return got

    def close(self) -> None:
        self._stop.set()
        self.counters.close()
        for conn in self.conns.values():
            conn.channel.close()
