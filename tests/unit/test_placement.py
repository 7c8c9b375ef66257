"""The placement of expert replicas on expert servers (autoglm.placement), on its own."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.placement import (
    Placement,
    PlacementError,
    balancedness,
    imbalance,
    moves,
    place,
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
