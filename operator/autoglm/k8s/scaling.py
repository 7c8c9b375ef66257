"""Per-expert autoscaling on Kubernetes: Prometheus → :func:`autoscale.decide` → replicas
per expert → :func:`autoglm.placement.place` → the active slot's expert servers (one
Deployment each, naming the experts it holds; reconciliation builds its servers from the
live ones, so it never undoes a decision). Servers no longer needed retire: they keep
serving until every other server has rolled out, then they are deleted.

One step per ``spec.autoscaling.intervalSeconds``, under the resource's lock (the same as
reconciliation's, so status writes never cross). Scaling pauses while a swap is under way:
the standby copied the active slot's counts when it was created. The stabilization history
lives in memory, as HPA's does; after a restart it starts from the current replicas, so no
scale-down comes before a full window has passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from autoglm import autoscale, swap
from autoglm import plan as p
from autoglm.k8s import builders, rollout, status
from autoglm.k8s.converge import converge
from autoglm.k8s.reconcile import EventSink, Manifest, Reconciler
from autoglm.metrics import ControlMetrics
from autoglm.placement import Placement, PlacementError, place
from autoglm.prometheus import MetricsError, Prometheus
from autoglm.spec import (
    API_VERSION,
    KIND,
    AutoGLMSpec,
    AutoGLMStatus,
    AutoscalingStatus,
    ExpertStatus,
    InvalidSpec,
    parse,
    parse_status,
)

SCRAPE_SECONDS = 5.0  # the PodMonitor's interval (k8s/builders.py)


class Autoscaler:
    def __init__(self, reconciler: Reconciler, metrics: ControlMetrics,
                 prometheus: Callable[[str, float], Prometheus] = Prometheus,
                 wall: Callable[[], float] = time.time) -> None:
        self.r = reconciler
        self.metrics = metrics
        self.prometheus = prometheus
        self.wall = wall
        self._state: dict[str, autoscale.State] = {}

    def forget(self, uid: str, namespace: str, name: str) -> None:
        self._state.pop(uid, None)
        self.metrics.forget((namespace, name))

    def step(self, body: Mapping[str, Any], emit: EventSink) -> AutoscalingStatus | None:
        """One decision for the resource, applied; None when there is nothing to decide."""
        meta = body["metadata"]
        name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
        found = self._current(name, ns, uid)
        if found is None:
            return None
        spec, state = found[0], found[1]
        # Prometheus is asked outside the lock: a slow answer never holds up a swap.
        sample, error = self._sample(spec, name, ns, state.active_slot)
        with self.r.lock(uid):
            again = self._current(name, ns, uid)
            if again is None or again[1].active_slot != state.active_slot:
                return None
            spec, state, live, st = again
            deployments = self.r.deployments(name, ns)
            layout = rollout.live_servers(name, state.active_slot, deployments)
            if layout is None:
                return None  # not provisioned yet
            servers, serving = layout
            placement = Placement(servers[:serving])
            names = [p.workload_name(name, state.active_slot, "expert", s)
                     for s in range(len(servers))]
            up = [status.deployment_available(deployments[n]) for n in names]
            n_experts = spec.model.num_experts
            current = placement.replicas(n_experts)
            ready = [sum(up[s] for s in range(serving) if e in servers[s])
                     for e in range(n_experts)]
            now = self.wall()
            history = self._state.get(uid) or autoscale.State(history=((now, tuple(current)),))
            self._state[uid], d = autoscale.decide(history, current, sample, now,
                                                   autoscale.policy_for(spec), ready=ready)
            load = sample.tokens_per_s if sample is not None else (None,) * len(current)
            if list(d.desired) != current:
                try:
                    fits = rollout.fits_per_server(spec, st, state.active_slot, ())
                    target = place(list(d.desired), p.experts_per_server(spec, fits),
                                   load if d.metrics_ok else (), current=placement)
                except PlacementError as e:  # the servers as they are keep serving
                    emit("Warning", "PlacementFailed", f"{e}; replicas held")
                else:
                    self._place(live, spec, state, target, servers, deployments, emit)
            elif serving < len(servers) and all(up[:serving]):
                for s in range(serving, len(servers)):  # their experts serve elsewhere now
                    if self.r.api.delete("apps/v1", "Deployment", ns, names[s]):
                        emit("Normal", "Deleted", f"deleted Deployment {names[s]}: expert "
                             f"server {s} retired, its experts serve on the others")
            for change in d.changes:
                emit("Normal", "Scaled", change)
            imbalance = (autoscale.imbalance([x or 0.0 for x in load], current)
                         if d.metrics_ok else None)
            self.metrics.decision((ns, name), current, d.desired, load, imbalance or 0.0,
                                  d.metrics_ok)
            new = AutoscalingStatus(
                metrics_available=d.metrics_ok, reason=error or d.reason,
                imbalance=round(imbalance, 3) if imbalance is not None else None,
                last_decision=rollout.rfc3339(now),
                experts=[ExpertStatus(expert=i, replicas=c, ready_replicas=r, desired=w,
                                      load=round(x, 1) if x is not None else None)
                         for i, (c, r, w, x) in enumerate(zip(current, ready, d.desired, load,
                                                              strict=True))])
            self._write(live, st, new, emit)
            return new

    def _place(self, live: Mapping[str, Any], spec: AutoGLMSpec, state: swap.SwapState,
               target: Placement, servers: tuple[frozenset[int], ...],
               deployments: Mapping[str, Manifest], emit: EventSink) -> None:
        """Serve ``target``: its servers created or changed (a change rolls with a surge:
        the new pod serves before the old one goes); servers it no longer needs marked
        retiring, deleted by a later step once every other server has rolled out."""
        meta = live["metadata"]
        name, ns = meta["name"], meta["namespace"]
        plan = p.slot_plan(name, spec, state.active_slot, state.active_version,
                           target.servers)
        owner = builders.owner_reference(name, meta["uid"])
        desired = [o for w in plan.servers
                   for o in builders.workload_objects(name, ns, owner, spec, w)]
        observed = {("Deployment", n): d for n, d in deployments.items()}
        for c in converge(self.r.api, meta["uid"], desired, observed):
            emit("Normal", c.action.capitalize(), str(c))
        for w in plan.servers:
            d = deployments.get(w.name)
            if d is not None and status.retiring(d):
                self.r.api.patch("apps/v1", "Deployment", ns, w.name,
                                 {"metadata": {"annotations": {status.RETIRING: None}}})
        for s in range(len(plan.servers), len(servers)):
            w_name = p.workload_name(name, state.active_slot, "expert", s)
            if not status.retiring(deployments.get(w_name)):
                self.r.api.patch("apps/v1", "Deployment", ns, w_name,
                                 {"metadata": {"annotations": {status.RETIRING: "true"}}})
        emit("Normal", "Placed", f"{len(plan.servers)} expert server(s): "
             + "; ".join(f"{w.server}: {p.format_server_experts(w.experts)}"
                         for w in plan.servers))

    def _current(self, name: str, namespace: str, uid: str,
                 ) -> tuple[AutoGLMSpec, swap.SwapState, dict[str, Any], AutoGLMStatus] | None:
        """The resource as it is, when the autoscaler has something to decide for it."""
        live = self.r.api.get(API_VERSION, KIND, namespace, name)
        if live is None or live["metadata"]["uid"] != uid:
            return None
        try:
            spec = parse(live.get("spec") or {}, name)
        except InvalidSpec:
            return None  # reported by reconciliation
        st = parse_status(live.get("status"))
        state = rollout.from_status(st, spec)
        self.metrics.swap((namespace, name), state.phase.value, state.active_version)
        if not spec.autoscaling.enabled or spec.autoscaling.prometheus_url is None \
                or state.phase is not swap.Phase.IDLE:
            return None  # scaling pauses during a swap: the standby copied the counts
        return spec, state, live, st

    def _sample(self, spec: AutoGLMSpec, name: str, namespace: str, slot: str,
                ) -> tuple[autoscale.Sample | None, str]:
        url = spec.autoscaling.prometheus_url
        assert url is not None
        timeout = min(5.0, float(spec.autoscaling.interval_seconds))
        try:
            with self.prometheus(url, timeout) as prom:
                return prom.expert_sample({"deployment": name, "namespace": namespace}, slot,
                                          spec.model.num_experts,
                                          autoscale.rate_window(spec, SCRAPE_SECONDS)), ""
        except MetricsError as e:
            return None, f"{e}; holding replicas"

    def _write(self, live: Mapping[str, Any], st: AutoGLMStatus, new: AutoscalingStatus,
               emit: EventSink) -> None:
        was = st.autoscaling
        if was is None or was.metrics_available != new.metrics_available:
            if new.metrics_available:
                emit("Normal", "MetricsAvailable", "the autoscaler has its metrics")
            else:
                emit("Warning", "MetricsUnavailable", new.reason)
        conds = status.set_condition(
            st.conditions, "MetricsAvailable", "True" if new.metrics_available else "False",
            "MetricsFresh" if new.metrics_available else "MetricsUnavailable",
            "" if new.metrics_available else new.reason,
            live["metadata"].get("generation"), self.r.clock())
        self.r.write(live, st.model_copy(update={"autoscaling": new, "conditions": conds}))
