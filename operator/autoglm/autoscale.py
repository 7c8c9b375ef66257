"""Per-expert autoscaling: a pure policy with an injected clock.

Each expert's desired replicas follow the tokens the gate routes to it (the router's
counters: a leading signal, seen before any queue builds), with Triton queue time as a
guard. As Kubernetes' HPA: a tolerance band, a scale-up rate limit and a scale-down
stabilization window (the highest recommendation of the window wins). Then, unlike HPA,
the experts' answers only fix the total (within the replica budget), which is placed by
water-filling: every expert keeps at least ``min_replicas`` and each further replica goes
where the load per replica is highest, so hot experts get capacity from cold ones instead
of from a bigger bill, and per-replica load evens out.

Missing or stale metrics hold the current replicas (``metrics_ok`` is False with the
reason); the policy never scales down on missing data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


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


def apportion(caps: Sequence[int], load: Sequence[float], total: int,
              floor: int) -> tuple[int, ...]:
    """``total`` replicas: ``floor`` each, then one at a time to the expert with the highest
    load per replica that is below its cap (water-filling: equal load per replica)."""
    out = [floor] * len(caps)
    left = total - floor * len(caps)
    while left > 0:
        candidates = [i for i in range(len(out)) if out[i] < caps[i]]
        if not candidates:
            break
        i = max(candidates, key=lambda j: (load[j] / out[j], -j))
        out[i] += 1
        left -= 1
    return tuple(out)


def decide(state: State, current: Sequence[int], sample: Sample | None, now: float,
           policy: Policy) -> tuple[State, Decision]:
    cur = tuple(current)
    if sample is None or not sample.tokens_per_s:
        return state, Decision(cur, False, "no metrics yet: holding replicas")
    if now - sample.at > policy.stale_after:
        return state, Decision(cur, False, f"metrics stale for {now - sample.at:.0f} s: "
                                           "holding replicas")
    missing = [i for i, v in enumerate(sample.tokens_per_s) if v is None]
    if missing or len(sample.tokens_per_s) != len(cur):
        return state, Decision(cur, False, f"no load for experts {missing}: holding replicas")
    load = [float(v or 0.0) for v in sample.tokens_per_s]
    lo, hi = policy.min_replicas, policy.max_replicas

    raw = []
    for i, (c, x) in enumerate(zip(cur, load, strict=True)):
        ratio = x / (max(c, 1) * policy.target)
        want = c if abs(ratio - 1) <= policy.tolerance else math.ceil(x / policy.target)
        queue = sample.queue_ms[i] if i < len(sample.queue_ms) else None
        if policy.queue_guard_ms and queue is not None and queue > policy.queue_guard_ms:
            want = max(want, c + 1)
        want = min(max(want, lo), hi, c + policy.scale_up_limit)
        raw.append(want)

    window = [r for t, r in state.history if now - t < policy.stabilization]
    desired = []
    for i, (c, r) in enumerate(zip(cur, raw, strict=True)):
        if r >= c:
            desired.append(r)  # scale up (or stay) at once
        else:  # scale down only as far as the whole window agrees
            desired.append(min(c, max([r, *(w[i] for w in window)])))
    # The per-expert answers fix how many replicas in all (within the budget); water-filling
    # then places them where the load per replica is highest, within each expert's
    # bounds and scale-up limit, so per-replica load evens out across experts.
    total = sum(desired) if not policy.budget else min(sum(desired), policy.budget)
    caps = [min(hi, c + policy.scale_up_limit) for c in cur]
    desired = list(apportion(caps, load, min(total, sum(caps)), lo))
    history = (*((t, r) for t, r in state.history if now - t < policy.stabilization),
               (now, tuple(raw)))
    changes = tuple(
        f"expert {i}: {c} -> {d} replicas ({load[i]:.0f} tokens/s, target "
        f"{policy.target:g}/replica)"
        for i, (c, d) in enumerate(zip(cur, desired, strict=True)) if c != d)
    return State(history), Decision(tuple(desired), True,
                                    "scaling" if changes else "within tolerance", changes)
