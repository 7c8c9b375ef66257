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
               experts: frozenset[int] = frozenset()) -> dict[str, Any]:
    env = [{"name": p.SERVER_EXPERTS_ENV, "value": p.format_server_experts(experts)}]
    return {"metadata": {"name": name, "generation": 2},
            "spec": {"replicas": replicas, "template": {
                "metadata": {"labels": {"autoglm.io/model-version": str(version)}},
                "spec": {"containers": [{"name": "triton", "env": env if experts else []}]}}},
            "status": {"observedGeneration": 2, "replicas": replicas,
                       "updatedReplicas": replicas,
                       "availableReplicas": replicas if ready else 0}}


def slot_objects(slot: str, version: int, ready: bool = True,
                 servers: tuple[frozenset[int], ...] = (),
                 ) -> dict[str, dict[str, Any]]:
    plan = p.slot_plan("tiny", SPEC, slot, version, servers)  # type: ignore[arg-type]
    return {w.name: deployment(w.name, version, ready, w.replicas, w.experts)
            for w in plan.workloads}


def test_state_round_trips_through_status() -> None:
    s = SwapState("b", 3, Phase.DRAINING, 1700000000.25, 3, Warm("a", 2, 1700000600.5), None,
                  "")
    back = rollout.from_status(AutoGLMStatus(active_slot="b", active_version=3,
                                             swap=rollout.to_status(s)), SPEC)
    assert back == s
    assert rollout.from_status(AutoGLMStatus(), SPEC) == SwapState("a", 2)


def test_slots_kept_follow_the_state() -> None:
    scaled = (frozenset({0}), frozenset({1}), frozenset({0}))  # a server per expert
    live = slot_objects("a", 1, servers=scaled)
    staging = SwapState("a", 1, Phase.WARMING, 1.0, target_version=2)
    r = rollout.routing("tiny", SPEC, staging, AutoGLMStatus(), live)
    # the standby starts with the active slot's placement, as it is now
    assert r.slots == {"a": p.SlotState(1, scaled, 3), "b": p.SlotState(2, scaled)}
    # a retiring server stays in its slot (it serves until removed), not in the standby
    live["tiny-a-experts-2"]["metadata"]["annotations"] = {"autoglm.io/retiring": "true"}
    r = rollout.routing("tiny", SPEC, staging, AutoGLMStatus(), live)
    assert r.slots == {"a": p.SlotState(1, scaled, 2), "b": p.SlotState(2, scaled[:2])}
    # a server deleted by hand: the placement recorded in status recreates it
    del live["tiny-a-experts-1"]
    recorded = AutoGLMStatus(slots={"a": {"version": 1, "servers": [
        {"name": f"tiny-a-experts-{s}", "experts": sorted(h)} for s, h in enumerate(scaled)]}})
    assert rollout.routing("tiny", SPEC, staging, recorded, live).slots["a"].servers == scaled
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


REFUSED = "expert_0 v2: version 2 has 8 routed experts but spec.model.numExperts is 2"


def crashed(container: dict[str, Any], phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"name": "tiny-b-expert-0-x", "labels": {
        "autoglm.io/slot": "b", "autoglm.io/model-version": "2"}},
        "status": {"phase": phase, "containerStatuses": [{"name": "triton", **container}]}}


def test_a_refused_version_says_why_in_the_swap_reason() -> None:
    """`autoglm triton-serve` writes why the model did not load to the termination log; the
    crash check puts that line into the RolloutFailed reason and the status."""
    pod = crashed({"restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                   "lastState": {"terminated": {"exitCode": 1, "message": REFUSED + "\n"}}})
    state = SwapState("a", 1, Phase.WARMING, 10.0, target_version=2)
    live = {**slot_objects("a", 1), **slot_objects("b", 2, ready=False)}
    new, reports = rollout.advance("tiny", "ns", SPEC, state, live, [pod], 20.0)
    assert new.phase is Phase.IDLE and new.failed_version == 2
    assert new.reason.endswith(f"CrashLoopBackOff (2 restarts, last exit code 1): {REFUSED}")
    assert reports[0].reason == "RolloutFailed" and REFUSED in reports[0].message
    assert "version 1 keeps serving" in reports[0].message
    assert REFUSED in rollout.to_status(new).reason


def test_termination_messages_become_one_line() -> None:
    # FallbackToLogsOnError: a container that wrote none leaves its log's tail; the last
    # line is kept, and a long one is cut
    tail = "I1130 loading: expert_0:2\nE1130 failed to load 'expert_0'\n\n"
    assert rollout.termination_message({"lastState": {"terminated": {"message": tail}}}) \
        == "E1130 failed to load 'expert_0'"
    long = rollout.termination_message({"lastState": {"terminated": {"message": "x" * 1000}}})
    assert len(long) == 300 and long.endswith("...")
    assert rollout.termination_message({"lastState": {"terminated": {"exitCode": 1}}}) == ""
    # the current state first (a container that has just exited), else the last one
    assert rollout.termination_message({"state": {"terminated": {"message": "now"}},
                                        "lastState": {"terminated": {"message": "before"}}}) \
        == "now"
    # a failed pod says why too; a crash without a message reads as before
    failed = crashed({"state": {"terminated": {"exitCode": 1, "message": REFUSED}}}, "Failed")
    assert rollout.pod_failure([failed]) == f"pod tiny-b-expert-0-x failed: {REFUSED}"
    plain = crashed({"restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}})
    assert rollout.pod_failure([plain]) == \
        "pod tiny-b-expert-0-x: container triton CrashLoopBackOff (1 restarts)"


def test_status_patch_removes_what_is_gone() -> None:
    old = {"slots": {"a": {"version": 1}, "b": {"version": 2}},
           "swap": {"phase": "Idle", "previous": {"slot": "b"}}, "ready": "6/6"}
    new = {"slots": {"a": {"version": 1}}, "swap": {"phase": "Idle"}, "ready": "6/6"}
    assert merge_patch(old, new) == {"slots": {"a": {"version": 1}, "b": None},
                                     "swap": {"phase": "Idle", "previous": None},
                                     "ready": "6/6"}
