"""The swap's Kubernetes adapter, pure parts: state in status, slots kept, observations."""

from __future__ import annotations

from typing import Any

from autoglm import plan as p
from autoglm.k8s import rollout
from autoglm.k8s.reconcile import merge_patch
from autoglm.spec import AutoGLMStatus, parse
from autoglm.swap import Phase, SwapState, Warm

SPEC = parse({"model": {"name": "m", "version": 2, "repository": "/models", "numExperts": 2,
                        "topK": 1, "layers": 1},
              "rollout": {"drainTimeoutSeconds": 0, "keepPreviousSeconds": 60}}, "tiny")


def deployment(name: str, version: int, ready: bool = True, replicas: int = 1,
               ) -> dict[str, Any]:
    return {"metadata": {"name": name, "generation": 2},
            "spec": {"replicas": replicas, "template": {"metadata": {"labels": {
                "autoglm.io/model-version": str(version)}}}},
            "status": {"observedGeneration": 2, "replicas": replicas,
                       "updatedReplicas": replicas,
                       "availableReplicas": replicas if ready else 0}}


def slot_objects(slot: str, version: int, ready: bool = True,
                 replicas: tuple[int, ...] = (1, 1)) -> dict[str, dict[str, Any]]:
    plan = p.slot_plan("tiny", SPEC, slot, version, replicas)  # type: ignore[arg-type]
    return {w.name: deployment(w.name, version, ready, w.replicas) for w in plan.workloads}


def test_state_round_trips_through_status() -> None:
    s = SwapState("b", 3, Phase.DRAINING, 1700000000.25, 3, Warm("a", 2, 1700000600.5), None,
                  "")
    back = rollout.from_status(AutoGLMStatus(active_slot="b", active_version=3,
                                             swap=rollout.to_status(s)), SPEC)
    assert back == s
    assert rollout.from_status(AutoGLMStatus(), SPEC) == SwapState("a", 2)


def test_slots_kept_follow_the_state() -> None:
    live = slot_objects("a", 1, replicas=(3, 1))
    staging = SwapState("a", 1, Phase.WARMING, 1.0, target_version=2)
    r = rollout.routing("tiny", SPEC, staging, AutoGLMStatus(), live)
    # the standby starts with the active slot's current replica counts
    assert r.slots == {"a": p.SlotState(1, (3, 1)), "b": p.SlotState(2, (3, 1))}
    warm = SwapState("b", 2, previous=Warm("a", 1, 100.0))
    assert set(rollout.routing("tiny", SPEC, warm, AutoGLMStatus(), live).slots) == {"a", "b"}
    aborted = SwapState("a", 1, Phase.ABORTING, 1.0, target_version=2, failed_version=2)
    assert set(rollout.routing("tiny", SPEC, aborted, AutoGLMStatus(), live).slots) == {"a"}


def test_a_ready_standby_passes_the_canary_and_flips_in_one_pass() -> None:
    live = {**slot_objects("a", 1), **slot_objects("b", 2)}
    asked: list[tuple[str, int]] = []

    def canary(url: str, version: int) -> tuple[bool | None, str]:
        asked.append((url, version))
        return True, "ok"

    state = SwapState("a", 1, Phase.WARMING, 10.0, target_version=2)
    new, reports = rollout.advance("tiny", "ns", SPEC, state, live, [], 20.0, canary)
    assert asked == [("http://tiny-b-router.ns.svc:8000", 2)]
    assert (new.phase, new.active_slot, new.active_version) == (Phase.IDLE, "b", 2)
    assert new.previous == Warm("a", 1, 80.0)
    assert [r.reason for r in reports] == ["CanaryPassed", "Flipped", "Drained"]


def test_standby_not_at_the_target_version_yet_is_not_ready() -> None:
    live = {**slot_objects("a", 1), **slot_objects("b", 1)}  # the warm old version
    state = SwapState("a", 1, Phase.WARMING, 10.0, target_version=2)
    obs = rollout.observe("tiny", "ns", SPEC, state, live, [], 20.0)
    assert not obs.standby_ready and obs.standby_failure is None


def test_a_crash_looping_standby_pod_is_a_failure() -> None:
    pod = {"metadata": {"name": "tiny-b-expert-0-x", "labels": {
        "autoglm.io/slot": "b", "autoglm.io/model-version": "2"}},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "triton", "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1}}}]}}
    state = SwapState("a", 1, Phase.WARMING, 10.0, target_version=2)
    live = {**slot_objects("a", 1), **slot_objects("b", 2, ready=False)}
    new, reports = rollout.advance("tiny", "ns", SPEC, state, live, [pod], 20.0)
    assert new.phase is Phase.IDLE and new.failed_version == 2
    assert "CrashLoopBackOff (4 restarts, last exit code 1)" in new.reason
    assert reports[0].reason == "RolloutFailed" and reports[0].warning


def test_status_patch_removes_what_is_gone() -> None:
    old = {"slots": {"a": {"version": 1}, "b": {"version": 2}},
           "swap": {"phase": "Idle", "previous": {"slot": "b"}}, "ready": "6/6"}
    new = {"slots": {"a": {"version": 1}}, "swap": {"phase": "Idle"}, "ready": "6/6"}
    assert merge_patch(old, new) == {"slots": {"a": {"version": 1}, "b": None},
                                     "swap": {"phase": "Idle", "previous": None},
                                     "ready": "6/6"}
