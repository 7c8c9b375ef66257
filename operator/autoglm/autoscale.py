"""Per-expert autoscaling: a pure policy with an injected clock.

Each expert's desired replicas follow the tokens the gate routes to it (the router's
counters: a leading signal, seen before any queue builds), with Triton queue time as a
guard. As Kubernetes' HPA: a tolerance band, a scale-up rate limit and a scale-down
stabilization window (the highest recommendation of the window wins). Then, unlike HPA,
the experts' answers only fix the total (within the replica budget), which is placed by
water-filling: every expert keeps at least ``min_replicas`` and each further replica goes
where the load per replica is highest, so hot experts get capacity from cold ones instead
of from a bigger bill, and per-replica load evens out. Water-filling starts from the
current placement and moves a replica only for a clear gain (``move_tolerance``), so
noise does not shuffle serving replicas.

Make-before-break: given the replicas that serve (``ready``), what the budget takes from a
loaded expert stays until the replicas added elsewhere serve, so a move never opens a
capacity gap for the length of a start-up (the budget is borrowed meanwhile).
Optionally (``lookahead``) a rising rate is extrapolated: a rate over a window lags a
step by up to the window, and a replica added late serves a start-up later still.

Missing or stale metrics hold the current replicas (``metrics_ok`` is False with the
reason); the policy never scales down on missing data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autoglm.spec import AutoGLMSpec


@dataclass(frozen=True)
class Policy:
    target: float  # tokens/s one replica should serve
    min_replicas: int = 1
    max_replicas: int = 4
    budget: int = 0  # 0: no budget (each expert scales alone, as HPA)
    tolerance: float = 0.1
    scale_up_limit: int = 2  # replicas added per expert per decision
    stabilization: float = 300.0  # seconds
    stale_after: float = 60.0  # seconds
    queue_guard_ms: float = 0.0  # 0: off; above it, an expert gets at least +1
    lookahead: float = 0.0  # seconds: scale up for a rising rate extrapolated this far
    move_tolerance: float = 0.1  # move a replica only if the receiver's load per replica
    # tops the donor's (after the move) by more than this


@dataclass(frozen=True)
class Sample:
    """What Prometheus says, and when the newest sample was taken."""

    at: float
    tokens_per_s: tuple[float | None, ...]
    queue_ms: tuple[float | None, ...] = ()


@dataclass(frozen=True)
class State:
    # (time, recommendation per expert) for the stabilization window
    history: tuple[tuple[float, tuple[int, ...]], ...] = ()
    # (sample time, load per expert) of the last decision, for the rate's trend
    last: tuple[float, tuple[float, ...]] | None = None


@dataclass(frozen=True)
class Decision:
    desired: tuple[int, ...]
    metrics_ok: bool
    reason: str
    changes: tuple[str, ...] = field(default=())  # one line per expert that changes


def imbalance(load: Sequence[float], replicas: Sequence[int]) -> float:
    """(max - mean) / mean of the load per replica across experts; 0 without load."""
    per = [lo / max(r, 1) for lo, r in zip(load, replicas, strict=True)]
    mean = sum(per) / len(per) if per else 0.0
    return (max(per) - mean) / mean if mean > 0 else 0.0


def serving_imbalance(load: Sequence[float], serving: Sequence[int],
                      capacity: float) -> float:
    """(max - mean) / mean of the load per serving replica, the mean taken over replicas
    (served tokens / serving replicas). A replica carries at most ``capacity``: demand
    beyond it is unmet demand, not load. Experts with no serving replica are left out."""
    served = [(min(x, n * capacity), n) for x, n in zip(load, serving, strict=True) if n > 0]
    replicas = sum(n for _, n in served)
    mean = sum(x for x, _ in served) / replicas if replicas else 0.0
    return (max(x / n for x, n in served) - mean) / mean if mean > 0 else 0.0


def apportion(caps: Sequence[int], load: Sequence[float], total: int,
              floor: int) -> tuple[int, ...]:
    """``total`` replicas: ``floor`` each, then one at a time to the expert with the highest
    load per replica that is below its cap (water-filling: equal load per replica)."""
    return place([floor] * len(caps), caps, load, total, floor)


def place(current: Sequence[int], caps: Sequence[int], load: Sequence[float], total: int,
          floor: int, tolerance: float = 0.0) -> tuple[int, ...]:
    """Water-filling that starts from ``current``: add where the load per replica is highest,
    remove where it stays lowest, then move replicas from the coolest expert to the hottest
    while the hottest load per replica tops the donor's (after the move) by more than
    ``tolerance`` (so noise does not shuffle replicas that are serving)."""
    out = [min(max(c, floor), cap) for c, cap in zip(current, caps, strict=True)]
    n = range(len(out))

    def per(j: int, replicas: int) -> float:
        return load[j] / replicas if replicas else math.inf if load[j] > 0 else 0.0

    def hottest() -> int | None:
        up = [i for i in n if out[i] < caps[i]]
        return max(up, key=lambda j: (per(j, out[j]), -j)) if up else None

    def coolest(but: int = -1) -> int | None:  # the lowest load per replica after giving one
        down = [i for i in n if out[i] > floor and i != but]
        return min(down, key=lambda j: (per(j, out[j] - 1), -j)) if down else None

    while sum(out) < total and (i := hottest()) is not None:
        out[i] += 1
    while sum(out) > total and (j := coolest()) is not None:
        out[j] -= 1
    for _ in range(sum(out)):
        i = hottest()
        if i is None or (j := coolest(i)) is None:
            break
        if per(i, out[i]) <= per(j, out[j] - 1) * (1 + tolerance):
            break
        out[i] += 1
        out[j] -= 1
    return tuple(out)


def decide(state: State, current: Sequence[int], sample: Sample | None, now: float,
           policy: Policy, *, ready: Sequence[int] | None = None) -> tuple[State, Decision]:
    """``ready``: replicas per expert that serve (the rest are starting). With it, replicas
    that the budget takes from an expert stay until those added elsewhere serve
    (make-before-break: the budget is borrowed for a start-up, never the capacity)."""
    cur = tuple(current)
    # held replicas still keep the spec's bounds (the autoscaler applies them, not rollout)
    held = tuple(min(max(c, policy.min_replicas), policy.max_replicas) for c in cur)
    if sample is None or not sample.tokens_per_s:
        return state, Decision(held, False, "no metrics yet: holding replicas")
    if now - sample.at > policy.stale_after:
        return state, Decision(held, False, f"metrics stale for {now - sample.at:.0f} s: "
                                            "holding replicas")
    missing = [i for i, v in enumerate(sample.tokens_per_s) if v is None]
    if missing or len(sample.tokens_per_s) != len(cur):
        return state, Decision(held, False, f"no load for experts {missing}: holding replicas")
    load = [float(v or 0.0) for v in sample.tokens_per_s]
    lo, hi = policy.min_replicas, policy.max_replicas
    ahead = list(load)
    if policy.lookahead and state.last and len(state.last[1]) == len(load) \
            and sample.at > state.last[0]:
        # Only a rise beyond the tolerance since the last sample is a trend; less is noise.
        dt = sample.at - state.last[0]
        ahead = [x + (x - p) / dt * policy.lookahead if x - p > policy.tolerance * p else x
                 for x, p in zip(load, state.last[1], strict=True)]

    raw = []
    for i, (c, x) in enumerate(zip(cur, load, strict=True)):
        ratio = x / (max(c, 1) * policy.target)
        want = c if abs(ratio - 1) <= policy.tolerance else math.ceil(x / policy.target)
        if ahead[i] > x:  # within the tolerance: an extrapolation is a guess
            want = max(want, math.ceil(ahead[i] / policy.target / (1 + policy.tolerance)))
        queue = sample.queue_ms[i] if i < len(sample.queue_ms) else None
        if policy.queue_guard_ms and queue is not None and queue > policy.queue_guard_ms:
            want = max(want, c + 1)
        want = min(max(want, lo), hi, c + policy.scale_up_limit)
        raw.append(want)

    window = [r for t, r in state.history if now - t < policy.stabilization]
    own = []
    for i, (c, r) in enumerate(zip(cur, raw, strict=True)):
        if r >= c:
            own.append(r)  # scale up (or stay) at once
        else:  # scale down only as far as the whole window agrees
            own.append(min(c, max([r, *(w[i] for w in window)])))
    # The per-expert answers fix how many replicas in all (within the budget); water-filling
    # then places them where the load per replica is highest, within each expert's
    # bounds and scale-up limit, so per-replica load evens out across experts.
    total = sum(own) if not policy.budget else min(sum(own), policy.budget)
    caps = [max(lo, min(hi, c + policy.scale_up_limit)) for c in cur]
    desired = list(place(cur, caps, ahead, min(total, sum(caps)), lo, policy.move_tolerance))
    borrowed = 0
    if ready is not None and len(ready) == len(cur):
        # Make-before-break: while replicas are starting, an expert keeps what the budget
        # takes from it, as far as its own answer and its load (at target) need them; a
        # surplus (say, the old hot expert's after the hot spot moved) goes at once.
        starting = sum(max(0, d - r) for d, r in zip(desired, ready, strict=True))
        for i in sorted(range(len(cur)), key=lambda j: -load[j] / max(desired[j], 1)):
            keep = min(cur[i], own[i], math.ceil(load[i] / policy.target)) - desired[i]
            back = max(0, min(keep, starting - borrowed))
            desired[i] += back
            borrowed += back
    history = (*((t, r) for t, r in state.history if now - t < policy.stabilization),
               (now, tuple(raw)))
    changes = tuple(
        f"expert {i}: {c} -> {d} replicas ({load[i]:.0f} tokens/s, target "
        f"{policy.target:g}/replica)"
        for i, (c, d) in enumerate(zip(cur, desired, strict=True)) if c != d)
    reason = "scaling" if changes else "within tolerance"
    if borrowed:
        reason += f"; {borrowed} replicas kept over the budget until new ones serve"
    return State(history, (sample.at, tuple(load))), Decision(tuple(desired), True, reason,
                                                             changes)


def policy_for(spec: AutoGLMSpec) -> Policy:
    """The policy from the spec's knobs (the same for the local runtime and the operator)."""
    a, e = spec.autoscaling, spec.experts
    return Policy(
        target=a.target, min_replicas=e.min_replicas, max_replicas=e.max_replicas,
        budget=spec.replica_budget, tolerance=a.tolerance, scale_up_limit=a.scale_up_limit,
        stabilization=float(a.stabilization_seconds),
        queue_guard_ms=float(a.queue_guard_milliseconds or 0),
        # a few missed intervals before the data counts as stale
        stale_after=max(15.0, 3.0 * a.interval_seconds))


def rate_window(spec: AutoGLMSpec, scrape_seconds: float) -> float:
    """The rate() window: at least six scrapes, 10 s and two intervals."""
    return max(6.0 * scrape_seconds, 10.0, 2.0 * spec.autoscaling.interval_seconds)


def rebalance_interval(spec: AutoGLMSpec, scrape_seconds: float) -> float:
    """The least time between two rebalances: the spec's, else the rate window."""
    given = spec.autoscaling.rebalance_interval_seconds
    return float(given) if given is not None else rate_window(spec, scrape_seconds)
