"""The per-expert autoscaling policy, with an explicit clock."""

from __future__ import annotations

from autoglm.autoscale import Policy, Sample, State, apportion, decide, imbalance

P = Policy(target=100, min_replicas=1, max_replicas=8, tolerance=0.1, scale_up_limit=2,
           stabilization=300, stale_after=60)


def test_within_tolerance_nothing_moves() -> None:
    _, d = decide(State(), [2, 2], Sample(0, (205.0, 190.0)), 0, P)
    assert d.desired == (2, 2) and d.metrics_ok and d.changes == ()


def test_scale_up_is_immediate_but_rate_limited() -> None:
    _, d = decide(State(), [1, 1], Sample(0, (1000.0, 300.0)), 0, P)
    assert d.desired == (3, 3), "+2 at most per decision"
    assert d.changes[0].startswith("expert 0: 1 -> 3 replicas")


def test_scale_down_waits_for_the_stabilization_window() -> None:
    s, d = decide(State(), [4], Sample(0, (390.0,)), 0, P)
    assert d.desired == (4,)
    s, d = decide(s, [4], Sample(10, (90.0,)), 10, P)
    assert d.desired == (4,), "a recommendation of 4 is still in the window"
    s, d = decide(s, [4], Sample(301, (90.0,)), 301, P)
    assert d.desired == (1,)


def test_missing_or_stale_metrics_hold_and_say_why() -> None:
    for sample, now, why in ((None, 0, "no metrics"), (Sample(0, (5.0,)), 100, "stale"),
                             (Sample(0, (None,)), 0, "no load for experts [0]")):
        _, d = decide(State(), [3], sample, now, P)
        assert d.desired == (3,) and not d.metrics_ok and why in d.reason


def test_queue_time_guard_adds_a_replica() -> None:
    p = Policy(target=100, queue_guard_ms=50)
    _, d = decide(State(), [2], Sample(0, (200.0,), (80.0,)), 0, p)
    assert d.desired == (3,)


def test_budget_goes_where_load_per_replica_is_highest() -> None:
    # per replica: 800/5 = 160 and 400/3 = 133; (6, 2) would leave 200 on expert 1
    assert apportion([8, 8, 1, 1], [800, 400, 10, 10], total=10, floor=1) == (5, 3, 1, 1)
    assert apportion([2, 2], [1, 1], total=10, floor=1) == (2, 2), "never above a cap"
    p = Policy(target=100, max_replicas=8, budget=6, scale_up_limit=8)
    _, d = decide(State(), [1, 1, 1], Sample(0, (600.0, 300.0, 10.0)), 0, p)
    assert d.desired == (3, 2, 1), "wants (6, 3, 1) = 10 > budget 6"


def test_imbalance() -> None:
    assert imbalance([100, 100], [1, 1]) == 0
    assert round(imbalance([300, 100], [1, 1]), 3) == 0.5
    assert imbalance([0, 0], [1, 1]) == 0
