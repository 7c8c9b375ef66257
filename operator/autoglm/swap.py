"""The double-buffered version swap: a pure state machine, ``step(state, observation)``.

    Idle → Staging → Warming → Verifying → Flipping → Draining → Idle
                 ╰──── Aborting (timeout, crash, canary mismatch, superseded) ────╯

The standby slot is created at the desired version with the active slot's expert replica
counts, must become ready within the rollout timeout, and must answer the canary input
with its expected output; only then does traffic flip, and the old slot drains (in-flight
requests reach zero, bounded) and stays warm for ``keep_previous`` seconds, so setting the
version back flips back without reloading. A version that failed is not retried until the
spec asks for another one. The adapters (Kubernetes, local) turn :class:`Action` values
into work and report what they see as an :class:`Observation`; the state is plain data, kept
in the resource's status, so a restarted operator resumes where it was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

from autoglm.spec import Slot


class Phase(StrEnum):
    IDLE = "Idle"
    STAGING = "Staging"
    WARMING = "Warming"
    VERIFYING = "Verifying"
    FLIPPING = "Flipping"
    DRAINING = "Draining"
    ABORTING = "Aborting"


def other(slot: Slot) -> Slot:
    return "b" if slot == "a" else "a"


@dataclass(frozen=True)
class Warm:
    """A slot that served before, kept loaded for an instant rollback until ``until``."""

    slot: Slot
    version: int
    until: float


@dataclass(frozen=True)
class SwapState:
    active_slot: Slot
    active_version: int
    phase: Phase = Phase.IDLE
    since: float = 0.0  # when the phase began
    target_version: int | None = None  # the version being staged
    previous: Warm | None = None
    failed_version: int | None = None  # the last version that aborted
    reason: str = ""  # why the last rollout failed, or what is happening

    @property
    def standby_slot(self) -> Slot:
        return other(self.active_slot)


@dataclass(frozen=True)
class Observation:
    now: float
    desired_version: int
    standby_ready: bool = False  # every standby server ready at the target version
    standby_failure: str | None = None  # e.g. a crashed standby pod
    canary: bool | None = None  # None: no answer yet
    canary_detail: str = ""
    old_inflight: int = 0  # the gateway's in-flight requests on the previous slot


@dataclass(frozen=True)
class Timing:
    ready_timeout: float = 600.0
    canary: bool = True
    drain_timeout: float = 60.0
    keep_previous: float = 600.0


# -- actions --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CreateSlot:
    """Start the slot's servers at ``version``, expert replicas copied from the active slot."""

    slot: Slot
    version: int


@dataclass(frozen=True)
class RunCanary:
    slot: Slot
    version: int


@dataclass(frozen=True)
class Flip:
    """Point the gateway at the slot: the one atomic step traffic sees."""

    slot: Slot
    version: int


@dataclass(frozen=True)
class DeleteSlot:
    slot: Slot


@dataclass(frozen=True)
class Report:
    """Say something users should see (an Event, a log line); ``warning`` for failures."""

    reason: str
    message: str
    warning: bool = False


Action = CreateSlot | RunCanary | Flip | DeleteSlot | Report


def _to(state: SwapState, phase: Phase, now: float, **changes: object) -> SwapState:
    return dataclasses.replace(state, phase=phase, since=now, **changes)  # type: ignore[arg-type]


def _abort(state: SwapState, now: float, why: str) -> tuple[SwapState, list[Action]]:
    assert state.target_version is not None
    new = _to(state, Phase.ABORTING, now, failed_version=state.target_version, reason=why)
    return new, [DeleteSlot(state.standby_slot),
                 Report("RolloutFailed", f"version {state.target_version}: {why}; "
                        f"version {state.active_version} keeps serving", warning=True)]


def step(state: SwapState, obs: Observation, timing: Timing,
         ) -> tuple[SwapState, list[Action]]:
    """One decision. Call it again after the actions ran, with a fresh observation."""
    now, want = obs.now, obs.desired_version
    p = state.phase
    if p is Phase.IDLE:
        prev = state.previous
        if prev is not None and prev.until <= now:
            return (dataclasses.replace(state, previous=None),
                    [DeleteSlot(prev.slot),
                     Report("Retired", f"slot {prev.slot} (version {prev.version}) retired")])
        if want == state.active_version or want == state.failed_version:
            return state, []
        if prev is not None and prev.version == want:
            # rollback to the warm slot: nothing to load
            return (_to(state, Phase.FLIPPING, now, target_version=want),
                    [Flip(prev.slot, want),
                     Report("FlipBack", f"flipping back to warm slot {prev.slot} "
                            f"(version {want})")])
        actions: list[Action] = []
        if prev is not None:  # the standby slot holds an older warm version: replace it
            actions.append(DeleteSlot(prev.slot))
        actions += [CreateSlot(state.standby_slot, want),
                    Report("Staging", f"staging version {want} in slot {state.standby_slot}")]
        return (_to(state, Phase.STAGING, now, target_version=want, previous=None,
                    reason=""), actions)

    superseded = state.target_version is not None and want != state.target_version
    if p in (Phase.STAGING, Phase.WARMING, Phase.VERIFYING) and superseded:
        new, actions = _abort(state, now, f"superseded by version {want}")
        return dataclasses.replace(new, failed_version=None), actions
    if p is Phase.STAGING:
        return _to(state, Phase.WARMING, now), []
    if p is Phase.WARMING:
        if obs.standby_failure:
            return _abort(state, now, f"standby failed: {obs.standby_failure}")
        if now - state.since > timing.ready_timeout:
            return _abort(state, now, f"standby not ready within {timing.ready_timeout:g} s")
        if not obs.standby_ready:
            return state, []
        assert state.target_version is not None
        if not timing.canary:
            return (_to(state, Phase.FLIPPING, now),
                    [Flip(state.standby_slot, state.target_version)])
        return (_to(state, Phase.VERIFYING, now),
                [RunCanary(state.standby_slot, state.target_version)])
    if p is Phase.VERIFYING:
        if obs.standby_failure:
            return _abort(state, now, f"standby failed: {obs.standby_failure}")
        if obs.canary is False:
            return _abort(state, now, f"canary mismatch: {obs.canary_detail}")
        if obs.canary is None:
            if now - state.since > timing.ready_timeout:
                last = f" (last: {obs.canary_detail})" if obs.canary_detail else ""
                return _abort(state, now, f"no canary answer in time{last}")
            return state, []
        assert state.target_version is not None
        return (_to(state, Phase.FLIPPING, now),
                [Flip(state.standby_slot, state.target_version),
                 Report("CanaryPassed", f"version {state.target_version} answered the "
                        "canary as expected")])
    if p is Phase.FLIPPING:
        # the Flip action ran: the standby is now active, the old slot drains
        assert state.target_version is not None
        old = Warm(state.active_slot, state.active_version, now + timing.keep_previous)
        return (_to(state, Phase.DRAINING, now, active_slot=state.standby_slot,
                    active_version=state.target_version, previous=old),
                [Report("Flipped", f"traffic now on slot {state.standby_slot} "
                        f"(version {state.target_version})")])
    if p is Phase.DRAINING:
        if obs.old_inflight > 0 and now - state.since < timing.drain_timeout:
            return state, []
        assert state.previous is not None
        warm = dataclasses.replace(state.previous, until=now + timing.keep_previous)
        idle = _to(state, Phase.IDLE, now, target_version=None, previous=warm,
                   failed_version=None)
        return idle, [Report("Drained", f"slot {warm.slot} drained; kept warm for "
                             f"{timing.keep_previous:g} s")]
    if p is Phase.ABORTING:
        return _to(state, Phase.IDLE, now, target_version=None), []
    raise AssertionError(f"unknown phase {p}")
