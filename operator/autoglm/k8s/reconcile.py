"""One reconciliation of an AutoGLMDeployment: spec → plan → objects → status.

kopf handlers call :meth:`Reconciler.reconcile` (create, update, resume, periodic resync)
and :meth:`Reconciler.refresh` (a child Deployment changed). Both are idempotent and may
run concurrently for one resource; a per-resource lock serializes them.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kubernetes.client.rest import ApiException

from autoglm import canary, swap
from autoglm import plan as p
from autoglm.k8s import builders, rollout, status
from autoglm.k8s.api import Api, error_reason
from autoglm.k8s.converge import (
    Change,
    ObjectConflict,
    converge,
    named,
    observe,
    prune,
    selector,
)
from autoglm.metrics import ControlMetrics
from autoglm.prometheus import MetricsError, Prometheus
from autoglm.spec import (
    API_VERSION,
    KIND,
    AutoGLMSpec,
    AutoGLMStatus,
    InvalidSpec,
    parse,
    parse_status,
)

# (type "Normal"|"Warning", reason, message) → posted as an Event on the resource.
EventSink = Callable[[str, str, str], None]
Manifest = dict[str, Any]
MONITORING_API = "monitoring.coreos.com/v1"
ROUTER_METRICS_CONDITION = "RouterMetricsAvailable"  # the router autoscaler's


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(self, api: Api, clock: Callable[[], str] = now_iso,
                 monitors_ttl: float = 60.0, wall: Callable[[], float] = time.time,
                 canary: rollout.Canary = canary.check,
                 metrics: ControlMetrics | None = None) -> None:
        self.api = api
        self.metrics = metrics
        self.clock = clock
        self.wall = wall  # the swap's clock: its times are kept in status, across restarts
        self.canary = canary
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._monitors: tuple[float, bool] | None = None
        self._monitors_ttl = monitors_ttl

    def lock(self, uid: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(uid, threading.Lock())

    def forget(self, uid: str) -> None:
        with self._locks_guard:
            self._locks.pop(uid, None)

    def monitors_available(self) -> bool:
        """Whether the Prometheus Operator's CRDs are installed (cached for a minute)."""
        now = time.monotonic()
        if self._monitors is None or now - self._monitors[0] > self._monitors_ttl:
            self._monitors = (now, self.api.has_group_version(MONITORING_API))
        return self._monitors[1]

    # -- entry points ------------------------------------------------------------------------

    def reconcile(self, body: Mapping[str, Any], emit: EventSink,
                  trigger: str = "event") -> AutoGLMStatus:
        """Step the swap, apply the plan and record status. Raises ApiException on transient
        API errors (after recording them), so the caller can retry. ``trigger``: what asked
        (a label of ``autoglm_reconciles_total``)."""
        meta = body["metadata"]
        with self.lock(meta["uid"]):
            # Handlers may hold an older copy: decide from the object as it is now.
            live = self.api.get(API_VERSION, KIND, meta["namespace"], meta["name"])
            if live is None or live["metadata"]["uid"] != meta["uid"]:
                return parse_status(body.get("status"))  # deleted meanwhile
            body = live
            spec = self._parse(body, emit)
            if spec is None:
                return parse_status(body.get("status"))
            prev = parse_status(body.get("status"))
            state = rollout.from_status(prev, spec)
            observed = observe(self.api, meta["name"], meta["namespace"])
            deployments = named(observed, "Deployment")
            # Pods matter only to a standby being staged (its crash check) and to workloads
            # not available (an expert server's refusal says how many experts fit it).
            listed = state.phase in rollout.STAGED or not all(
                status.deployment_available(d) for d in deployments.values())
            pods = (self.api.list("v1", "Pod", meta["namespace"], selector(meta["name"]))
                    if listed else [])
            state, reports = rollout.advance(meta["name"], meta["namespace"], spec, state,
                                             deployments, pods, self.wall(), self.canary,
                                             self._inflight(meta, spec, state))
            for r in reports:
                emit("Warning" if r.warning else "Normal", r.reason, r.message)
                if self.metrics is not None:
                    self.metrics.swap_event((meta["namespace"], meta["name"]), r.reason)
            if self.metrics is not None:
                self.metrics.swap((meta["namespace"], meta["name"]), state.phase.value,
                                   state.active_version)
                self.metrics.reconciled((meta["namespace"], meta["name"]), trigger)
            topology = p.plan(meta["name"], spec, rollout.routing(meta["name"], spec, state,
                                                                  prev, deployments, pods))
            self._fitted(topology, prev, spec, emit)
            swap_status = rollout.to_status(state)
            if swap_status != prev.swap:
                # The new state first (the flip itself, for the gateways); objects follow.
                prev = self._status(body, spec, topology, prev, deployments, None, state,
                                    converged=False, pods=pods if listed else None)
            desired = builders.desired_objects(meta["name"], meta["namespace"], meta["uid"],
                                               spec, topology, self.monitors_available())
            # the router replicas are the autoscaler's when it runs (k8s/router_scaling.py)
            desired = builders.router_replicas(spec, topology, desired, deployments)
            error: tuple[str, str] | None = None
            failure: ApiException | None = None
            changes: list[Change] = []
            try:
                changes = converge(self.api, meta["uid"], desired, observed)
                changes += prune(self.api, meta["namespace"], meta["uid"], desired, observed)
            except ObjectConflict as e:
                error = ("ObjectConflict", str(e))
            except ApiException as e:
                error, failure = ("ApplyFailed", error_reason(e)), e
            self._forget_moves(meta["namespace"], desired, deployments)
            for c in changes:
                emit("Normal", c.action.capitalize(), str(c))
            if error is not None:
                emit("Warning", error[0], error[1])
            if changes:
                deployments = self.deployments(meta["name"], meta["namespace"])
            new = self._status(body, spec, topology, prev, deployments, error, state,
                               pods=pods if listed else None)
            if failure is not None:
                raise failure
            return new

    def refresh(self, body: Mapping[str, Any]) -> AutoGLMStatus:
        """Recompute status only (a child changed); never touches serving objects."""
        meta = body["metadata"]
        with self.lock(meta["uid"]):
            live = self.api.get(API_VERSION, KIND, meta["namespace"], meta["name"])
            if live is None or live["metadata"]["uid"] != meta["uid"]:
                return parse_status(body.get("status"))  # deleted meanwhile
            body = live
            prev = parse_status(body.get("status"))
            try:
                spec = parse(body["spec"], meta["name"])
            except InvalidSpec:
                return prev
            deployments = self.deployments(meta["name"], meta["namespace"])
            state = rollout.from_status(prev, spec)
            topology = p.plan(meta["name"], spec, rollout.routing(meta["name"], spec, state,
                                                                  prev, deployments))
            degraded = next((c for c in prev.conditions
                             if c.type == "Degraded" and c.status == "True"
                             and c.reason in ("ObjectConflict", "ApplyFailed")), None)
            error = (degraded.reason, degraded.message) if degraded else None
            return self._status(body, spec, topology, prev, deployments, error, state,
                                converged=False)

    # -- steps -----------------------------------------------------------------------------

    def _parse(self, body: Mapping[str, Any], emit: EventSink) -> AutoGLMSpec | None:
        meta = body["metadata"]
        try:
            return parse(body.get("spec") or {}, meta["name"])
        except InvalidSpec as e:
            prev = parse_status(body.get("status"))
            new = status.invalid_status(prev, meta.get("generation"), str(e), self.clock())
            if new != prev:
                emit("Warning", "InvalidSpec", f"{e}; serving objects left unchanged")
                self.write(body, new)
            return None

    def _inflight(self, meta: Mapping[str, Any], spec: AutoGLMSpec,
                  state: swap.SwapState) -> int | None:
        """The gateways' in-flight requests on the slot being drained, from Prometheus when
        the spec names one; None (unknown: drain for the whole timeout) otherwise."""
        url = spec.autoscaling.prometheus_url
        if state.phase is not swap.Phase.DRAINING or state.previous is None or url is None:
            return None
        try:
            with Prometheus(url, timeout=3.0) as prom:
                return prom.gateway_inflight(
                    {"deployment": meta["name"], "namespace": meta["namespace"]},
                    state.previous.slot, state.since)
        except MetricsError:
            return None

    def deployments(self, name: str, namespace: str) -> dict[str, Manifest]:
        """The resource's Deployments by name."""
        return {d["metadata"]["name"]: d
                for d in self.api.list("apps/v1", "Deployment", namespace, selector(name))}

    def _status(self, body: Mapping[str, Any], spec: AutoGLMSpec, topology: p.Topology,
                prev: AutoGLMStatus, deployments: Mapping[str, Manifest],
                error: tuple[str, str] | None, state: swap.SwapState,
                converged: bool = True,
                pods: Sequence[Manifest] | None = None) -> AutoGLMStatus:
        """``converged``: the objects were applied for this generation; otherwise the status
        keeps the generation it last described (a Ready computed from objects not yet
        updated must not claim the new generation). ``pods``: the resource's, when already
        listed."""
        meta = body["metadata"]
        generation = meta.get("generation") if converged else prev.observed_generation
        new = status.observed_status(prev, generation, topology, dict(deployments),
                                     meta["name"], spec.model.version, error, self.clock(),
                                     state, rollout.to_status(state),
                                     self._pod_failures(meta, topology, deployments, pods),
                                     rollout.memory_limit(spec))
        if not spec.router.autoscaling.enabled:  # what the router autoscaler said is past
            new = new.model_copy(update={"router": None, "conditions": [
                c for c in new.conditions if c.type != ROUTER_METRICS_CONDITION]})
        if new != prev:
            self.write(body, new)
        return new

    def _forget_moves(self, namespace: str, desired: Sequence[Manifest],
                      deployments: Mapping[str, Manifest]) -> None:
        """An expert server whose template now boots another set (the spec placed it again)
        holds that set: what live moves had made of it no longer applies."""
        for m in desired:
            d = deployments.get(m["metadata"]["name"])
            if m["kind"] == "Deployment" and status.live_experts(d) is not None \
                    and rollout.server_experts(m) != rollout.server_experts(d or {}):
                self.api.patch("apps/v1", "Deployment", namespace, m["metadata"]["name"],
                               {"metadata": {"annotations": {status.LIVE_EXPERTS: None}}})

    @staticmethod
    def _fitted(topology: p.Topology, prev: AutoGLMStatus, spec: AutoGLMSpec,
                emit: EventSink) -> None:
        """An Event when a slot's servers are found to hold fewer experts than placed."""
        for plan in topology.slots:
            was = rollout.fits_per_server(spec, prev, plan.slot, ())  # what status kept
            if plan.fits is not None and plan.fits != was:
                emit("Warning", "ExpertsDoNotFit",
                     f"slot {plan.slot}: an expert server has room for {plan.fits} experts "
                     f"within limits.memory {rollout.memory_limit(spec)}: placing at most "
                     f"{max(plan.fits, 1)} on each server")

    def _pod_failures(self, meta: Mapping[str, Any], topology: p.Topology,
                      deployments: Mapping[str, Manifest],
                      pods: Sequence[Manifest] | None = None) -> list[str]:
        """Why the serving slot's workloads that are not available fail, from their pods
        (e.g. an expert server whose experts do not fit its memory limit, in its one-line
        termination message); pods are listed, unless given, only when one is not
        available."""
        down = [w for w in topology.active_plan.workloads
                if not status.deployment_available(deployments.get(w.name))]
        if not down:
            return []
        if pods is None:
            pods = self.api.list("v1", "Pod", meta["namespace"], selector(meta["name"]))
        out = []
        for w in down:
            sel = builders.selector(meta["name"], w.component, w.slot, w.server).items()
            why = rollout.pod_failure([x for x in pods
                                       if sel <= x["metadata"].get("labels", {}).items()])
            if why is not None:
                out.append(f"{w.name}: {why}")
        return out

    def write(self, body: Mapping[str, Any], st: AutoGLMStatus) -> None:
        meta = body["metadata"]
        new = st.model_dump(mode="json", by_alias=True, exclude_none=True)
        self.api.patch(API_VERSION, KIND, meta["namespace"], meta["name"],
                       {"status": merge_patch(body.get("status") or {}, new)},
                       subresource="status")


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` as a JSON merge patch over ``old``: keys gone from ``new`` become null, so a
    retired slot or a cleared field leaves the status too (lists are replaced whole)."""
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        was = old.get(k)
        out[k] = merge_patch(was, v) if isinstance(v, dict) and isinstance(was, dict) else v
    return out
