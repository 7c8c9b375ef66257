"""The placement of expert replicas on expert servers (autoglm.placement), on its own."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.placement import (
    Move,
    Placement,
    PlacementError,
    balancedness,
    imbalance,
    moves,
    place,
    progress,
    rebalance,
    server_loads,
    servers_needed,
)


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[int], int, list[float | None]]:
    experts = draw(st.integers(1, 40))
    capacity = draw(st.integers(1, 12))
    replicas = draw(st.lists(st.integers(1, 4), min_size=experts, max_size=experts))
    load: list[float | None] = draw(st.one_of(
        st.just([]),
        st.lists(st.floats(0, 1e4), min_size=experts, max_size=experts),
        st.lists(st.one_of(st.none(), st.floats(0, 1e4)), min_size=experts,
                 max_size=experts)))
    return replicas, capacity, load


def check(p: Placement, replicas: list[int], capacity: int) -> None:
    assert p.replicas(len(replicas)) == replicas  # every replica placed, once per server
    assert all(len(held) <= capacity for held in p.servers)
    assert all(e < len(replicas) for held in p.servers for e in held)


@settings(max_examples=300, deadline=None)
@given(problems())
def test_every_replica_is_placed_within_capacity_one_per_server(
        problem: tuple[list[int], int, list[float | None]]) -> None:
    replicas, capacity, load = problem
    p = place(replicas, capacity, load)
    assert len(p.servers) == servers_needed(replicas, capacity)
    check(p, replicas, capacity)
    assert place(replicas, capacity, load) == p, "deterministic"
    # from itself: nothing moves
    assert place(replicas, capacity, load, current=p) == p


@settings(max_examples=300, deadline=None)
@given(problems(), st.lists(st.integers(1, 4), min_size=40, max_size=40))
def test_a_new_replica_count_keeps_what_still_fits(
        problem: tuple[list[int], int, list[float | None]], other: list[int]) -> None:
    replicas, capacity, load = problem
    before = place(replicas, capacity, load)
    after_replicas = other[:len(replicas)]
    after = place(after_replicas, capacity, load, current=before)
    check(after, after_replicas, capacity)
    # one more replica of one expert (the server count unchanged): it is placed, and at most
    # one other replica moves to make room
    more = [*replicas]
    more[0] += 1
    if servers_needed(more, capacity) == len(before.servers):
        grown = place(more, capacity, load, current=before)
        check(grown, more, capacity)
        assert moves(before, grown) <= 2


def test_load_balances_the_servers_and_count_does_without_it() -> None:
    # 4 experts of 2 on 2 servers: the two hot ones apart
    p = place([1, 1, 1, 1], 2, [100.0, 90.0, 10.0, 5.0])
    assert sorted(sorted(h) for h in p.servers) == [[0, 3], [1, 2]]
    loads = server_loads(p, [1, 1, 1, 1], [100.0, 90.0, 10.0, 5.0])
    assert loads == [105.0, 100.0] and imbalance(loads) == pytest.approx(2.5 / 102.5)
    assert balancedness(loads) == pytest.approx(102.5 / 105)
    # no load known: by count
    assert [len(h) for h in place([1] * 5, 3).servers] == [3, 2]


def test_a_hot_experts_extra_replica_goes_to_a_server_without_it() -> None:
    replicas = [2, 1, 1, 1, 1, 1]
    p = place(replicas, 4, [600.0, 50.0, 50.0, 50.0, 50.0, 50.0])
    assert p.holders(0) == [0, 1]
    check(p, replicas, 4)


def test_a_256_expert_model_fits_a_handful_of_servers() -> None:
    p = place([1] * 256, 64)
    assert len(p.servers) == 4 and all(len(h) == 64 for h in p.servers)
    assert place([1] * 4, 1) == Placement(tuple(frozenset({e}) for e in range(4)))  # today's


def test_what_cannot_be_placed_is_refused_with_the_reason() -> None:
    with pytest.raises(PlacementError, match="expert 1 has 3 replicas but there are 2 servers"):
        place([1, 3], 4, servers=2)
    with pytest.raises(PlacementError, match="5 replicas do not fit on 2 servers of 2"):
        place([1, 2, 2], 2, servers=2)
    with pytest.raises(PlacementError, match="expert 0 has 0 replicas"):
        place([0, 1], 2)
    with pytest.raises(PlacementError, match="at least one expert"):
        servers_needed([1], 0)


def test_a_cornered_replica_swaps_one_other_to_make_room() -> None:
    # expert 2's third replica: the only free slot is on a server that holds it already
    current = Placement((frozenset({0, 2}), frozenset({1, 3}), frozenset({2})))
    p = place([1, 1, 3, 1], 2, current=current, servers=3)
    check(p, [1, 1, 3, 1], 2)
    assert moves(current, p) == 2


@settings(max_examples=300, deadline=None)
@given(problems(), st.lists(st.floats(0, 1e4), min_size=40, max_size=40),
       st.integers(0, 3), st.one_of(st.none(), st.integers(0, 6)))
def test_a_rebalance_keeps_the_constraints_and_reaches_its_placement_by_its_moves(
        problem: tuple[list[int], int, list[float | None]], shifted: list[float],
        extra_servers: int, max_moves: int | None) -> None:
    """From a placement made for one load, a rebalance for another: every constraint holds,
    the moves it names turn the current placement into its own, it never leaves the servers
    less even than the forced changes alone, and it is deterministic."""
    replicas, capacity, load = problem
    current = place(replicas, capacity, load)
    new_load: list[float | None] = list(shifted[:len(replicas)])
    servers = len(current.servers) + extra_servers
    r = rebalance(replicas, capacity, new_load, current, servers=servers, max_moves=max_moves)
    check(r.placement, replicas, capacity)
    assert len(r.placement.servers) == servers
    assert r == rebalance(replicas, capacity, new_load, current, servers=servers,
                          max_moves=max_moves)
    assert r.imbalance_after <= r.imbalance_before + 1e-9
    held = [set(h) for h in current.servers] + [set() for _ in range(extra_servers)]
    for m in r.moves:
        if m.source is not None:
            held[m.source].remove(m.expert)
        if m.target is not None:
            assert m.expert not in held[m.target]
            held[m.target].add(m.expert)
    assert tuple(frozenset(h) for h in held) == r.placement.servers
    forced = place(replicas, capacity, new_load, current=current, servers=servers)
    if not r.acted:
        assert r.placement == forced
    else:
        assert r.imbalance_before - r.imbalance_after > 0.02  # the default threshold
        if max_moves is not None:
            assert moves(forced, r.placement) <= max_moves
        # the moves beyond the forced ones (counted against the current placement) paid
        # their price: by default 0.25 of imbalance per whole placement moved, at most the
        # threshold (0.02) a move
        price = min(0.25 / sum(replicas), 0.02)
        extra = moves(current, r.placement) - moves(current, forced)
        assert r.imbalance_after + price * extra < r.imbalance_before + 1e-9


def test_a_rebalance_moves_load_off_the_hot_server_and_small_gains_wait() -> None:
    """Experts 0 and 1 on server 0 turn hot: one moves (a swap with a cold expert), nothing
    else; a load whose best placement gains under the threshold moves nothing."""
    current = Placement((frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5})))
    hot = [100.0, 100.0, 10.0, 10.0, 10.0, 10.0]
    r = rebalance([1] * 6, 2, hot, current)
    assert r.acted and r.imbalance_before == pytest.approx(200 / (240 / 3) - 1)
    assert sorted(len(h & {0, 1}) for h in r.placement.servers) == [0, 1, 1]
    assert moves(current, r.placement) == 2, "one swap"
    assert {(m.source, m.target) for m in r.moves} in (
        {(0, 1), (1, 0)}, {(0, 2), (2, 0)})
    mild = [12.0, 12.0, 10.0, 10.0, 10.0, 10.0]  # imbalance 0.125 -> 0.031: a gain of 0.094
    assert rebalance([1] * 6, 2, mild, current).acted
    assert not rebalance([1] * 6, 2, mild, current, threshold=0.1).acted, "hysteresis"
    assert rebalance([1] * 6, 2, mild, current, threshold=0.1).moves == ()
    # a new replica of expert 0 is a forced change: placed whether or not the rest moves
    grown = rebalance([2, 1, 1, 1, 1, 1], 3, mild, current, threshold=1.0)
    assert not grown.acted and grown.moves == (Move(0, None, grown.placement.holders(0)[1]),)


def test_a_skewed_live_load_is_evened_within_the_live_move_budget() -> None:
    """8 experts on 4 servers of 2, the two of server 0 hot (imbalance 0.39): a live
    rebalance (at most 4 moves) swaps one of them away."""
    current = place([1] * 8, 2)
    assert current.servers[0] == {0, 4}
    hot = [16.0, 10.0, 10.0, 10.0, 16.0, 10.0, 10.0, 10.0]
    r = rebalance([1] * 8, 2, hot, current, max_moves=4)
    assert r.acted and r.imbalance_before == pytest.approx(9 / 23)
    assert r.imbalance_after == pytest.approx(3 / 23) and len(r.moves) == 2


def test_moves_that_buy_less_than_their_price_are_not_made() -> None:
    """64 experts on 8 servers, placed for one load, then each expert's load off by up to
    20% (noise): with no price the descent evens the servers with 9 moves; at the default
    price (0.25 / 64 of imbalance a move) it stops after the 4 that pay for themselves."""
    rng = random.Random(0)
    base = [rng.uniform(1, 10) for _ in range(64)]
    current = place([1] * 64, 8, base, servers=8)
    noisy: list[float | None] = [x * rng.uniform(0.8, 1.2) for x in base]
    priced = rebalance([1] * 64, 8, noisy, current)
    free = rebalance([1] * 64, 8, noisy, current, move_cost=0)
    assert priced.acted and free.acted
    assert (len(priced.moves), len(free.moves)) == (4, 9)
    assert free.imbalance_after < priced.imbalance_after
    gained = priced.imbalance_after - free.imbalance_after
    assert gained < 0.25 / 64 * (len(free.moves) - len(priced.moves))
    assert rebalance([1] * 64, 8, noisy, current, move_cost=100).moves == ()


@settings(max_examples=150, deadline=None)
@given(problems(), st.lists(st.floats(0, 1e4), min_size=40, max_size=40),
       st.integers(1, 3), st.integers(0, 2**32))
def test_moves_made_from_pod_reports_never_leave_an_expert_unserved(
        problem: tuple[list[int], int, list[float | None]], shifted: list[float],
        pods_per_server: int, seed: int) -> None:
    """Pods that load slowly (an order takes effect a random number of steps later), miss
    answers, restart from their template (losing what moved in), or die for good while
    loading: until a restart each expert is held by every pod of some server (a restart is
    a failure no order prevents); every move ends done or, its target dead, is given up;
    the placement reached is the rebalance's, less what was given up, and every pod holds
    its server's part of it."""
    rng = random.Random(seed)
    replicas, capacity, load = problem
    live = place(replicas, capacity, load)
    r = rebalance(replicas, capacity, list(shifted[:len(replicas)]), live)
    n = len(live.servers)
    boot = [set(h) for h in live.servers]
    pods = [[set(h) for _ in range(pods_per_server)] for h in live.servers]
    loading: list[list[dict[int, int]]] = [[{} for _ in range(pods_per_server)]
                                           for _ in range(n)]
    dead = rng.randrange(n) if r.moves and rng.random() < 0.3 else None
    moves_left = list(r.moves)
    given_up = []
    restarted = False
    for step in range(80):
        for s in range(n):
            for i in range(pods_per_server):
                for e, due in list(loading[s][i].items()):
                    if due <= step and s != dead:
                        pods[s][i].add(e)
                        del loading[s][i][e]
                if step < 40 and rng.random() < 0.02 and s != dead:  # restarted from template
                    pods[s][i], loading[s][i] = set(boot[s]), {}
                    restarted = True
        reports = [[None if rng.random() < 0.1 else frozenset(h) for h in server]
                   for server in pods]
        for e in range(len(replicas) if not restarted else 0):  # on what pods really hold
            assert any(all(e in h for h in server) for server in pods), (e, pods)
        if step == 40 and dead is not None:  # a deadline passed: give up what is stuck
            given_up = [m for m in moves_left if m.target == dead]
            moves_left = [m for m in moves_left if m.target != dead]
        p = progress(live, moves_left, reports)
        live, moves_left = p.placement, list(p.pending)
        for (s, i), order in p.orders.items():
            for e in order["drop"]:
                pods[s][i].discard(e)
            for e in order["load"]:
                loading[s][i].setdefault(e, step + rng.randrange(3))
        in_flight = any(loading[s][i] for s in range(n) if s != dead
                        for i in range(pods_per_server))
        answered = all(r is not None for server in reports for r in server)
        if not moves_left and not p.orders and answered and not in_flight and step > 41:
            break
    assert not moves_left and not p.orders
    expected = [set(h) for h in r.placement.servers]
    for m in given_up:
        assert m.target is not None and m.source is not None
        expected[m.target].discard(m.expert)
        expected[m.source].add(m.expert)
    assert [set(h) for h in live.servers] == expected
    assert all(h == expected[s] for s in range(n) if s != dead for h in pods[s])


def test_a_pod_keeps_an_expert_that_moved_away_until_its_new_server_serves_it_again() -> None:
    """Expert 2 moved from server 0 to 1; both restarted from their templates (server 0's
    holds 2 again, server 1's lost it): server 1 reloads it, server 0 keeps it meanwhile,
    then drops it."""
    live = Placement((frozenset({0, 1}), frozenset({2, 3})))
    restarted = [[frozenset({0, 1, 2})], [frozenset({3})]]
    p = progress(live, (), restarted)
    assert p.orders == {(1, 0): {"load": [2], "drop": []}}
    again = progress(live, (), [[frozenset({0, 1, 2})], [frozenset({2, 3})]])
    assert again.orders == {(0, 0): {"load": [], "drop": [2]}}
    unanswered = progress(live, (), [[frozenset({0, 1, 2})], [frozenset({2, 3}), None]])
    assert unanswered.orders == {}, "a pod of server 1 unheard: it may lack expert 2"
