"""The control loop's own metrics (the shared metrics contract), defined once.

The local runtime exports them through its gateway's registry, the Kubernetes operator on
its metrics port; both call the same methods, so the series are the same everywhere. Every
series carries ``namespace`` and ``deployment`` (one operator serves every namespace, and
two resources may share a name; its PodMonitor honours these labels).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from autoglm.swap import Phase

PHASES = tuple(p.value for p in Phase)
Key = tuple[str, str]  # (namespace, name) of the resource
# `autoglm up`'s namespace label (a cluster's series carry their pods' namespace), so the
# dashboard's queries are the same for both.
LOCAL_NAMESPACE = "local"


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: Sequence[str]) -> Gauge:
            return Gauge(name, doc, list(labels), registry=registry)

        def counter(name: str, doc: str, labels: Sequence[str]) -> Counter:
            return Counter(name, doc, list(labels), registry=registry)

        self.replicas = gauge("autoglm_autoscaler_replicas",
                              "Replicas of each expert in the active slot",
                              ["namespace", "deployment", "expert"])
        self.desired = gauge("autoglm_autoscaler_desired_replicas",
                             "Replicas the autoscaler wants for each expert",
                             ["namespace", "deployment", "expert"])
        self.load = gauge("autoglm_autoscaler_load_tokens_per_second",
                          "Tokens/s routed to each expert, as the autoscaler saw it",
                          ["namespace", "deployment", "expert"])
        self.imbalance = gauge("autoglm_autoscaler_imbalance",
                               "(max - mean) / mean of the load per replica across experts",
                               ["namespace", "deployment"])
        self.server_imbalance = gauge("autoglm_placement_imbalance",
                                      "(max - mean) / mean of the load per expert server: "
                                      "what live moves even out", ["namespace", "deployment"])
        self.moves = counter("autoglm_placement_moves",
                             "Live moves of expert replicas between running servers, by "
                             "outcome (done; abandoned: the old replica kept serving)",
                             ["namespace", "deployment", "outcome"])
        self.metrics_available = gauge("autoglm_autoscaler_metrics_available",
                                       "1 when the autoscaler had the metrics it needs",
                                       ["namespace", "deployment"])
        self.decisions = counter("autoglm_autoscaler_decisions",
                                 "Replica changes decided, per expert and direction",
                                 ["namespace", "deployment", "expert", "direction"])
        self.phase = gauge("autoglm_swap_phase",
                           "1 for the current phase of the version swap, 0 for the others",
                           ["namespace", "deployment", "phase"])
        self.events = counter("autoglm_swap_events", "Swap events (one per report)",
                              ["namespace", "deployment", "reason"])
        # evidence that each of the operator's loops is alive and has looked at a resource
        # (tests wait on it instead of sleeping past a period)
        self.reconciles = counter("autoglm_reconciles", "Reconciliations of the resource, by "
                                  "what started them (resume, create, update, resync, tick, "
                                  "child)", ["namespace", "deployment", "trigger"])
        self.active_version = gauge("autoglm_active_version",
                                    "Model version serving traffic", ["namespace", "deployment"])
        self._experts: dict[Key, set[str]] = {}
        self._reasons: dict[Key, set[str]] = {}
        self._triggers: dict[Key, set[str]] = {}

    def decision(self, key: Key, current: Sequence[int], desired: Sequence[int],
                 load: Sequence[float | None], imbalance: float, metrics_ok: bool) -> None:
        """One autoscaler decision: counts a decision per expert whose replicas change."""
        self.metrics_available.labels(*key).set(1 if metrics_ok else 0)
        experts = self._experts.setdefault(key, set())
        for i, (c, d) in enumerate(zip(current, desired, strict=True)):
            e = str(i)
            experts.add(e)
            self.replicas.labels(*key, e).set(c)
            self.desired.labels(*key, e).set(d)
            if d != c:
                self.decisions.labels(*key, e, "up" if d > c else "down").inc()
            value = load[i] if i < len(load) else None
            if value is not None:
                self.load.labels(*key, e).set(value)
        if metrics_ok:
            self.imbalance.labels(*key).set(imbalance)

    def placement(self, key: Key, imbalance: float | None, done: int = 0,
                  abandoned: int = 0) -> None:
        """The servers' imbalance (None: unknown, left as it was) and live moves made."""
        if imbalance is not None:
            self.server_imbalance.labels(*key).set(imbalance)
        self.moves.labels(*key, "done").inc(done)  # 0 too: the series exists from the start
        self.moves.labels(*key, "abandoned").inc(abandoned)

    def replicas_now(self, key: Key, current: Sequence[int]) -> None:
        """Replicas as they are (e.g. once a scaling job has finished)."""
        experts = self._experts.setdefault(key, set())
        for i, c in enumerate(current):
            experts.add(str(i))
            self.replicas.labels(*key, str(i)).set(c)

    def swap(self, key: Key, phase: str, active_version: int) -> None:
        for p in PHASES:
            self.phase.labels(*key, p).set(1 if p == phase else 0)
        self.active_version.labels(*key).set(active_version)

    def reconciled(self, key: Key, trigger: str) -> None:
        self._triggers.setdefault(key, set()).add(trigger)
        self.reconciles.labels(*key, trigger).inc()

    def swap_event(self, key: Key, reason: str) -> None:
        self._reasons.setdefault(key, set()).add(reason)
        self.events.labels(*key, reason).inc()

    def forget(self, key: Key) -> None:
        """Drop every series of a deleted deployment."""
        experts = self._experts.pop(key, set())
        for e in experts:
            for g in (self.replicas, self.desired, self.load):
                _remove(g, *key, e)
            for direction in ("up", "down"):
                _remove(self.decisions, *key, e, direction)
        for g1 in (self.imbalance, self.server_imbalance, self.metrics_available,
                   self.active_version):
            _remove(g1, *key)
        for outcome in ("done", "abandoned"):
            _remove(self.moves, *key, outcome)
        for t in self._triggers.pop(key, set()):
            _remove(self.reconciles, *key, t)
        for p in PHASES:
            _remove(self.phase, *key, p)
        for r in self._reasons.pop(key, set()):
            _remove(self.events, *key, r)


def _remove(metric: Gauge | Counter, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set
        metric.remove(*labels)
