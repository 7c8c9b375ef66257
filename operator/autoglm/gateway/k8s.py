"""The gateway on Kubernetes: follow the resource's routing state by watching it.

The operator records the active slot in ``status.activeSlot``/``activeVersion``; the
gateway watches its one resource and flips its pointer to ``<name>-<slot>-router`` as soon as
the event arrives. It also watches the EndpointSlices of both slots' router Services (its
Role allows reading nothing else) and spreads requests over the ready pods itself: a gRPC
channel to the ClusterIP Service would pin one pod for good. A pod that is not ready or is
terminating (a router scaled down drains) gets no new request; with no ready pod known, the
Service's address is used as before.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

from kubernetes import client, watch

from autoglm.gateway.app import GatewayServer, Replica, Routing, Target
from autoglm.plan import TRITON_GRPC_PORT, TRITON_HTTP_PORT, TRITON_METRICS_PORT, workload_name
from autoglm.spec import GROUP, PLURAL, VERSION

log = logging.getLogger("autoglm.gateway")
SERVICE_NAME = "kubernetes.io/service-name"  # the EndpointSlice's label naming its Service


def target_from_status(name: str, namespace: str, status: Mapping[str, Any] | None,
                       model: str = "") -> Target | None:
    """Where traffic goes for this status; None while nothing serves. ``model``: the served
    model's name (``spec.model.name``), the OpenAI API's model id."""
    slot = (status or {}).get("activeSlot")
    version = (status or {}).get("activeVersion")
    if slot not in ("a", "b") or not isinstance(version, int):
        return None
    host = f"{workload_name(name, slot, 'router')}.{namespace}.svc"
    return Target(slot, version, f"http://{host}:{TRITON_HTTP_PORT}",
                  f"{host}:{TRITON_GRPC_PORT}", model)


def ready_replicas(slice_endpoints: list[Any]) -> tuple[Replica, ...]:
    """The router replicas an EndpointSlice's endpoints make: ready and not terminating."""
    out = set()
    for ep in slice_endpoints:
        cond = ep.conditions
        if cond is not None and (cond.ready is False or cond.terminating):
            continue
        for ip in ep.addresses or ():
            host = f"[{ip}]" if ":" in ip else ip
            out.add(Replica(f"http://{host}:{TRITON_HTTP_PORT}", f"{host}:{TRITON_GRPC_PORT}",
                            f"http://{host}:{TRITON_METRICS_PORT}/metrics"))
    return tuple(sorted(out, key=lambda r: r.url))


class Follower:
    """The active slot (from the resource) and its ready router pods (from EndpointSlices),
    made one :class:`Target` and flipped into ``routing`` whenever either changes."""

    def __init__(self, name: str, namespace: str, routing: Routing) -> None:
        self.name, self.namespace, self.routing = name, namespace, routing
        self.status_target: Target | None = None
        self.slices: dict[str, tuple[str, tuple[Replica, ...]]] = {}  # slice → (svc, pods)
        self.lock = threading.Lock()

    def services(self) -> tuple[str, str]:
        return (workload_name(self.name, "a", "router"),
                workload_name(self.name, "b", "router"))

    def on_resource(self, obj: Mapping[str, Any]) -> None:
        model = ((obj.get("spec") or {}).get("model") or {}).get("name") or ""
        target = target_from_status(self.name, self.namespace, obj.get("status"), str(model))
        with self.lock:
            if target is not None:
                self.status_target = target
            self._flip()

    def on_slice(self, kind: str, slice_name: str, service: str,
                 replicas: tuple[Replica, ...]) -> None:
        with self.lock:
            if kind == "DELETED":
                self.slices.pop(slice_name, None)
            else:
                self.slices[slice_name] = (service, replicas)
            self._flip()

    def _flip(self) -> None:
        target = self.status_target
        if target is None:
            return
        service = dict(zip("ab", self.services(), strict=True))[target.slot]
        pods = sorted({r for svc, rs in self.slices.values() if svc == service for r in rs},
                      key=lambda r: r.url)
        target = dataclasses.replace(target, replicas=tuple(pods))
        if target != self.routing.active:
            old = self.routing.active
            if old is None or (old.slot, old.version) != (target.slot, target.version):
                log.info("routing to slot %s (version %d)", target.slot, target.version)
            if old is None or old.replicas != target.replicas:
                log.info("slot %s router replicas: %s", target.slot,
                         ", ".join(r.grpc_url for r in target.replicas) or "the Service")
            self.routing.flip(target)


def follow(api: client.ApiClient, name: str, namespace: str, routing: Routing,
           stop: threading.Event) -> None:
    """Watch the resource and the router Services' EndpointSlices, and flip ``routing`` on
    each change, until ``stop``."""
    follower = Follower(name, namespace, routing)
    slices = threading.Thread(target=_follow_slices, args=(api, follower, stop),
                              daemon=True, name="endpointslices")
    slices.start()
    custom = client.CustomObjectsApi(api)
    while not stop.is_set():
        try:
            for event in watch.Watch().stream(
                    custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                    field_selector=f"metadata.name={name}", timeout_seconds=30):
                follower.on_resource(event["object"])
                if stop.is_set():
                    return
        except Exception as e:
            log.warning("watch of %s/%s failed (%s); retrying", namespace, name, e)
            stop.wait(1.0)


def _follow_slices(api: client.ApiClient, follower: Follower, stop: threading.Event) -> None:
    discovery = client.DiscoveryV1Api(api)
    selector = f"{SERVICE_NAME} in ({','.join(follower.services())})"
    while not stop.is_set():
        try:
            for event in watch.Watch().stream(
                    discovery.list_namespaced_endpoint_slice, follower.namespace,
                    label_selector=selector, timeout_seconds=30):
                obj = event["object"]
                follower.on_slice(event["type"], obj.metadata.name,
                                  (obj.metadata.labels or {}).get(SERVICE_NAME, ""),
                                  ready_replicas(obj.endpoints or []))
                if stop.is_set():
                    return
        except Exception as e:
            log.warning("watch of the router EndpointSlices failed (%s); retrying", e)
            stop.wait(1.0)


def run(name: str, namespace: str, port: int, metrics_port: int, api: client.ApiClient,
        host: str = "0.0.0.0", grpc_port: int | None = None) -> int:
    routing = Routing()
    server = GatewayServer(routing, port, host=host, metrics_port=metrics_port,
                           grpc_port=grpc_port).start()
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    watcher = threading.Thread(target=follow, args=(api, name, namespace, routing, stop),
                               daemon=True)
    watcher.start()
    log.info("gateway for %s/%s on :%d (gRPC :%s, metrics :%d)", namespace, name, port,
             grpc_port or "-", metrics_port)
    stop.wait()
    # drain: stop taking requests only after in-flight ones finished (bounded)
    deadline = time.monotonic() + 30
    while sum(server.gateway.inflight.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    server.stop()
    return 0
