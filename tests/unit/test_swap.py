"""The swap state machine, driven by observations with an explicit clock."""

from __future__ import annotations

from collections.abc import Sequence

from autoglm.swap import (
    CreateSlot,
    DeleteSlot,
    Flip,
    Observation,
    Phase,
    Report,
    RunCanary,
    SwapState,
    Timing,
    Warm,
    step,
)

T = Timing(ready_timeout=60, canary=True, drain_timeout=10, keep_previous=100)


def work(actions: Sequence[object]) -> list[object]:
    return [a for a in actions if not isinstance(a, Report)]


def test_happy_path_stages_verifies_flips_drains_and_retires() -> None:
    s = SwapState("a", 1)
    s, acts = step(s, Observation(0, 2), T)
    assert s.phase is Phase.STAGING and work(acts) == [CreateSlot("b", 2)]
    s, acts = step(s, Observation(1, 2), T)
    assert s.phase is Phase.WARMING and acts == []
    s, acts = step(s, Observation(2, 2, standby_ready=False), T)
    assert s.phase is Phase.WARMING, "waits for the standby"
    s, acts = step(s, Observation(3, 2, standby_ready=True), T)
    assert s.phase is Phase.VERIFYING and acts == [RunCanary("b", 2)]
    s, acts = step(s, Observation(4, 2, standby_ready=True, canary=True), T)
    assert s.phase is Phase.FLIPPING and work(acts) == [Flip("b", 2)]
    s, _ = step(s, Observation(5, 2), T)
    assert (s.phase, s.active_slot, s.active_version) == (Phase.DRAINING, "b", 2)
    s, _ = step(s, Observation(6, 2, old_inflight=3), T)
    assert s.phase is Phase.DRAINING, "waits for in-flight requests on the old slot"
    s, _ = step(s, Observation(7, 2, old_inflight=0), T)
    assert s.phase is Phase.IDLE and s.previous == Warm("a", 1, 107)
    s, acts = step(s, Observation(50, 2), T)
    assert acts == [] and s.previous is not None
    s, acts = step(s, Observation(107, 2), T)
    assert work(acts) == [DeleteSlot("a")] and s.previous is None


def test_drain_is_bounded() -> None:
    s = SwapState("b", 2, Phase.DRAINING, since=0, target_version=2,
                  previous=Warm("a", 1, 0))
    s, _ = step(s, Observation(11, 2, old_inflight=5), T)
    assert s.phase is Phase.IDLE


def test_setting_the_version_back_flips_to_the_warm_slot_without_loading() -> None:
    s = SwapState("b", 2, previous=Warm("a", 1, until=100))
    s, acts = step(s, Observation(10, 1), T)
    assert s.phase is Phase.FLIPPING and work(acts) == [Flip("a", 1)]
    assert not any(isinstance(a, CreateSlot) for a in acts)
    s, _ = step(s, Observation(11, 1), T)
    assert (s.active_slot, s.active_version, s.previous) == ("a", 1, Warm("b", 2, 111))


def test_a_new_version_replaces_the_warm_slot() -> None:
    s = SwapState("b", 2, previous=Warm("a", 1, until=100))
    s, acts = step(s, Observation(10, 3), T)
    assert work(acts) == [DeleteSlot("a"), CreateSlot("a", 3)]


def test_canary_mismatch_aborts_and_the_bad_version_is_not_retried() -> None:
    s = SwapState("a", 1, Phase.VERIFYING, since=0, target_version=2)
    s, acts = step(s, Observation(1, 2, standby_ready=True, canary=False,
                                  canary_detail="max error 0.3"), T)
    assert s.phase is Phase.ABORTING and DeleteSlot("b") in acts
    (report,) = [a for a in acts if isinstance(a, Report)]
    assert report.warning and report.reason == "RolloutFailed" and "canary" in report.message
    s, _ = step(s, Observation(2, 2), T)
    assert (s.phase, s.active_version, s.failed_version) == (Phase.IDLE, 1, 2)
    s, acts = step(s, Observation(3, 2), T)
    assert acts == [] and s.phase is Phase.IDLE, "no retry loop on a bad version"
    s, acts = step(s, Observation(4, 3), T)
    assert s.phase is Phase.STAGING, "another version is tried"


def test_timeout_and_crash_abort() -> None:
    warming = SwapState("a", 1, Phase.WARMING, since=0, target_version=2)
    s, acts = step(warming, Observation(61, 2), T)
    assert s.phase is Phase.ABORTING and "not ready within 60 s" in s.reason
    s, acts = step(warming, Observation(5, 2, standby_failure="pod crashed"), T)
    assert s.phase is Phase.ABORTING and DeleteSlot("b") in acts


def test_a_version_changed_mid_swap_supersedes_cleanly() -> None:
    s = SwapState("a", 1, Phase.WARMING, since=0, target_version=2)
    s, acts = step(s, Observation(1, 3), T)
    assert s.phase is Phase.ABORTING and DeleteSlot("b") in acts and s.failed_version is None
    s, _ = step(s, Observation(2, 3), T)
    s, acts = step(s, Observation(3, 3), T)
    assert s.phase is Phase.STAGING and work(acts) == [CreateSlot("b", 3)]


def test_without_canary_ready_is_enough() -> None:
    s = SwapState("a", 1, Phase.WARMING, since=0, target_version=2)
    s, acts = step(s, Observation(1, 2, standby_ready=True),
                   Timing(canary=False))
    assert s.phase is Phase.FLIPPING and acts == [Flip("b", 2)]
