"""The gateway on Kubernetes: follow the resource's routing state by watching it.

The operator records the active slot in ``status.activeSlot``/``activeVersion``; the
gateway watches its one resource (its Role allows nothing else) and flips its pointer to
``<name>-<slot>-router`` as soon as the event arrives.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

from kubernetes import client, watch

from autoglm.gateway.app import GatewayServer, Routing, Target
from autoglm.plan import TRITON_GRPC_PORT, TRITON_HTTP_PORT, workload_name
from autoglm.spec import GROUP, PLURAL, VERSION

log = logging.getLogger("autoglm.gateway")


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


def follow(api: client.ApiClient, name: str, namespace: str, routing: Routing,
           stop: threading.Event) -> None:
    """Watch the resource and flip ``routing`` on each change, until ``stop``."""
    custom = client.CustomObjectsApi(api)
    while not stop.is_set():
        try:
            for event in watch.Watch().stream(
                    custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                    field_selector=f"metadata.name={name}", timeout_seconds=30):
                obj = event["object"]
                model = ((obj.get("spec") or {}).get("model") or {}).get("name") or ""
                target = target_from_status(name, namespace, obj.get("status"), str(model))
                if target is not None and target != routing.active:
                    log.info("routing to slot %s (version %d)", target.slot, target.version)
                    routing.flip(target)
                if stop.is_set():
                    return
        except Exception as e:
            log.warning("watch of %s/%s failed (%s); retrying", namespace, name, e)
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
