"""kopf handlers: thin glue from Kubernetes events to the :class:`Reconciler`.

Run with ``autoglm operator`` (or ``kopf run -m autoglm.k8s.handlers``). kopf keeps its
bookkeeping in ``autoglm.io/*`` annotations, so the status is ours alone. No finalizer is
added: children carry owner references and the garbage collector removes them, so deleting
a resource never waits on the operator being up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, cast

import kopf
from kubernetes.client.rest import ApiException
from prometheus_client import REGISTRY, start_http_server

from autoglm.k8s.api import Api, error_reason, load_client
from autoglm.k8s.coalesce import Coalescer
from autoglm.k8s.reconcile import EventSink, Reconciler
from autoglm.k8s.router_scaling import RouterAutoscaler
from autoglm.k8s.scaling import Autoscaler
from autoglm.metrics import ControlMetrics
from autoglm.spec import GROUP, KIND, PLURAL, VERSION

RESYNC_SECONDS = float(os.environ.get("AUTOGLM_RESYNC_SECONDS", "30"))
# How often a swap under way is stepped (timeouts, canary retries, drain).
SWAP_TICK_SECONDS = float(os.environ.get("AUTOGLM_SWAP_TICK_SECONDS", "2"))
# How long to trust "the Prometheus Operator's CRDs are (not) installed".
DISCOVERY_SECONDS = float(os.environ.get("AUTOGLM_DISCOVERY_SECONDS", "60"))
# The operator's own metrics (decisions, swaps); 0: not served.
METRICS_PORT = int(os.environ.get("AUTOGLM_METRICS_PORT", "8081"))
METRICS = ControlMetrics(REGISTRY)
_reconciler: Reconciler | None = None
_autoscaler: Autoscaler | None = None
_router_autoscaler: RouterAutoscaler | None = None
_child_changes = Coalescer()


def reconciler() -> Reconciler:
    global _reconciler
    if _reconciler is None:
        _reconciler = Reconciler(Api(load_client()), monitors_ttl=DISCOVERY_SECONDS,
                                 metrics=METRICS)
    return _reconciler


def autoscaler() -> Autoscaler:
    global _autoscaler
    if _autoscaler is None:
        _autoscaler = Autoscaler(reconciler(), METRICS)
    return _autoscaler


def router_autoscaler() -> RouterAutoscaler:
    global _router_autoscaler
    if _router_autoscaler is None:
        _router_autoscaler = RouterAutoscaler(reconciler())
    return _router_autoscaler


def _events(body: kopf.Body) -> EventSink:
    def emit(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)
    return emit


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    # Only our own Events (kopf.event) and warnings: not one per handler run.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.execution.max_workers = int(os.environ.get("AUTOGLM_WORKERS", "8"))
    reconciler()
    if METRICS_PORT:
        start_http_server(METRICS_PORT, registry=REGISTRY)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile(body: kopf.Body, logger: kopf.Logger, reason: str, **_: Any) -> None:
    try:  # reason: kopf.Reason, a str enum ("resume", "create", "update")
        st = reconciler().reconcile(body, _events(body), str(getattr(reason, "value", reason)))
    except ApiException as e:
        raise kopf.TemporaryError(f"API error: {error_reason(e)}", delay=5) from e
    logger.info("reconciled: phase=%s ready=%s", st.phase, st.ready)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(body: kopf.Body, **_: Any) -> None:
    """Repair drift (a child deleted or edited by hand) and refresh status."""
    try:
        reconciler().reconcile(body, _events(body), "resync")
    except ApiException as e:
        raise kopf.TemporaryError(f"API error: {error_reason(e)}", delay=5) from e


def swapping(body: Mapping[str, Any]) -> bool:
    return bool(((body.get("status") or {}).get("swap") or {}).get("phase", "Idle") != "Idle")


def _interval(body: Mapping[str, Any]) -> float:
    scaling = (body.get("spec") or {}).get("autoscaling") or {}
    return float(scaling.get("intervalSeconds", 15))


def _scalers(body: Mapping[str, Any]) -> list[Autoscaler | RouterAutoscaler]:
    """The autoscalers the spec turns on: the experts' (an autoscaling block), the
    routers' (router.autoscaling.enabled)."""
    spec = body.get("spec") or {}
    scaling = spec.get("autoscaling")
    router = (spec.get("router") or {}).get("autoscaling") or {}
    return [*([autoscaler()] if scaling is not None and scaling.get("enabled", True) else []),
            *([router_autoscaler()] if router.get("enabled") else [])]


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10)
async def driver(body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger,
                 **_: Any) -> None:
    """The resource's clock (``body`` is kept current by kopf): steps a swap under way every
    few seconds, and the autoscalers every ``spec.autoscaling.intervalSeconds``."""
    # The first decision one interval in (as HPA's): nothing serves yet at creation, and
    # on an operator restart the replicas stand as they were.
    next_scale = time.monotonic() + _interval(body)
    while not stopped:
        await asyncio.sleep(SWAP_TICK_SECONDS)
        try:
            if swapping(body):
                await asyncio.to_thread(reconciler().reconcile, body, _events(body), "tick")
            if time.monotonic() >= next_scale:
                next_scale = time.monotonic() + _interval(body)
                for scaler in _scalers(body):
                    await asyncio.to_thread(scaler.step, body, _events(body))
        except ApiException as e:
            logger.warning("periodic step failed, retrying: %s", error_reason(e))


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/name": "autoglm"})
def child_changed(body: kopf.Body, **_: Any) -> None:
    """A child Deployment's status moved: refresh the owner's status promptly."""
    owner = next((r for r in body.metadata.get("ownerReferences", [])
                  if r.get("kind") == KIND and r.get("controller")), None)
    if owner is None:
        return
    namespace = body.metadata.namespace or ""

    def step() -> None:
        r = reconciler()
        parent = r.api.get(f"{GROUP}/{VERSION}", KIND, namespace, owner["name"])
        if parent is None or parent["metadata"]["uid"] != owner["uid"]:
            return
        if swapping(parent):  # a standby becoming ready moves the swap on at once
            r.reconcile(parent, _events(kopf.Body(cast(Any, parent))), "child")
        else:
            r.refresh(parent)

    # changes of the same resource's children arriving meanwhile fold into one more step
    _child_changes(owner["uid"], step)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def deleted(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    reconciler().forget(body.metadata.uid)
    autoscaler().forget(body.metadata.uid, body.metadata.namespace or "", body.metadata.name)
    router_autoscaler().forget(body.metadata.uid)
    logger.info("deleted; the garbage collector removes its children")
