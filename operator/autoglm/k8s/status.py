"""The resource's status from what the cluster shows: pure functions, no I/O.

Conditions follow the Kubernetes convention: ``Ready``, ``Progressing`` and ``Degraded``,
each with a reason, a message and the ``observedGeneration`` it describes; a condition's
``lastTransitionTime`` only moves when its status does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from autoglm.plan import Topology
from autoglm.spec import AutoGLMStatus, Condition, SlotStatus

Manifest = dict[str, Any]
Status = Literal["True", "False", "Unknown"]


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


def observed_status(prev: AutoGLMStatus, generation: int | None, topology: Topology,
                    deployments: Mapping[str, Manifest | None], gateway: str,
                    wanted_version: int, error: tuple[str, str] | None,
                    now: str) -> AutoGLMStatus:
    """Status of a valid spec, from the live Deployments (by name) of every workload.

    ``error`` is a (reason, message) pair when applying objects failed.
    """
    active = topology.active_plan
    names = [gateway, *(w.name for w in active.workloads)]
    waiting = [n for n in names if not deployment_available(deployments.get(n))]
    failures = [f for n in names if (f := deployment_failure(deployments.get(n)))]
    all_ready = not waiting and error is None
    expert_replicas = [
        int((deployments.get(w.name) or {}).get("spec", {}).get("replicas", w.replicas))
        for w in active.experts
    ]
    conds = prev.conditions
    g = generation
    if all_ready:
        conds = set_condition(conds, "Ready", "True", "AllWorkloadsReady",
                              f"serving version {active.version} from slot {active.slot}",
                              g, now)
    else:
        msg = f"waiting for {', '.join(waiting)}" if waiting else "applying objects failed"
        conds = set_condition(conds, "Ready", "False", "WorkloadsNotReady", msg, g, now)

    if active.version != wanted_version:
        conds = set_condition(
            conds, "Progressing", "False", "VersionChangePending",
            f"spec.model.version is {wanted_version}; slot {active.slot} keeps serving "
            f"{active.version}: this release does not swap versions yet", g, now)
    elif waiting:
        conds = set_condition(conds, "Progressing", "True", "Provisioning",
                              f"{len(names) - len(waiting)}/{len(names)} workloads ready",
                              g, now)
    else:
        conds = set_condition(conds, "Progressing", "False", "Converged",
                              "every workload runs the desired template", g, now)

    if error is not None:
        conds = set_condition(conds, "Degraded", "True", error[0], error[1], g, now)
    elif failures:
        conds = set_condition(conds, "Degraded", "True", "WorkloadFailing",
                              "; ".join(failures), g, now)
    else:
        conds = set_condition(conds, "Degraded", "False", "AsExpected", "", g, now)

    degraded = error is not None or bool(failures)
    phase = "Ready" if all_ready else "Degraded" if degraded else "Progressing"
    slots = dict(prev.slots)
    slots[active.slot] = SlotStatus(version=active.version, ready=not waiting,
                                    expert_replicas=expert_replicas)
    return AutoGLMStatus(
        observed_generation=g,
        phase=phase,
        active_slot=active.slot,
        active_version=active.version,
        ready=f"{len(names) - len(waiting)}/{len(names)}",
        slots=slots,
        conditions=conds,
    )
