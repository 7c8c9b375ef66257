"""What every surface of the gateway shares (HTTP, gRPC, OpenAI, Triton's generate), with
nothing else of the gateway imported: where requests go (:class:`Routing` → :class:`Target`
→ its :class:`Replica` s), how they are counted (:class:`Traffic`), the client limits
(:class:`Limits`) and the :class:`Hub` that bundles them for each surface.
"""

from __future__ import annotations

import gc
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from autoglm.gateway.balance import POLICIES, Balancer, Policy
from autoglm.plan import generate_model

# The usual gRPC -> HTTP status mapping (google.rpc.Code); anything else is 500.
HTTP_CODE = {"OK": 200, "CANCELLED": 499, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
             "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403,
             "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400, "ABORTED": 409,
             "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
             "UNAUTHENTICATED": 401}
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclass(frozen=True)
class Replica:
    """One router replica of a slot: its Triton HTTP, gRPC and metrics endpoints."""

    url: str  # http://host:port
    grpc_url: str = ""  # host:port ("": no gRPC)
    metrics_url: str = ""  # http://host:port/metrics ("": its load is not read)


@dataclass(frozen=True)
class Target:
    """A slot's routers: where requests go while the slot is active. ``url``/``grpc_url``
    name the slot's router as one address (a Service); ``replicas``, when known, each pod,
    and requests are then spread over them (a Service's gRPC connection pins one pod)."""

    slot: str
    version: int
    url: str  # http://host:port of the router's Triton HTTP endpoint
    grpc_url: str = ""  # host:port of its Triton gRPC endpoint ("": no gRPC)
    model: str = ""  # the served model's name (spec.model.name): the OpenAI model id
    replicas: tuple[Replica, ...] = ()

    @property
    def endpoints(self) -> tuple[Replica, ...]:
        return self.replicas or (Replica(self.url, self.grpc_url),)


def parse_json(raw: str | bytes, **kw: Any) -> Any:
    """``json.loads`` with the cyclic GC paused: a deeply nested body makes the decoder
    recurse to the interpreter's limit, and a finalizer the GC ran down there fails with no
    stack left (an unraisable error; CI's fuzz test saw one). Only the gateway's event loop
    parses bodies, so pausing is not raced."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(raw, **kw)
    finally:
        if enabled:
            gc.enable()


def served_model(target: Target) -> str:
    """The model id clients use: the served model's name (the Triton model's without one)."""
    return target.model or generate_model()


class Routing:
    """The active-slot pointer. Assignment of one attribute is atomic for the event loop
    and for threads alike; readers take one snapshot per request."""

    def __init__(self, target: Target | None = None) -> None:
        self.active = target
        self.changed = threading.Event()

    def flip(self, target: Target) -> None:
        self.active = target
        self.changed.set()


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the gateway (environment variables in parentheses)."""

    max_body_bytes: int = 64 * 2**20  # AUTOGLM_GATEWAY_MAX_BODY_BYTES
    idle_timeout: float = 60.0  # AUTOGLM_GATEWAY_IDLE_TIMEOUT: to a request's whole headers
    body_timeout: float = 60.0  # AUTOGLM_GATEWAY_BODY_TIMEOUT: to its whole body
    max_connections: int = 10_000  # AUTOGLM_GATEWAY_MAX_CONNECTIONS (HTTP, open at once)
    heartbeat_seconds: float = 5.0  # AUTOGLM_GATEWAY_HEARTBEAT_SECONDS: a stream idle before
    # an SSE comment
    write_timeout: float = 30.0  # AUTOGLM_GATEWAY_WRITE_TIMEOUT: a stream's client taking no
    # data for this long is cut (its generation freed)

    ENV: ClassVar[dict[str, str]] = {"max_body_bytes": "AUTOGLM_GATEWAY_MAX_BODY_BYTES",
           "idle_timeout": "AUTOGLM_GATEWAY_IDLE_TIMEOUT",
           "body_timeout": "AUTOGLM_GATEWAY_BODY_TIMEOUT",
           "max_connections": "AUTOGLM_GATEWAY_MAX_CONNECTIONS",
           "heartbeat_seconds": "AUTOGLM_GATEWAY_HEARTBEAT_SECONDS",
           "write_timeout": "AUTOGLM_GATEWAY_WRITE_TIMEOUT"}

    def __post_init__(self) -> None:
        for name in self.ENV:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The defaults, overridden by the environment's variables that are set."""
        env = os.environ if environ is None else environ
        given: dict[str, Any] = {}
        for name, var in cls.ENV.items():
            raw = env.get(var, "").strip()
            if raw:
                kind = int if name in ("max_body_bytes", "max_connections") else float
                try:
                    given[name] = kind(raw)
                except ValueError:
                    raise ValueError(f"{var} must be a {kind.__name__}, got {raw!r}") from None
        return cls(**given)


def balancing_policy(environ: Mapping[str, str] | None = None) -> Policy:
    """``AUTOGLM_GATEWAY_BALANCE``: how requests are spread over a slot's router replicas."""
    raw = (os.environ if environ is None else environ).get("AUTOGLM_GATEWAY_BALANCE", "")
    raw = raw.strip() or "prefix-load"
    for policy in POLICIES:
        if raw == policy:
            return policy
    raise ValueError(f"AUTOGLM_GATEWAY_BALANCE must be one of {', '.join(POLICIES)}, "
                     f"got {raw!r}")


def environment_error() -> str | None:
    """What is wrong with the gateway's environment variables (None: nothing), checked
    before anything starts so that a bad value is one line, not a traceback."""
    try:
        Limits.from_env()
        balancing_policy()
    except ValueError as e:
        return str(e)
    return None


class Traffic:
    """Requests in flight per slot (exact draining) and the gateway's request metrics;
    touched only on the gateway's event loop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("autoglm_gateway_requests_total",
                                "Requests by slot, model version and HTTP status",
                                ["slot", "version", "code"], registry=self.registry)
        self.latency = Histogram("autoglm_gateway_request_seconds",
                                 "Request latency through the gateway", ["slot", "version"],
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.inflight_gauge = Gauge("autoglm_gateway_inflight",
                                    "Requests in flight per slot", ["slot"],
                                    registry=self.registry)
        self.inflight: dict[str, int] = {}
        self.retries = Counter("autoglm_gateway_retries_total",
                               "Requests tried again on a router (the same or another "
                               "replica) after one refused them unserved: unreachable, or "
                               "saturated", ["slot"], registry=self.registry)
        self.replica_requests = Counter(
            "autoglm_gateway_replica_requests_total",
            "Requests (and gRPC stream legs) sent to each router replica",
            ["slot", "replica"], registry=self.registry)

    def enter(self, slot: str) -> None:
        """A request (HTTP or gRPC) starts on ``slot``."""
        self.inflight[slot] = self.inflight.get(slot, 0) + 1
        self.inflight_gauge.labels(slot).set(self.inflight[slot])

    def leave(self, target: Target, code: str, seconds: float) -> None:
        slot, version = target.slot, str(target.version)
        self.inflight[slot] -= 1
        self.inflight_gauge.labels(slot).set(self.inflight[slot])
        self.latency.labels(slot, version).observe(seconds)
        self.requests.labels(slot, version, code).inc()


@dataclass
class Hub:
    """What each surface of the gateway is given: the pointer, the counts, the limits, and
    the balancer that spreads requests over the active slot's replicas."""

    routing: Routing
    limits: Limits = field(default_factory=Limits.from_env)
    upstream_timeout: float = 60.0
    traffic: Traffic = field(default_factory=Traffic)
    balancer: Balancer[Replica] = field(
        default_factory=lambda: Balancer(balancing_policy()))

    def tries(self, target: Target, prompt: str | None = None) -> Iterator[Replica]:
        """The replicas to try a request on, best first: each next one only when the one
        before refused it unserved (the caller goes on to the next). At least two tries
        (the same replica twice when it is the only one), at most one per replica."""
        tried: list[Replica] = []
        for n in range(max(2, len(target.endpoints))):
            if n:
                self.traffic.retries.labels(target.slot).inc()
            replica = self.balancer.pick(target.endpoints, prompt, exclude=tried)
            tried.append(replica)
            yield replica

    @contextmanager
    def sending(self, target: Target, replica: Replica) -> Iterator[None]:
        """One request (or stream leg) in flight on ``replica`` for as long as it lasts."""
        self.balancer.started(replica)
        self.traffic.replica_requests.labels(target.slot, replica.url).inc()
        try:
            yield
        finally:
            self.balancer.ended(replica)
