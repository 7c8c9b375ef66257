"""The resource's status from what the cluster shows: pure functions, no I/O.

Conditions follow the Kubernetes convention: ``Ready``, ``Progressing`` and ``Degraded``,
each with a reason, a message and the ``observedGeneration`` it describes; a condition's
``lastTransitionTime`` only moves when its status does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from autoglm.placement import Placement
from autoglm.plan import SlotPlan, Topology, parse_server_experts
from autoglm.spec import AutoGLMStatus, Condition, ServerStatus, SlotStatus, SwapStatus
from autoglm.swap import Phase, SwapState

Manifest = dict[str, Any]
Status = Literal["True", "False", "Unknown"]


RETIRING = "autoglm.io/retiring"  # annotation: an expert server the autoscaler removes


def retiring(d: Manifest | None) -> bool:
    return d is not None and d["metadata"].get("annotations", {}).get(RETIRING) == "true"


# annotation: what an expert server's pods hold now, when live moves (k8s/rebalancing.py)
# made it differ from what its pod template boots with (a template change would restart it)
LIVE_EXPERTS = "autoglm.io/experts"


def live_experts(d: Manifest | None) -> frozenset[int] | None:
    """What a server holds after live moves (None: what its template says, or unreadable)."""
    value = (d or {}).get("metadata", {}).get("annotations", {}).get(LIVE_EXPERTS)
    try:
        return frozenset(parse_server_experts(value)) if value else None
    except ValueError:
        return None


def num_experts(plan: SlotPlan) -> int:
    return max((max(w.experts) for w in plan.servers if w.experts), default=-1) + 1


def deployment_available(d: Manifest | None) -> bool:
    """All desired replicas run the current template and are Ready."""
    if d is None:
        return False
    spec, st = d.get("spec", {}), d.get("status", {})
    want = spec.get("replicas", 1)
    return bool(
        st.get("observedGeneration", 0) >= d["metadata"].get("generation", 0)
        and st.get("updatedReplicas", 0) >= want
        and st.get("availableReplicas", 0) >= want
        and st.get("replicas", 0) == want  # no old pods left from a rollout
    )


def deployment_failure(d: Manifest | None) -> str | None:
    """Why a Deployment cannot make progress, if it says so."""
    if d is None:
        return None
    for c in d.get("status", {}).get("conditions", []):
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            return f"{d['metadata']['name']}: {c.get('message', c.get('reason', ''))}"
        if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
            return f"{d['metadata']['name']}: {c.get('message', '')}"
    return None


def set_condition(conditions: list[Condition], type_: str, status: Status, reason: str,
                  message: str, generation: int | None, now: str) -> list[Condition]:
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else now
    new = Condition(type=type_, status=status, reason=reason, message=message,
                    observed_generation=generation, last_transition_time=since)
    return [c for c in conditions if c.type != type_] + [new]


def invalid_status(prev: AutoGLMStatus, generation: int | None, message: str,
                   now: str) -> AutoGLMStatus:
    """The spec was refused: say so; what is serving (slots, versions) stays as it was."""
    conds = set_condition(prev.conditions, "Ready", "False", "InvalidSpec", message,
                          generation, now)
    return prev.model_copy(update={"phase": "Invalid", "conditions": conds,
                                   "observed_generation": generation})


def _progressing(state: SwapState, wanted: int, waiting: list[str], total: int,
                 ) -> tuple[Status, str, str]:
    if state.phase is not Phase.IDLE:
        target = state.target_version
        what = {Phase.STAGING: f"creating slot {state.standby_slot} for version {target}",
                Phase.WARMING: f"waiting for slot {state.standby_slot} (version {target}) "
                               "to be ready",
                Phase.VERIFYING: f"running the canary on slot {state.standby_slot} "
                                 f"(version {target})",
                Phase.FLIPPING: f"flipping traffic to version {target}",
                Phase.DRAINING: "draining the previous slot",
                Phase.ABORTING: f"removing slot {state.standby_slot}: {state.reason}"}
        return "True", state.phase.value, what[state.phase]
    if wanted == state.failed_version and wanted != state.active_version:
        return ("False", "RolloutFailed", f"version {wanted} failed ({state.reason}); "
                f"version {state.active_version} keeps serving")
    if waiting:
        return "True", "Provisioning", f"{total - len(waiting)}/{total} workloads ready"
    return "False", "Converged", "every workload runs the desired template"


def observed_status(prev: AutoGLMStatus, generation: int | None, topology: Topology,
                    deployments: Mapping[str, Manifest | None], gateway: str,
                    wanted_version: int, error: tuple[str, str] | None,
                    now: str, state: SwapState | None = None,
                    swap_status: SwapStatus | None = None,
                    pod_failures: Sequence[str] = (),
                    memory_limit: str | None = None) -> AutoGLMStatus:
    """Status of a valid spec, from the live Deployments (by name) of every workload.

    ``error`` is a (reason, message) pair when applying objects failed; ``state`` is the
    swap's state (written as ``swap_status``); ``pod_failures`` why serving workloads' pods
    fail (a crash loop's termination message), one line each.
    """
    active = topology.active_plan
    state = state or SwapState(active.slot, active.version)
    names = [gateway, *(w.name for w in active.workloads)]
    waiting = [n for n in names if not deployment_available(deployments.get(n))]
    failures = [f for n in names if (f := deployment_failure(deployments.get(n)))]
    failures += pod_failures
    all_ready = not waiting and error is None
    conds = prev.conditions
    g = generation
    if all_ready:
        conds = set_condition(conds, "Ready", "True", "AllWorkloadsReady",
                              f"serving version {active.version} from slot {active.slot}",
                              g, now)
    else:
        msg = f"waiting for {', '.join(waiting)}" if waiting else "applying objects failed"
        conds = set_condition(conds, "Ready", "False", "WorkloadsNotReady", msg, g, now)
    conds = set_condition(conds, "Progressing",
                          *_progressing(state, wanted_version, waiting, len(names)), g, now)

    rollout_failed = (state.phase is Phase.IDLE and wanted_version == state.failed_version
                      and wanted_version != state.active_version)
    if error is not None:
        conds = set_condition(conds, "Degraded", "True", error[0], error[1], g, now)
    elif failures:
        conds = set_condition(conds, "Degraded", "True", "WorkloadFailing",
                              "; ".join(failures), g, now)
    elif rollout_failed:
        conds = set_condition(conds, "Degraded", "True", "RolloutFailed",
                              f"version {wanted_version}: {state.reason}; version "
                              f"{state.active_version} keeps serving", g, now)
    else:
        conds = set_condition(conds, "Degraded", "False", "AsExpected", "", g, now)

    degraded = error is not None or bool(failures) or rollout_failed
    phase = "Ready" if all_ready and not degraded else "Degraded" if degraded else "Progressing"
    slots = {plan.slot: SlotStatus(
        version=plan.version,
        ready=all(deployment_available(deployments.get(w.name)) for w in plan.workloads),
        expert_replicas=Placement(tuple(
            live_experts(deployments.get(w.name)) or w.experts for w in plan.servers
        )).replicas(num_experts(plan)),
        servers=[ServerStatus(name=w.name,
                              experts=sorted(live_experts(deployments.get(w.name)) or w.experts),
                              ready=deployment_available(deployments.get(w.name)),
                              retiring=retiring(deployments.get(w.name)))
                 for w in plan.servers],
        fits_per_server=plan.fits,
        fits_memory_limit=memory_limit if plan.fits is not None else None)
        for plan in topology.slots}
    return AutoGLMStatus(
        observed_generation=g,
        phase=phase,
        active_slot=active.slot,
        active_version=active.version,
        ready=f"{len(names) - len(waiting)}/{len(names)}",
        expert_servers=len(active.servers),
        routers=_router_pods(deployments.get(active.router.name)),
        slots=slots,
        swap=swap_status if swap_status is not None else prev.swap,
        autoscaling=prev.autoscaling,  # the autoscaler's own (k8s/scaling.py)
        router=prev.router,  # the router autoscaler's (k8s/router_scaling.py)
        conditions=conds,
    )


def _router_pods(d: Mapping[str, Any] | None) -> str | None:
    """Ready / wanted router pods of a Deployment, e.g. ``2/2`` (None: not there yet)."""
    if d is None:
        return None
    ready = int((d.get("status") or {}).get("readyReplicas") or 0)
    return f"{ready}/{int((d.get('spec') or {}).get('replicas') or 0)}"
