"""The per-expert autoscaling policy, with an explicit clock."""

from __future__ import annotations

from autoglm.autoscale import (
    Policy,
    Sample,
    State,
    apportion,
    decide,
    imbalance,
    place,
    serving_imbalance,
)

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


def test_placement_moves_a_serving_replica_only_for_a_clear_gain() -> None:
    # 430 on 4 is 107.5 per replica; one more would leave 300 on 3 = 100: a 7.5% gain
    assert place([4, 4], [8, 8], [300, 430], total=8, floor=1, tolerance=0.1) == (4, 4)
    assert place([4, 4], [8, 8], [300, 430], total=8, floor=1, tolerance=0.0) == (3, 5)
    assert place([4, 4], [8, 8], [200, 600], total=8, floor=1, tolerance=0.1) == (2, 6)
    # fewer in all: each goes where the load per replica stays lowest (150 > 143 on (2, 4))
    assert place([4, 4], [8, 8], [300, 430], total=6, floor=1, tolerance=0.1) == (3, 3)
    # with min_replicas 0, an idle expert may give its last replica, a loaded one never
    assert place([1, 1], [4, 4], [100, 0], total=2, floor=0) == (2, 0)
    assert place([1, 1], [4, 4], [500, 10], total=2, floor=0) == (1, 1)


BUDGETED = Policy(target=100, max_replicas=8, budget=6, scale_up_limit=8, tolerance=0.1)


def test_make_before_break_keeps_a_loaded_donor_until_new_replicas_serve() -> None:
    # Expert 1 needs 5, expert 0 still needs its 3: the budget (6) makes it (2, 4).
    s, d = decide(State(), [3, 3], Sample(0, (300.0, 500.0)), 0, BUDGETED)
    assert d.desired == (2, 4), "without ready: the old behaviour, break at once"
    s, d = decide(State(), [3, 3], Sample(0, (300.0, 500.0)), 0, BUDGETED, ready=[3, 3])
    assert d.desired == (3, 4) and "1 replicas kept over the budget" in d.reason
    s, d = decide(s, [3, 4], Sample(5, (300.0, 500.0)), 5, BUDGETED, ready=[3, 3])
    assert d.desired == (3, 4), "the new replica is still starting"
    s, d = decide(s, [3, 4], Sample(25, (300.0, 500.0)), 25, BUDGETED, ready=[3, 4])
    assert d.desired == (2, 4) and "over the budget" not in d.reason


def test_make_before_break_does_not_borrow_for_a_surplus() -> None:
    # The hot spot moved from expert 0 to 1: its stabilization window still asks for 6,
    # but its load needs 1, so the budget takes the surplus at once.
    p = Policy(target=100, max_replicas=8, budget=8, scale_up_limit=8, tolerance=0.1)
    s, _ = decide(State(), [6, 2], Sample(0, (600.0, 150.0)), 0, p)
    _, d = decide(s, [6, 2], Sample(5, (100.0, 500.0)), 5, p, ready=[6, 2])
    assert d.desired == (2, 6) and "over the budget" not in d.reason


def test_lookahead_scales_up_for_a_rising_rate_and_ignores_noise() -> None:
    p = Policy(target=100, max_replicas=8, scale_up_limit=8, lookahead=10)
    s, _ = decide(State(), [1], Sample(0, (100.0,)), 0, p)
    _, d = decide(s, [1], Sample(5, (300.0,)), 5, p)
    # +40 tokens/s per s, 10 s ahead: 700 (within the tolerance: ceil(700 / 110) = 7)
    assert d.desired == (7,)
    _, d = decide(State(), [1], Sample(5, (300.0,)), 5, p)
    assert d.desired == (3,), "no trend without an earlier sample"
    s, _ = decide(State(), [3], Sample(0, (280.0,)), 0, p)
    _, d = decide(s, [3], Sample(5, (300.0,)), 5, p)
    assert d.desired == (3,), "a 7% rise is within the tolerance: noise, not a trend"


def test_serving_imbalance_counts_load_a_replica_can_carry() -> None:
    assert serving_imbalance([100, 100], [1, 1], capacity=100) == 0
    # 300 on 1 replica carries 100 (the rest is unmet); mean over 4 replicas: 250 / 4
    assert serving_imbalance([300, 150], [1, 3], capacity=100) == (100 - 62.5) / 62.5
    assert serving_imbalance([0, 0], [1, 1], capacity=100) == 0
    assert serving_imbalance([50, 80], [0, 1], capacity=100) == 0, "no serving replica"


def test_policy_from_the_spec() -> None:
    from autoglm.autoscale import policy_for
    from autoglm.spec import parse

    spec = parse({"model": {"name": "m", "version": 1, "repository": "/m", "numExperts": 4,
                            "layers": 1},
                  "experts": {"minReplicas": 1, "maxReplicas": 3, "replicaBudget": 7},
                  "autoscaling": {"prometheusUrl": "http://p:9090", "target": 50,
                                  "queueGuardMilliseconds": 40, "stabilizationSeconds": 60}},
                 "m")
    p = policy_for(spec)
    assert (p.target, p.min_replicas, p.max_replicas, p.budget) == (50, 1, 3, 7)
    assert (p.queue_guard_ms, p.stabilization) == (40, 60)
    unguarded = spec.model_copy(update={"autoscaling": spec.autoscaling.model_copy(
        update={"queue_guard_milliseconds": None})})
    assert policy_for(unguarded).queue_guard_ms == 0, "no guard unless asked for"
