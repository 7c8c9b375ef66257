"""bench/autoscaler: three replica policies replayed on synthetic MoE routing traces.

A capacity model, not servers: each replica serves CAPACITY tokens/s; a new replica serves
after STARTUP seconds; removed replicas stop at once. Traces (fixed seeds): Zipf-skewed
popularity, a hot expert that rotates, and bursts. Policies, all aiming at 80% utilization:

* fixed: the budget split equally, never changed;
* hpa: one Kubernetes HPA per expert on the same signal as ours, as fresh and with the
  same windows: every 5 s (``--horizontal-pod-autoscaler-sync-period=5s``) on the router's
  token rate (10 s rate, 2 s late) as an external metric with an AverageValue target, a
  120 s scale-down stabilization window; the rest is HPA's documented algorithm and default
  behaviour: desired = ceil(current * metric / target), no change within the 10% tolerance,
  scale down to the highest recommendation of the window, scale up at once, by at most
  max(+100%, +4 pods) over any 15 s (counted from the replicas 15 s before), no budget. The
  bar below is against this row;
* hpa-default: the same HPA on the default metrics pipeline, kept for comparison: every
  15 s, a 30 s average 15 s late (metrics-server), the default 300 s window;
* ours: `autoglm.autoscale.decide` every 5 s on the router's token rate (10 s rate, 2 s
  late), budget shared by load, told which replicas serve (make-before-break), with the
  rate's trend extrapolated over its 10 s window, a 120 s stabilization window;
* oracle: a reference, not a policy: sees each second's demand as it happens (no rate
  window, no delay, no rate limit) and places ceil(demand / target) by water-filling every
  second, so all it suffers is the 20 s start-up (and, running that tight, noise: hence
  its many seconds with a little unmet demand). It shows what the start-up alone costs.

Printed side by side: replica-seconds, seconds with unmet demand, share of demand unmet,
load imbalance, and reaction time (from a demand step to enough serving capacity), with
ratios against `hpa` (same signal), then a PASS/FAIL line per trace against the bar: less
unmet demand than `hpa` at no more replica-seconds, and imbalance <= 0.15.

Imbalance (the same for every policy, from second 60): each second, (max - mean)/mean of
the load per serving replica, the mean taken over serving replicas, a replica carrying at
most CAPACITY (`autoscale.serving_imbalance`); then the mean over seconds. Demand above
capacity is counted once, as unmet demand: counted as load too, the 20 s start-up
dominates the figure (an expert that jumps 5x has 5x load per replica until new replicas
serve, whatever the policy). `imb/exp` is the earlier figure for comparison: demand per
replica, the mean taken over experts. A PNG plots the traces and replica curves.

    .venv/bin/python bench/autoscaler/bench_autoscaler.py [--png bench/autoscaler/replicas.png]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from autoglm.autoscale import (
    Policy,
    Sample,
    State,
    apportion,
    decide,
    imbalance,
    serving_imbalance,
)

N, T = 8, 1800  # experts, seconds
CAPACITY = 100.0  # tokens/s per replica
TARGET = 80.0  # tokens/s per replica the policies aim at
STARTUP = 20  # seconds before a new replica serves
BUDGET = 64
MAX_PER_EXPERT = 24
BAR_IMBALANCE = 0.15
Demand = NDArray[np.float64]  # [T, N] tokens/s


def zipf(seed: int, total: float = 4000.0, s: float = 1.1) -> Demand:
    rng = np.random.default_rng(seed)
    w = 1 / np.arange(1, N + 1) ** s
    w = w[rng.permutation(N)] / w.sum()
    noise = rng.normal(1, 0.05, (T, N)).clip(0.8, 1.2)
    return np.asarray(total * w * noise, dtype=np.float64)


def rotating(seed: int, total: float = 4000.0, period: int = 300) -> Demand:
    rng = np.random.default_rng(seed)
    d = np.empty((T, N))
    for t in range(T):
        hot = (t // period) % N
        w = np.full(N, 0.6 / (N - 1))
        w[hot] = 0.4
        d[t] = total * w
    return np.asarray(d * rng.normal(1, 0.05, (T, N)).clip(0.8, 1.2), dtype=np.float64)


def bursts(seed: int) -> Demand:
    rng = np.random.default_rng(seed)
    d = zipf(seed, total=3000.0)
    for start in range(120, T - 60, 250):
        e = int(rng.integers(N))
        d[start:start + 60, e] *= 3.0
    return d


@dataclass
class Result:
    replicas: NDArray[np.int64]  # [T, N] replicas that exist (cost)
    serving: NDArray[np.int64]  # [T, N] replicas that serve


# (second, replicas, serving replicas, demand) -> replicas wanted, or None for no change
Controller = Callable[[int, NDArray[np.int64], NDArray[np.int64], Demand],
                      NDArray[np.int64] | None]


def simulate(demand: Demand, start: NDArray[np.int64], control: Controller) -> Result:
    replicas = np.zeros((T, N), dtype=np.int64)
    serving = np.zeros((T, N), dtype=np.int64)
    ready_at: list[list[int]] = [[0] * int(start[i]) for i in range(N)]  # per replica
    for t in range(T):
        current = np.array([len(r) for r in ready_at], dtype=np.int64)
        ready = np.array([sum(1 for x in r if x <= t) for r in ready_at], dtype=np.int64)
        want = control(t, current, ready, demand)
        if want is not None:
            for i in range(N):
                while len(ready_at[i]) < want[i]:
                    ready_at[i].append(t + STARTUP)
                while len(ready_at[i]) > want[i]:
                    ready_at[i].pop()  # the newest goes first
        replicas[t] = [len(r) for r in ready_at]
        serving[t] = [sum(1 for x in r if x <= t) for r in ready_at]
    return Result(replicas, serving)


def fixed() -> Controller:
    return lambda t, cur, ready, d: None


def oracle() -> Controller:
    def control(t: int, cur: NDArray[np.int64], ready: NDArray[np.int64],
                d: Demand) -> NDArray[np.int64] | None:
        total = min(BUDGET, math.ceil(float(d[t].sum()) / TARGET))
        return np.array(apportion([MAX_PER_EXPERT] * N, d[t].tolist(), total, 1))

    return control


@dataclass(frozen=True)
class Hpa:
    """What one HPA per expert sees and the windows it acts over (seconds)."""

    sync: int  # between evaluations (kube-controller-manager's sync period)
    window: int  # the metric is an average over this
    delay: int  # and arrives this late
    stabilization: int  # scale-down stabilization window
    tolerance: float = 0.1
    up_percent: int = 100  # scale-up policies (the documented defaults), the larger wins:
    up_pods: int = 4  # +100% or +4 pods
    up_period: int = 15  # over any 15 s


HPA_SAME_SIGNAL = Hpa(sync=5, window=10, delay=2, stabilization=120)  # as fresh as ours
HPA_DEFAULT_PIPELINE = Hpa(sync=15, window=30, delay=15, stabilization=300)


def hpa(cfg: Hpa) -> Controller:
    """Kubernetes' HPA algorithm, one per expert, on the experts' token rate as seen by
    ``cfg`` (kube-controller-manager's horizontal.go: stabilizeRecommendationWithBehaviors,
    then calculateScaleUpLimitWithScalingRules; the default scale-down policy, -100% per
    15 s, limits nothing)."""
    recommendations: list[tuple[int, NDArray[np.int64]]] = []
    changes: list[tuple[int, NDArray[np.int64]]] = []  # (second, replicas added or removed)

    def control(t: int, cur: NDArray[np.int64], ready: NDArray[np.int64],
                d: Demand) -> NDArray[np.int64] | None:
        if t % cfg.sync or t < cfg.window + cfg.delay:
            return None
        seen = d[t - cfg.delay - cfg.window:t - cfg.delay].mean(axis=0)
        ratio = seen / np.maximum(cur, 1) / TARGET
        rec = np.where(np.abs(ratio - 1) <= cfg.tolerance, cur,
                       np.ceil(seen / TARGET)).astype(np.int64)
        recommendations.append((t, rec))
        highest = np.max([r for s, r in recommendations if t - s < cfg.stabilization], axis=0)
        want = np.where(rec > cur, rec, np.minimum(cur, highest))  # down to the window's max
        start = cur - sum((c for s, c in changes if t - s < cfg.up_period),
                          np.zeros(N, dtype=np.int64))  # replicas at the period's start
        up_limit = np.maximum(np.ceil(start * (1 + cfg.up_percent / 100)).astype(np.int64),
                              start + cfg.up_pods)
        want = np.clip(np.minimum(want, up_limit), 1, MAX_PER_EXPERT)
        changes.append((t, want - cur))
        return want

    return control


OURS = Policy(target=TARGET, min_replicas=1, max_replicas=MAX_PER_EXPERT, budget=BUDGET,
              tolerance=0.1, scale_up_limit=12, stabilization=120, stale_after=60,
              lookahead=10, move_tolerance=0.1)


def ours(policy: Policy = OURS, make_before_break: bool = True) -> Controller:
    state = [State()]

    def control(t: int, cur: NDArray[np.int64], ready: NDArray[np.int64],
                d: Demand) -> NDArray[np.int64] | None:
        if t % 5 or t < 12:
            return None
        rate = d[t - 12:t - 2].mean(axis=0)  # rate() over 10 s, 2 s late
        state[0], decision = decide(state[0], cur.tolist(),
                                    Sample(float(t - 2), tuple(rate.tolist())), float(t),
                                    policy,
                                    ready=ready.tolist() if make_before_break else None)
        return np.array(decision.desired, dtype=np.int64)

    return control


def reaction_time(demand: Demand, res: Result) -> float:
    """Mean seconds from a demand step (an expert's need rising by 2+ replicas) until
    its serving capacity covers it."""
    need = np.ceil(demand / CAPACITY)
    delays = []
    for i in range(N):
        for t in range(1, T - 1):
            if need[t, i] - need[t - 1, i] >= 2:
                covered = next((s for s in range(t, T)
                                if res.serving[s, i] * CAPACITY >= demand[s, i]), T)
                delays.append(covered - t)
    return float(np.mean(delays)) if delays else 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--png", default="")
    args = ap.parse_args()
    traces = {"zipf": zipf(1), "rotating": rotating(2), "bursts": bursts(3)}
    policies: dict[str, Callable[[], Controller]] = {
        "fixed": fixed, "hpa": lambda: hpa(HPA_SAME_SIGNAL),
        "hpa-default": lambda: hpa(HPA_DEFAULT_PIPELINE), "ours": ours, "oracle": oracle}
    results: dict[tuple[str, str], Result] = {}
    verdicts = []
    print(f"{N} experts, {T} s, {CAPACITY:g} tokens/s per replica, target {TARGET:g}, "
          f"startup {STARTUP} s, budget {BUDGET} (ours, fixed)")
    print("hpa:         HPA on our signal, as fresh (every 5 s, 10 s rate 2 s late, 120 s window)\n"
          "hpa-default: HPA, default metrics pipeline (every 15 s, 30 s avg 15 s late, 300 s)\n"
          "`vs hpa` and the PASS/FAIL bar: against hpa\n")
    print(f"{'trace':9} {'policy':11} {'replica-s':>10} {'vs hpa':>7} {'unmet s':>8} "
          f"{'unmet %':>8} {'vs hpa':>7} {'imbalance':>9} {'vs hpa':>7} {'imb/exp':>8} "
          f"{'reaction s':>10}")
    for tname, d in traces.items():
        for pname, make in policies.items():
            start = np.full(N, BUDGET // N if pname == "fixed" else
                            max(1, math.ceil(d[0].sum() / TARGET / N)), dtype=np.int64)
            results[(tname, pname)] = simulate(d, start, make())
        figures: dict[str, tuple[float, float, float]] = {}
        for pname in policies:
            r = results[(tname, pname)]
            unmet = np.maximum(d - r.serving * CAPACITY, 0)
            figures[pname] = (float(r.replicas.sum()), float(100 * unmet.sum() / d.sum()),
                          float(np.mean([serving_imbalance(d[t].tolist(), r.serving[t].tolist(),
                                                           CAPACITY) for t in range(60, T)])))
        for pname in policies:
            r = results[(tname, pname)]
            rs, un, imb = figures[pname]
            brs, bun, bimb = figures["hpa"]
            old = np.mean([imbalance(d[t].tolist(), r.serving[t].tolist())
                           for t in range(60, T)])
            unmet_s = int((np.maximum(d - r.serving * CAPACITY, 0).sum(axis=1) > 0).sum())
            print(f"{tname:9} {pname:11} {int(rs):>10} {rs / brs:>7.2f} {unmet_s:>8} "
                  f"{un:>7.2f}% {un / bun:>7.2f} {imb:>9.3f} {imb / bimb:>7.2f} {old:>8.3f} "
                  f"{reaction_time(d, r):>10.1f}")
        rs, un, imb = figures["ours"]
        brs, bun, _ = figures["hpa"]
        ok = un < bun and rs <= brs and imb <= BAR_IMBALANCE
        verdicts.append(f"{'PASS' if ok else 'FAIL'} {tname}: unmet {un:.2f}% vs hpa "
                        f"{bun:.2f}% ({'<' if un < bun else 'not <'}), replica-s "
                        f"{rs / brs:.3f}x hpa ({'<=' if rs <= brs else '>'} 1), imbalance "
                        f"{imb:.3f} ({'<=' if imb <= BAR_IMBALANCE else '>'} "
                        f"{BAR_IMBALANCE:g})")
    print()
    print("\n".join(verdicts))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(traces), 2, figsize=(14, 3.2 * len(traces)),
                                 sharex=True)
        for row, (tname, d) in enumerate(traces.items()):
            axes[row][0].plot(d / CAPACITY)
            axes[row][0].set_ylabel(f"{tname}\nreplicas needed")
            for pname, style in (("hpa-default", "-."), ("hpa", ":"), ("ours", "-")):
                total = results[(tname, pname)].serving.sum(axis=1)
                axes[row][1].plot(total, style, label=f"{pname} (serving, total)")
            axes[row][1].plot(np.ceil(d / CAPACITY).sum(axis=1), "k--", lw=0.8,
                              label="needed")
            axes[row][1].legend(loc="upper right", fontsize=8)
        axes[0][0].set_title("demand per expert")
        axes[0][1].set_title("replicas")
        axes[-1][0].set_xlabel("seconds")
        axes[-1][1].set_xlabel("seconds")
        fig.tight_layout()
        fig.savefig(args.png, dpi=80)
        print(f"\nplot: {args.png}")
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
