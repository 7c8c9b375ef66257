"""Router replicas on Kubernetes (``spec.router.autoscaling``): Prometheus →
:func:`autoglm.router_scale.decide` → the serving slot's router Deployment's replicas.

One step per ``spec.autoscaling.intervalSeconds`` (the resource's driver, k8s/handlers.py),
under the resource's lock (reconciliation's, so status writes never cross), paused while a
swap is under way. Once on, the replicas are the autoscaler's: reconciliation keeps those of
a router Deployment that exists, within the bounds, and starts a new one, a standby being
staged, at the serving slot's count, so a flip never shrinks the tier
(:func:`autoglm.k8s.builders.router_replicas`).

A scale-down drains: the pods removed leave the endpoints, then their preStop hook waits
until their generations end, bounded by ``spec.router.drainSeconds`` (k8s/drain.py,
k8s/builders.py). The stabilization history lives in memory, as HPA's; after a restart it
starts from the current replicas, so no scale-down comes before a whole window.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from autoglm import autoscale, router_scale, swap
from autoglm import plan as p
from autoglm.k8s import rollout
from autoglm.k8s.builders import replicas_of
from autoglm.k8s.reconcile import ROUTER_METRICS_CONDITION as CONDITION
from autoglm.k8s.reconcile import EventSink, Reconciler
from autoglm.k8s.scaling import (
    SCRAPE_SECONDS,
    Current,
    current,
    deciding,
    metrics_condition,
)
from autoglm.prometheus import MetricsError, Prometheus
from autoglm.spec import AutoGLMSpec, RouterStatus, Slot


class RouterAutoscaler:
    def __init__(self, reconciler: Reconciler,
                 prometheus: Callable[[str, float], Prometheus] = Prometheus,
                 wall: Callable[[], float] = time.time) -> None:
        self.r = reconciler
        self.prometheus = prometheus
        self.wall = wall
        self._state: dict[str, autoscale.State] = {}

    def forget(self, uid: str) -> None:
        self._state.pop(uid, None)

    def step(self, body: Mapping[str, Any], emit: EventSink) -> RouterStatus | None:
        """One decision for the resource's serving router tier, applied; None when there is
        nothing to decide."""
        meta = body["metadata"]
        name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
        with deciding(self.r, meta, self._current, self._sample) as got:
            if got is None:
                return None
            (spec, state, live, st), sample, error = got
            slot = state.active_slot
            deployment = p.workload_name(name, slot, "router")
            d = self.r.api.get("apps/v1", "Deployment", ns, deployment)
            if d is None:
                return None  # not provisioned yet
            now, was = self.wall(), st.router if st.router and st.router.slot == slot else None
            cur = replicas_of(d)
            history = self._state.get(uid) or autoscale.State(history=((now, (cur,)),))
            self._state[uid], decision = router_scale.decide(
                router_scale.policy_for(spec), sample, cur, history, now)
            reason = decision.reason if not error else \
                f"{error}: holding {decision.replicas} router replicas"
            last_scale = was.last_scale_time if was is not None else None
            if decision.replicas != cur:
                self.r.api.patch("apps/v1", "Deployment", ns, deployment,
                                 {"spec": {"replicas": decision.replicas}})
                emit("Normal", "RouterScaled", f"{deployment}: {reason}" if decision.metrics_ok
                     else f"{deployment}: {cur} -> {decision.replicas} replicas (within "
                          f"minReplicas and maxReplicas); {reason}")
                last_scale = rollout.rfc3339(now)
            new = RouterStatus(
                slot=slot, replicas=cur,
                ready_replicas=int((d.get("status") or {}).get("readyReplicas") or 0),
                desired_replicas=decision.replicas, metrics_available=decision.metrics_ok,
                reason=reason, last_decision=rollout.rfc3339(now), last_scale_time=last_scale,
                **_observed(sample) if decision.metrics_ok else {})
            conds = metrics_condition(self.r, live, st, CONDITION, new.metrics_available,
                                      reason, was.metrics_available if was else None, emit)
            self.r.write(live, st.model_copy(update={"router": new, "conditions": conds}))
            return new

    def _current(self, name: str, namespace: str, uid: str) -> Current | None:
        """The resource as it is, when its router tier is to be scaled now."""
        found = current(self.r, name, namespace, uid)
        if found is None:
            return None
        spec, state = found[0], found[1]
        if not spec.router.autoscaling.enabled or spec.autoscaling.prometheus_url is None \
                or state.phase is not swap.Phase.IDLE:
            return None  # a swap under way: the standby started at the serving count
        return found

    def _sample(self, spec: AutoGLMSpec, name: str, namespace: str, slot: Slot,
                ) -> tuple[router_scale.RouterSample | None, str]:
        url = spec.autoscaling.prometheus_url
        assert url is not None
        a = spec.router.autoscaling
        try:
            with self.prometheus(url, min(5.0, float(spec.autoscaling.interval_seconds))) \
                    as prom:
                return prom.router_sample(
                    {"deployment": name, "namespace": namespace}, slot,
                    autoscale.rate_window(spec, SCRAPE_SECONDS),
                    waiting=a.waiting_per_replica is not None,
                    ttft=a.ttft_p90_seconds is not None), ""
        except MetricsError as e:
            return None, str(e)


def _observed(sample: router_scale.RouterSample | None) -> dict[str, float | None]:
    """The figures a decision was made on, for the status."""
    if sample is None:
        return {}

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)
    return {"kv_cache_utilization": r(sample.kv_cache_utilization),
            "waiting_per_replica": r(sample.waiting_per_replica),
            "ttft_p90_seconds": r(sample.ttft_p90_seconds)}
