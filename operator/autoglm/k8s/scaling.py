"""Per-expert autoscaling on Kubernetes: Prometheus → :func:`autoscale.decide` → replicas
per expert → :func:`autoglm.placement.place` → the active slot's expert servers (one
Deployment each, naming the experts it holds; reconciliation builds its servers from the
live ones, so it never undoes a decision).

A new placement is served live when every serving pod answers (k8s/rebalancing.py): the
servers there load and drop experts with no restart, a server added boots holding its
experts, and a server no longer needed retires: it serves on until its experts serve
elsewhere, is told to drop them (the routers stop asking it), and is deleted once it
reports nothing. Otherwise (a pod that does not answer) the servers roll, the new pod
serving before the old one goes. With the replicas kept, a rebalance moves a few experts
live when the servers' load is uneven.

One step per ``spec.autoscaling.intervalSeconds``, under the resource's lock (the same as
reconciliation's, so status writes never cross). Scaling pauses while a swap is under way:
the standby copied the active slot's counts when it was created. The stabilization history
lives in memory, as HPA's does; after a restart it starts from the current replicas, so no
scale-down comes before a full window has passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from autoglm import autoscale, swap
from autoglm import plan as p
from autoglm.k8s import builders, rebalancing, rollout, status
from autoglm.k8s.converge import converge, selector
from autoglm.k8s.reconcile import EventSink, Manifest, Reconciler
from autoglm.metrics import ControlMetrics
from autoglm.placement import (
    MOVES_PER_REBALANCE,
    Move,
    Placement,
    PlacementError,
    balancedness,
    moves_between,
    place,
    progress,
    rebalance,
    server_loads,
)
from autoglm.placement import imbalance as placement_imbalance
from autoglm.prometheus import MetricsError, Prometheus
from autoglm.spec import (
    API_VERSION,
    KIND,
    AutoGLMSpec,
    AutoGLMStatus,
    AutoscalingStatus,
    Condition,
    ExpertStatus,
    InvalidSpec,
    RebalanceStatus,
    Slot,
    parse,
    parse_status,
)

SCRAPE_SECONDS = 5.0  # the PodMonitor's interval (k8s/builders.py)
MOVE_TIMEOUT_SECONDS = 120  # a rebalance's moves not done by then are given up


Current = tuple[AutoGLMSpec, swap.SwapState, dict[str, Any], AutoGLMStatus]
S = TypeVar("S")  # what an autoscaler reads from Prometheus


def current(r: Reconciler, name: str, namespace: str, uid: str) -> Current | None:
    """The resource as it is now (its spec, swap state, object and status); None when it
    is gone, or its spec is invalid (reported by reconciliation)."""
    live = r.api.get(API_VERSION, KIND, namespace, name)
    if live is None or live["metadata"]["uid"] != uid:
        return None
    try:
        spec = parse(live.get("spec") or {}, name)
    except InvalidSpec:
        return None
    st = parse_status(live.get("status"))
    return spec, rollout.from_status(st, spec), live, st


@contextmanager
def deciding(r: Reconciler, meta: Mapping[str, Any],
             now: Callable[[str, str, str], Current | None],
             sample: Callable[[AutoGLMSpec, str, str, Slot], tuple[S | None, str]],
             ) -> Iterator[tuple[Current, S | None, str] | None]:
    """Under the resource's lock, the resource as it is now (``now``: when there is
    something to decide), the metrics (``sample``: what they say, or why not) and why not;
    None when there is nothing to decide. Prometheus is asked outside the lock, so a slow
    answer never holds up a swap; the decision waits if the serving slot changed
    meanwhile."""
    name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
    found = now(name, ns, uid)
    if found is None:
        yield None
        return
    got, error = sample(found[0], name, ns, found[1].active_slot)
    with r.lock(uid):
        again = now(name, ns, uid)
        yield (None if again is None or again[1].active_slot != found[1].active_slot
               else (again, got, error))


def metrics_condition(r: Reconciler, live: Mapping[str, Any], st: AutoGLMStatus, type_: str,
                      available: bool, reason: str, was: bool | None,
                      emit: EventSink) -> list[Condition]:
    """The conditions with ``type_`` saying whether an autoscaler has its metrics (and if
    not, why); an Event when that changes (``was``: what it said before, None: nothing)."""
    if was is None or was != available:
        if available:
            emit("Normal", type_, "the autoscaler has its metrics")
        else:
            emit("Warning", type_.replace("Available", "Unavailable"), reason)
    return status.set_condition(
        st.conditions, type_, "True" if available else "False",
        "MetricsFresh" if available else "MetricsUnavailable", "" if available else reason,
        live["metadata"].get("generation"), r.clock())


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
        with deciding(self.r, meta, self._current, self._sample) as got:
            if got is None:
                return None
            (spec, state, live, st), sample, error = got
            deployments = self.r.deployments(name, ns)
            layout = rollout.live_servers(name, state.active_slot, deployments)
            if layout is None:
                return None  # not provisioned yet
            servers, serving = layout
            held_now, _ = rollout.live_servers(name, state.active_slot, deployments,
                                               moved=True) or layout
            placement = Placement(held_now[:serving])
            names = [p.workload_name(name, state.active_slot, "expert", s)
                     for s in range(len(servers))]
            up = [status.deployment_available(deployments[n]) for n in names]
            n_experts = spec.model.num_experts
            current = placement.replicas(n_experts)
            ready = [sum(up[s] for s in range(serving) if e in held_now[s])
                     for e in range(n_experts)]
            now = self.wall()
            history = self._state.get(uid) or autoscale.State(history=((now, tuple(current)),))
            self._state[uid], d = autoscale.decide(history, current, sample, now,
                                                   autoscale.policy_for(spec), ready=ready)
            load = sample.tokens_per_s if sample is not None else (None,) * len(current)
            was = st.autoscaling or AutoscalingStatus(metrics_available=False)
            moving = was.rebalance if was.rebalance is not None \
                and was.rebalance.slot == state.active_slot else None
            fits = rollout.fits_per_server(spec, st, state.active_slot, ())
            capacity = p.experts_per_server(spec, fits)
            busy = moving is not None
            if moving is not None or held_now != servers:
                # moves under way, or pods to keep on the moved placement (one restarted)
                moving, was = self._moves(live, spec, state.active_slot, servers[:serving],
                                          placement, moving, was, now, emit)
            if busy:
                pass  # the next change waits for the moves under way, and what they made
            elif serving < len(servers) and all(up[:serving]) and self._drained(
                    live, state.active_slot, placement, len(servers)):
                for s in range(serving, len(servers)):  # their experts serve elsewhere now
                    if self.r.api.delete("apps/v1", "Deployment", ns, names[s]):
                        emit("Normal", "Deleted", f"deleted Deployment {names[s]}: expert "
                             f"server {s} retired, its experts serve on the others")
            elif list(d.desired) != current and serving == len(servers):
                # (a change waits for the retiring servers to go)
                # more replicas that fit the servers there are stay on them (added live);
                # otherwise the fewest servers that hold them
                room = sum(d.desired) <= serving * capacity and max(d.desired) <= serving
                grows = sum(d.desired) > sum(current)
                try:
                    target = place(list(d.desired), capacity,
                                   load if d.metrics_ok else (), current=placement,
                                   servers=serving if room and grows else None)
                except PlacementError as e:  # the servers as they are keep serving
                    emit("Warning", "PlacementFailed", f"{e}; replicas held")
                else:
                    why = self._unreachable(live, state.active_slot, serving)
                    if why:
                        emit("Normal", "PlacingByRollout",
                             f"replicas placed by rolling the expert servers: {why}")
                        self._place(live, spec, state, target, servers, deployments, emit)
                    else:
                        moving, was = self._reshape(live, spec, state, placement, target,
                                                    servers, (current, list(d.desired)),
                                                    load, was, now, emit)
            elif d.metrics_ok and serving == len(servers) and all(up) and (
                    was.last_rebalance_time is None or now - rollout.epoch(
                        was.last_rebalance_time) >= autoscale.rebalance_interval(
                            spec, SCRAPE_SECONDS)):
                r = rebalance(current, capacity, load, placement, servers=serving,
                              max_moves=MOVES_PER_REBALANCE)
                if r.acted and r.moves and not self._unreachable(live, state.active_slot,
                                                                 serving):
                    emit("Normal", "Rebalancing",
                         f"imbalance {r.imbalance_before:.2f} -> {r.imbalance_after:.2f}: "
                         f"{rebalancing.describe(r.moves)}")
                    moving = RebalanceStatus(
                        slot=state.active_slot, since=rollout.rfc3339(now),
                        moves=rebalancing.from_moves(r.moves),
                        imbalance_before=round(r.imbalance_before, 3),
                        imbalance_after=round(r.imbalance_after, 3))
                    moving, was = self._moves(live, spec, state.active_slot,
                                              servers[:serving], placement, moving, was, now,
                                              emit)
            for change in d.changes:
                emit("Normal", "Scaled", change)
            imbalance = (autoscale.imbalance([x or 0.0 for x in load], current)
                         if d.metrics_ok else None)
            per_server = server_loads(placement, current, load) if d.metrics_ok else None
            self.metrics.decision((ns, name), current, d.desired, load, imbalance or 0.0,
                                  d.metrics_ok)
            before = st.autoscaling or AutoscalingStatus(metrics_available=False)
            self.metrics.placement(
                (ns, name), placement_imbalance(per_server) if per_server else None,
                was.moves - before.moves, was.moves_abandoned - before.moves_abandoned)
            new = was.model_copy(update=dict(
                metrics_available=d.metrics_ok, reason=error or d.reason,
                imbalance=round(imbalance, 3) if imbalance is not None else None,
                server_imbalance=round(placement_imbalance(per_server), 3)
                if per_server else None,
                balancedness=round(balancedness(per_server), 3) if per_server else None,
                last_decision=rollout.rfc3339(now), rebalance=moving,
                experts=[ExpertStatus(expert=i, replicas=c, ready_replicas=r, desired=w,
                                      load=round(x, 1) if x is not None else None)
                         for i, (c, r, w, x) in enumerate(zip(current, ready, d.desired, load,
                                                              strict=True))]))
            self._write(live, st, new, emit)
            return new

    def _reshape(self, live: Mapping[str, Any], spec: AutoGLMSpec, state: swap.SwapState,
                 placement: Placement, target: Placement,
                 servers: tuple[frozenset[int], ...], counts: tuple[list[int], list[int]],
                 load: Sequence[float | None], was: AutoscalingStatus, now: float,
                 emit: EventSink) -> tuple[RebalanceStatus | None, AutoscalingStatus]:
        """Serve ``target`` with no pod restarted: the serving servers load and drop
        experts live; a server ``target`` adds boots holding its experts (a new
        Deployment), and its moves are done once its pods report them; a server it no
        longer needs retires at once (it serves on, outside the placement, until its
        experts serve elsewhere and a later step deletes it)."""
        meta = live["metadata"]
        name, ns, slot = meta["name"], meta["namespace"], state.active_slot
        serving, n = len(placement.servers), len(target.servers)
        plan = p.slot_plan(name, spec, slot, state.active_version, target.servers)
        owner = builders.owner_reference(name, meta["uid"])
        added = [o for w in plan.servers[serving:]
                 for o in builders.workload_objects(name, ns, owner, spec, w)]
        for c in converge(self.r.api, meta["uid"], added, {}):
            emit("Normal", c.action.capitalize(), str(c))
        for s in range(n, serving):
            self.r.api.patch("apps/v1", "Deployment", ns, p.workload_name(name, slot, "expert", s),
                             {"metadata": {"annotations": {status.RETIRING: "true"}}})
        # a retiring server's copies leave with it: to the servers kept, a move from it is
        # a new replica, and a replica it alone drops needs nothing
        changes = tuple(Move(m.expert, m.source if m.source is not None and m.source < n
                             else None, m.target)
                        for m in moves_between(placement, target)
                        if m.target is not None or (m.source is not None and m.source < n))
        empty: tuple[frozenset[int], ...] = (frozenset(),) * max(0, n - serving)
        kept = Placement(placement.servers[:n] + empty)
        templates = servers[:min(n, serving)] + target.servers[serving:]
        grew = f"; expert server(s) {serving}-{n - 1} added" if n > serving else ""
        shrank = f"; expert server(s) {n}-{serving - 1} retiring" if n < serving else ""
        emit("Normal", "Placing", f"live: {rebalancing.describe(changes)}{grew}{shrank}")
        before, after = counts
        moving = RebalanceStatus(
            slot=slot, since=rollout.rfc3339(now), moves=rebalancing.from_moves(changes),
            imbalance_before=round(placement_imbalance(server_loads(placement, before, load)),
                                   3),
            imbalance_after=round(placement_imbalance(server_loads(target, after, load)), 3))
        return self._moves(live, spec, slot, templates, kept, moving, was, now, emit)

    def _addresses(self, live: Mapping[str, Any], slot: Slot, servers: int,
                   ) -> list[list[str]]:
        """The HTTP address of each running pod of the slot's first ``servers`` servers."""
        meta = live["metadata"]
        pods = self.r.api.list("v1", "Pod", meta["namespace"], selector(meta["name"]))
        return rebalancing.pod_addresses(meta["name"], meta["namespace"], slot, servers, pods)

    def _drained(self, live: Mapping[str, Any], slot: Slot, placement: Placement,
                 servers: int) -> bool:
        """Whether the retiring servers (those past ``placement``) serve nothing: their
        pods are told to drop each expert that every pod of a serving server reports (the
        routers stop asking them at once), and they are done once none reports anything
        (a pod that does not answer serves nothing either)."""
        addresses = self._addresses(live, slot, servers)
        held = rebalancing.reports(addresses)
        serving = len(placement.servers)
        rest: tuple[frozenset[int], ...] = (frozenset(),) * (servers - serving)
        step = progress(Placement(placement.servers + rest), (), held)
        rebalancing.send(addresses, {k: o for k, o in step.orders.items() if k[0] >= serving})
        return not any(r for pods_of in held[serving:] for r in pods_of)

    def _unreachable(self, live: Mapping[str, Any], slot: Slot, servers: int) -> str:
        """Why the slot's serving expert server pods cannot be moved live ("" when every
        one answers: each move must hear its target's pods report what they load)."""
        addresses = self._addresses(live, slot, servers)
        if not all(addresses):
            return f"expert server {[bool(a) for a in addresses].index(False)} has no " \
                   "running pod"
        for server in addresses:
            for a in server:
                held, why = rebalancing.control(a)
                if held is None:
                    return why
        return ""

    def _moves(self, live: Mapping[str, Any], spec: AutoGLMSpec, slot: Slot,
               templates: tuple[frozenset[int], ...], placement: Placement,
               moving: RebalanceStatus | None, was: AutoscalingStatus, now: float,
               emit: EventSink) -> tuple[RebalanceStatus | None, AutoscalingStatus]:
        """One step of the moves under way (and of pods kept on the moved placement), from
        what every pod reports: orders sent, the placement served now recorded on each
        server's Deployment; moves not done in time given up (the old replica serves on)."""
        meta = live["metadata"]
        name, ns = meta["name"], meta["namespace"]
        addresses = self._addresses(live, slot, len(templates))
        moves = rebalancing.to_moves(moving.moves) if moving is not None else ()
        timeout = max(MOVE_TIMEOUT_SECONDS, 6 * spec.autoscaling.interval_seconds)
        if moving is not None and now - rollout.epoch(moving.since) > timeout and moves:
            emit("Warning", "MovesAbandoned",
                 f"{rebalancing.describe(moves)}: not done in {timeout} s; the old replicas "
                 "serve on")
            was = was.model_copy(update={"moves_abandoned": was.moves_abandoned + len(moves)})
            moves = ()
        step = progress(placement, moves, rebalancing.reports(addresses))
        for why in rebalancing.send(addresses, step.orders):
            emit("Warning", "MoveFailed", why)
        for s, held in enumerate(step.placement.servers):
            if held != placement.servers[s]:
                value = None if held == templates[s] else p.format_server_experts(held)
                self.r.api.patch("apps/v1", "Deployment", ns,
                                 p.workload_name(name, slot, "expert", s),
                                 {"metadata": {"annotations": {status.LIVE_EXPERTS: value}}})
        was = was.model_copy(update={"moves": was.moves + len(step.done)})
        if moving is None:
            return None, was
        if step.pending:
            return moving.model_copy(update={
                "moves": rebalancing.from_moves(step.pending)}), was
        summary = (f"imbalance {moving.imbalance_before:.2f} -> {moving.imbalance_after:.2f}"
                   f" at {rollout.rfc3339(now)}")
        if moves:
            emit("Normal", "Rebalanced", f"expert servers rebalanced live: {summary}")
        return None, was.model_copy(update={"last_rebalance": summary,
                                            "last_rebalance_time": rollout.rfc3339(now)})

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
        for w in plan.servers:  # the templates hold the whole placement again
            d = deployments.get(w.name)
            if d is not None and (status.retiring(d) or status.live_experts(d) is not None):
                self.r.api.patch("apps/v1", "Deployment", ns, w.name, {"metadata": {
                    "annotations": {status.RETIRING: None, status.LIVE_EXPERTS: None}}})
        for s in range(len(plan.servers), len(servers)):
            w_name = p.workload_name(name, state.active_slot, "expert", s)
            if not status.retiring(deployments.get(w_name)):
                self.r.api.patch("apps/v1", "Deployment", ns, w_name,
                                 {"metadata": {"annotations": {status.RETIRING: "true"}}})
        emit("Normal", "Placed", f"{len(plan.servers)} expert server(s): "
             + "; ".join(f"{w.server}: {p.format_server_experts(w.experts)}"
                         for w in plan.servers))

    def _current(self, name: str, namespace: str, uid: str) -> Current | None:
        """The resource as it is, when the autoscaler has something to decide for it."""
        found = current(self.r, name, namespace, uid)
        if found is None:
            return None
        spec, state = found[0], found[1]
        self.metrics.swap((namespace, name), state.phase.value, state.active_version)
        if not spec.autoscaling.enabled or spec.autoscaling.prometheus_url is None \
                or state.phase is not swap.Phase.IDLE:
            return None  # scaling pauses during a swap: the standby copied the counts
        return found

    def _sample(self, spec: AutoGLMSpec, name: str, namespace: str, slot: Slot,
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
        was = st.autoscaling.metrics_available if st.autoscaling is not None else None
        conds = metrics_condition(self.r, live, st, "MetricsAvailable", new.metrics_available,
                                  new.reason, was, emit)
        self.r.write(live, st.model_copy(update={"autoscaling": new, "conditions": conds}))
