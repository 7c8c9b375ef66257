"""Router replicas (``spec.router.autoscaling``): a pure decision with an injected clock.

The serving slot's routers report their KV cache in use, their sequences waiting for it and
their time to first token (autoglm/prometheus.py: ``Prometheus.router_sample``). Each
target given recommends HPA's ``ceil(pods * observed / target)``; the highest wins. The rest
is the experts' policy (:func:`autoglm.autoscale.decide`, for one "expert" whose load is
counted in replicas at their target): the tolerance band, at most ``scaleUpLimit`` replicas
added per decision, ``minReplicas``..``maxReplicas`` (the budget), and the scale-down
stabilization window (the highest recommendation of the window wins, as HPA's).

Missing or stale metrics hold the replicas (brought within the bounds) and the reason names
what is missing; the decision never scales down on missing data. Pods that do not report
yet (a replica starting) count as idle when scaling up, so a replica being added is not
asked for twice, and at the target when scaling down, so a pod without metrics never makes
the tier smaller (both HPA's rule for pods without metrics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autoglm import autoscale

if TYPE_CHECKING:
    from autoglm.spec import AutoGLMSpec

KV = "KV cache use"
WAITING = "waiting sequences"
TTFT = "TTFT p90"


@dataclass(frozen=True)
class RouterSample:
    """What Prometheus says of the slot's routers: ``at``, when the newest sample was
    scraped; ``pods``, the router pods reporting; each figure None when its series is
    missing."""

    at: float
    pods: int
    kv_cache_utilization: float | None  # KV cache used / capacity over the pods
    waiting_per_replica: float | None = None  # sequences waiting for KV cache, per pod
    ttft_p90_seconds: float | None = None  # over the rate window; 0: no first token in it


@dataclass(frozen=True)
class RouterPolicy:
    scaling: autoscale.Policy  # bounds, tolerance, rate limit, window; its target is 1
    kv_cache_utilization: float = 0.7
    waiting_per_replica: float | None = None
    ttft_p90_seconds: float | None = None

    def targets(self, sample: RouterSample) -> list[tuple[str, float | None, float]]:
        """(metric, observed, target) of each target given."""
        out = [(KV, sample.kv_cache_utilization, self.kv_cache_utilization)]
        if self.waiting_per_replica is not None:
            out.append((WAITING, sample.waiting_per_replica, self.waiting_per_replica))
        if self.ttft_p90_seconds is not None:
            out.append((TTFT, sample.ttft_p90_seconds, self.ttft_p90_seconds))
        return out


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    metrics_ok: bool = True


def policy_for(spec: AutoGLMSpec) -> RouterPolicy:
    """The router policy of ``spec``: its own bounds, targets, rate limit and window; the
    experts' tolerance and staleness (spec.autoscaling), read the same way."""
    a = spec.router.autoscaling
    experts = autoscale.policy_for(spec)
    return RouterPolicy(
        autoscale.Policy(target=1.0, min_replicas=a.min_replicas, max_replicas=a.max_replicas,
                         tolerance=experts.tolerance, scale_up_limit=a.scale_up_limit,
                         stabilization=float(a.stabilization_seconds),
                         stale_after=experts.stale_after),
        a.kv_cache_utilization, a.waiting_per_replica, a.ttft_p90_seconds)


def bounded(policy: RouterPolicy, replicas: int) -> int:
    return min(max(replicas, policy.scaling.min_replicas), policy.scaling.max_replicas)


def initial_replicas(spec: AutoGLMSpec) -> int:
    """A new router Deployment's replicas: ``spec.router.replicas``, within the bounds when
    the autoscaler owns them."""
    a = spec.router.autoscaling
    if not a.enabled:
        return spec.router.replicas
    return min(max(spec.router.replicas, a.min_replicas), a.max_replicas)


def _percent(x: float) -> str:
    """70%, 2%, 0.5%: whole percents where they say enough."""
    return f"{x:.0%}" if x >= 0.01 or x == 0 else f"{x:.1%}"


def describe(metric: str, observed: float, target: float) -> str:
    if metric == KV:
        return f"{metric} {_percent(observed)} (target {_percent(target)})"
    if metric == TTFT:
        return f"{metric} {observed:.2f} s (target {target:g} s)"
    return f"{observed:.1f} {metric} per replica (target {target:g})"


def decide(policy: RouterPolicy, sample: RouterSample | None, current: int,
           state: autoscale.State, now: float) -> tuple[autoscale.State, Decision]:
    """The router replicas for ``current`` replicas and what the routers report; the state
    carries the stabilization window (start it with ``(now, (current,))``, so that nothing
    scales down before a whole window has passed)."""
    p = policy.scaling
    held = bounded(policy, current)

    def hold(why: str) -> tuple[autoscale.State, Decision]:
        return state, Decision(held, f"{why}: holding {held} router replicas", False)

    if sample is None:
        return hold("no router metrics")
    targets = policy.targets(sample)
    missing = [m for m, observed, _ in targets if observed is None or math.isnan(observed)]
    if sample.pods < 1 or missing:
        return hold(f"no {', '.join(missing or [m for m, _, _ in targets])} from the "
                    "slot's routers")
    if now - sample.at > p.stale_after:
        return hold(f"router metrics stale for {now - sample.at:.0f} s")
    ratios = [(observed or 0.0) / target for _, observed, target in targets]
    load = sample.pods * max(ratios)  # in replicas at target
    if load < current:  # pods not reporting count as at the target: they hold the tier
        load = min(load + max(0, current - sample.pods), float(current))
    state, d = autoscale.decide(state, [current], autoscale.Sample(sample.at, (load,)), now,
                                p)
    if not d.metrics_ok:  # (checked above; the experts' policy says so in its own words)
        return hold(d.reason)
    replicas = d.desired[0]
    wanted = state.history[-1][1][0]  # this decision's recommendation, before the window
    seen = ", ".join(describe(m, observed or 0.0, target) for m, observed, target in targets)
    if replicas > current:
        outcome = f"{current} -> {replicas} replicas"
    elif replicas < current:
        outcome = (f"{current} -> {replicas} replicas (every recommendation of the last "
                   f"{p.stabilization:g} s at most {replicas})" if current <= p.max_replicas
                   else f"{current} -> {replicas} replicas (maxReplicas)")
    elif wanted < current:
        outcome = (f"holding {current} replicas: {wanted} wanted, the scale-down waits for "
                   f"the {p.stabilization:g} s stabilization window")
    elif load > current * (1 + p.tolerance) and current >= p.max_replicas:
        outcome = f"{current} replicas (maxReplicas)"
    elif sample.pods < current:
        outcome = (f"{current} replicas ({sample.pods} reporting: the others count as at "
                   "the target)")
    else:
        outcome = f"{current} replicas, within tolerance"
    return state, Decision(replicas, f"{seen}: {outcome}")
