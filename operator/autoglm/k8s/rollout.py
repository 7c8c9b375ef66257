"""The swap on Kubernetes: what the pure state machine needs from the cluster, and what its
state means for the objects and the routing.

Every action of :mod:`autoglm.swap` is declarative here, so a restart anywhere is safe: the
state is written to the resource's status first, and the objects follow from it —
``CreateSlot`` puts the standby slot into the plan, ``DeleteSlot`` takes a slot out (the
pruner deletes it), ``Flip`` is the status' ``activeSlot``/``activeVersion`` that the
gateways watch, ``RunCanary`` is the canary request made while observing in ``Verifying``.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from autoglm import canary, swap
from autoglm import plan as p
from autoglm.k8s.converge import VERSION_LABEL
from autoglm.k8s.status import (
    deployment_available,
    deployment_failure,
    live_experts,
    retiring,
)
from autoglm.spec import AutoGLMSpec, AutoGLMStatus, Slot, SwapStatus, WarmSlotStatus

Manifest = dict[str, Any]
Canary = Callable[[str, int], tuple[bool | None, str]]
STAGED = (swap.Phase.STAGING, swap.Phase.WARMING, swap.Phase.VERIFYING, swap.Phase.FLIPPING)
# A container stuck in one of these will not become ready by waiting.
STUCK = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
         "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
# For an operator running outside the cluster (development, the tests): a JSON file
# {"<namespace>/<service>": "http://host:port"} consulted before cluster DNS.
ADDRESSES_ENV = "AUTOGLM_SERVICE_ADDRESSES"


def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def epoch(s: str) -> float:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def from_status(st: AutoGLMStatus, spec: AutoGLMSpec) -> swap.SwapState:
    """The swap state kept in status; a resource seen for the first time is idle at the
    version it will be created with."""
    active = st.active_slot or "a"
    version = st.active_version if st.active_version is not None else spec.model.version
    s = st.swap
    if s is None:
        return swap.SwapState(active, version)
    prev = (swap.Warm(s.previous.slot, s.previous.version, epoch(s.previous.until))
            if s.previous else None)
    return swap.SwapState(active, version, swap.Phase(s.phase),
                          epoch(s.since) if s.since else 0.0, s.target_version, prev,
                          s.failed_version, s.reason)


def to_status(state: swap.SwapState) -> SwapStatus:
    prev = state.previous
    return SwapStatus(
        phase=state.phase.value, since=rfc3339(state.since) if state.since else None,
        target_version=state.target_version,
        previous=WarmSlotStatus(slot=prev.slot, version=prev.version,
                                until=rfc3339(prev.until)) if prev else None,
        failed_version=state.failed_version, reason=state.reason)


def server_experts(d: Manifest) -> frozenset[int] | None:
    """What an expert server's Deployment tells its pods to hold (None: unreadable)."""
    for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
        for e in c.get("env", []):
            if e.get("name") == p.SERVER_EXPERTS_ENV:
                try:
                    return frozenset(p.parse_server_experts(str(e.get("value", ""))))
                except ValueError:
                    return None
    return None


def live_servers(name: str, slot: Slot, deployments: Mapping[str, Manifest],
                 moved: bool = False) -> tuple[tuple[frozenset[int], ...], int] | None:
    """The slot's expert servers as their templates boot them, in server order, or with
    ``moved`` as they hold now (after live moves: ``status.LIVE_EXPERTS``), and how many
    of them (from the first) serve on (the rest retire: the autoscaler removes them once
    the others have rolled out); None when they are not all there (a slot being created,
    or a server someone deleted: the recorded placement recreates it)."""
    prefix = p.workload_name(name, slot, "expert") + "-"
    found: dict[int, Manifest] = {}
    for n, d in deployments.items():
        if n.startswith(prefix) and n[len(prefix):].isdigit():
            found[int(n[len(prefix):])] = d
    if not found or sorted(found) != list(range(len(found))):
        return None
    held = [(live_experts(found[s]) if moved else None) or server_experts(found[s])
            for s in range(len(found))]
    if any(h is None for h in held):
        return None
    serving = min((s for s in range(len(found)) if retiring(found[s])), default=len(found))
    return tuple(h for h in held if h is not None), serving


def routing(name: str, spec: AutoGLMSpec, state: swap.SwapState, st: AutoGLMStatus,
            deployments: Mapping[str, Manifest],
            pods: Sequence[Manifest] = ()) -> p.RoutingState:
    """The slots the swap state keeps: the active one, the standby while it is staged (with
    the active slot's current placement, retiring servers left out), and the previous one
    while it is warm. A slot's placement is its live servers', else the one its status
    recorded; what fits a server, what its status kept or its servers' refusals report."""
    def servers(slot: Slot) -> tuple[tuple[frozenset[int], ...], int | None]:
        live = live_servers(name, slot, deployments)
        if live is not None:
            return live
        s = st.slots.get(slot)
        recorded = tuple(frozenset(x.experts) for x in s.servers if not x.retiring) if s else ()
        return recorded, None

    active, serving = servers(state.active_slot)
    fits = fits_per_server(spec, st, state.active_slot, pods)
    slots: dict[Slot, p.SlotState] = {
        state.active_slot: p.SlotState(state.active_version, active, serving, fits)}
    if state.phase in STAGED and state.target_version is not None:
        moved = live_servers(name, state.active_slot, deployments, moved=True)
        slots[state.standby_slot] = p.SlotState(  # the placement serving now, moves and all
            state.target_version, moved[0][:moved[1]] if moved else active[:serving],
            fits=_least(fits, fits_per_server(spec, st, state.standby_slot, pods)))
    if state.previous is not None:
        prev = state.previous
        slots[prev.slot] = p.SlotState(prev.version, *servers(prev.slot),
                                       fits_per_server(spec, st, prev.slot, pods))
    return p.RoutingState(state.active_slot, slots)


def _least(*values: int | None) -> int | None:
    found = [v for v in values if v is not None]
    return min(found) if found else None


def memory_limit(spec: AutoGLMSpec) -> str | None:
    """The expert servers' ``limits.memory``, as written in the spec."""
    limit = spec.experts.resources.limits.get("memory")
    return None if limit is None else str(limit)


def fits_per_server(spec: AutoGLMSpec, st: AutoGLMStatus, slot: Slot,
                    pods: Sequence[Manifest]) -> int | None:
    """With ``experts.perServer`` unset and a memory limit: the most experts one of the
    slot's servers holds, the least of what its status kept (found under this same limit)
    and what its expert servers' refusals report (``p.fits_reported``); None when none
    said."""
    limit = memory_limit(spec)
    if spec.experts.per_server is not None or limit is None:
        return None
    s = st.slots.get(slot)
    kept = s.fits_per_server if s is not None and s.fits_memory_limit == limit else None
    reported = [n for pod in pods
                if pod["metadata"].get("labels", {}).get("app.kubernetes.io/component")
                == "expert" and pod["metadata"]["labels"].get("autoglm.io/slot") == slot
                for c in pod.get("status", {}).get("containerStatuses", [])
                if (n := p.fits_reported(termination_message(c))) is not None]
    return _least(kept, *reported)


def router_url(name: str, namespace: str, slot: Slot) -> str:
    service = p.workload_name(name, slot, "router")
    path = os.environ.get(ADDRESSES_ENV)
    if path:
        try:
            known: dict[str, str] = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            known = {}
        if f"{namespace}/{service}" in known:
            return known[f"{namespace}/{service}"]
    return f"http://{service}.{namespace}.svc:{p.TRITON_HTTP_PORT}"


def termination_message(container_status: Manifest, limit: int = 300) -> str:
    """Why the container last ended, in one line: its termination message (what
    ``autoglm triton-serve`` wrote, e.g. "expert_0 v2: version 2 has 8 routed experts but
    spec.model.numExperts is 4"; or, with FallbackToLogsOnError, its log's tail, whose last
    line is kept)."""
    for state in ("state", "lastState"):
        terminated = (container_status.get(state) or {}).get("terminated") or {}
        lines = [x.strip() for x in str(terminated.get("message") or "").splitlines()
                 if x.strip()]
        if lines:
            line = lines[-1]
            return line if len(line) <= limit else line[:limit - 3] + "..."
    return ""


def pod_failure(pods: list[Manifest]) -> str | None:
    for pod in pods:
        statuses = pod.get("status", {}).get("containerStatuses", [])
        if pod.get("status", {}).get("phase") == "Failed":
            why = next((m for c in statuses if (m := termination_message(c))), "")
            return f"pod {pod['metadata']['name']} failed" + (f": {why}" if why else "")
        for c in statuses:
            waiting = c.get("state", {}).get("waiting") or {}
            if waiting.get("reason") in STUCK:
                last = (c.get("lastState", {}).get("terminated") or {}).get("exitCode")
                exit_ = f", last exit code {last}" if last is not None else ""
                why = termination_message(c)
                return (f"pod {pod['metadata']['name']}: container {c.get('name')} "
                        f"{waiting['reason']} ({c.get('restartCount', 0)} restarts{exit_})"
                        + (f": {why}" if why else ""))
    return None


def observe(name: str, namespace: str, spec: AutoGLMSpec, state: swap.SwapState,
            deployments: Mapping[str, Manifest], pods: list[Manifest], now: float,
            check: Canary = canary.check, inflight: int | None = None) -> swap.Observation:
    """What the state machine needs to decide, from the live objects of the standby slot.
    ``inflight`` is the gateways' in-flight count on the previous slot when known; unknown
    means wait the whole drain timeout."""
    ready, failure, answer, detail = False, None, None, ""
    if state.phase in STAGED and state.target_version is not None:
        target, standby = state.target_version, state.standby_slot
        plan = p.slot_plan(name, spec, standby, target, ())
        live = [deployments.get(w.name) for w in plan.workloads]
        ready = all(d is not None and deployment_available(d)
                    and d["spec"]["template"]["metadata"]["labels"].get(VERSION_LABEL)
                    == str(target) for d in live)
        failure = next((f for d in live if (f := deployment_failure(d))), None) or pod_failure(
            [pod for pod in pods
             if pod["metadata"].get("labels", {}).get("autoglm.io/slot") == standby
             and pod["metadata"].get("labels", {}).get(VERSION_LABEL) == str(target)])
        if state.phase is swap.Phase.VERIFYING and failure is None:
            answer, detail = check(router_url(name, namespace, standby), target)
    return swap.Observation(
        now=now, desired_version=spec.model.version, standby_ready=ready,
        standby_failure=failure, canary=answer, canary_detail=detail,
        old_inflight=1 if inflight is None else inflight)


def advance(name: str, namespace: str, spec: AutoGLMSpec, state: swap.SwapState,
            deployments: Mapping[str, Manifest], pods: list[Manifest], now: float,
            check: Canary = canary.check, inflight: int | None = None,
            ) -> tuple[swap.SwapState, list[swap.Report]]:
    """Step the state machine as far as the cluster allows now (each step with a fresh
    observation: a canary passing in ``Verifying`` flips in the same pass)."""
    r = spec.rollout
    timing = swap.Timing(r.ready_timeout_seconds, r.canary, r.drain_timeout_seconds,
                         r.keep_previous_seconds)
    reports: list[swap.Report] = []
    for _ in range(len(swap.Phase) + 1):
        obs = observe(name, namespace, spec, state, deployments, pods, now, check, inflight)
        new, actions = swap.step(state, obs, timing)
        reports += [a for a in actions if isinstance(a, swap.Report)]
        if new == state:
            break
        state = new
    return state, reports
