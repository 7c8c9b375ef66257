"""The control loop's own metrics (the shared metrics contract), defined once.

The local runtime exports them through its gateway's registry, the Kubernetes operator on
its metrics port; both call the same methods, so the series are the same everywhere. Every
series carries ``deployment``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from autoglm.swap import Phase

PHASES = tuple(p.value for p in Phase)


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: Sequence[str]) -> Gauge:
            return Gauge(name, doc, list(labels), registry=registry)

        def counter(name: str, doc: str, labels: Sequence[str]) -> Counter:
            return Counter(name, doc, list(labels), registry=registry)

        self.replicas = gauge("autoglm_autoscaler_replicas",
                              "Replicas of each expert in the active slot",
                              ["deployment", "expert"])
        self.desired = gauge("autoglm_autoscaler_desired_replicas",
                             "Replicas the autoscaler wants for each expert",
                             ["deployment", "expert"])
        self.load = gauge("autoglm_autoscaler_load_tokens_per_second",
                          "Tokens/s routed to each expert, as the autoscaler saw it",
                          ["deployment", "expert"])
        self.imbalance = gauge("autoglm_autoscaler_imbalance",
                               "(max - mean) / mean of the load per replica across experts",
                               ["deployment"])
        self.metrics_available = gauge("autoglm_autoscaler_metrics_available",
                                       "1 when the autoscaler had the metrics it needs",
                                       ["deployment"])
        self.decisions = counter("autoglm_autoscaler_decisions",
                                 "Replica changes decided, per expert and direction",
                                 ["deployment", "expert", "direction"])
        self.phase = gauge("autoglm_swap_phase",
                           "1 for the current phase of the version swap, 0 for the others",
                           ["deployment", "phase"])
        self.events = counter("autoglm_swap_events", "Swap events (one per report)",
                              ["deployment", "reason"])
        self.active_version = gauge("autoglm_active_version",
                                    "Model version serving traffic", ["deployment"])
        self._experts: dict[str, set[str]] = {}
        self._reasons: dict[str, set[str]] = {}

    def decision(self, deployment: str, current: Sequence[int], desired: Sequence[int],
                 load: Sequence[float | None], imbalance: float, metrics_ok: bool) -> None:
        """One autoscaler decision: counts a decision per expert whose replicas change."""
        self.metrics_available.labels(deployment).set(1 if metrics_ok else 0)
        experts = self._experts.setdefault(deployment, set())
        for i, (c, d) in enumerate(zip(current, desired, strict=True)):
            e = str(i)
            experts.add(e)
            self.replicas.labels(deployment, e).set(c)
            self.desired.labels(deployment, e).set(d)
            if d != c:
                self.decisions.labels(deployment, e, "up" if d > c else "down").inc()
            value = load[i] if i < len(load) else None
            if value is not None:
                self.load.labels(deployment, e).set(value)
        if metrics_ok:
            self.imbalance.labels(deployment).set(imbalance)

    def replicas_now(self, deployment: str, current: Sequence[int]) -> None:
        """Replicas as they are (e.g. once a scaling job has finished)."""
        experts = self._experts.setdefault(deployment, set())
        for i, c in enumerate(current):
            experts.add(str(i))
            self.replicas.labels(deployment, str(i)).set(c)

    def swap(self, deployment: str, phase: str, active_version: int) -> None:
        for p in PHASES:
            self.phase.labels(deployment, p).set(1 if p == phase else 0)
        self.active_version.labels(deployment).set(active_version)

    def swap_event(self, deployment: str, reason: str) -> None:
        self._reasons.setdefault(deployment, set()).add(reason)
        self.events.labels(deployment, reason).inc()

    def forget(self, deployment: str) -> None:
        """Drop every series of a deleted deployment."""
        experts = self._experts.pop(deployment, set())
        for e in experts:
            for g in (self.replicas, self.desired, self.load):
                _remove(g, deployment, e)
            for direction in ("up", "down"):
                _remove(self.decisions, deployment, e, direction)
        for g1 in (self.imbalance, self.metrics_available, self.active_version):
            _remove(g1, deployment)
        for p in PHASES:
            _remove(self.phase, deployment, p)
        for r in self._reasons.pop(deployment, set()):
            _remove(self.events, deployment, r)


def _remove(metric: Gauge | Counter, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set
        metric.remove(*labels)
