"""The gateway's balancer: which router replica a request goes to."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoglm.gateway.balance import Balancer, Load, prefix_keys
from autoglm.gateway.routing import (
    Hub,
    Replica,
    Routing,
    Target,
    balancing_policy,
    environment_error,
)

A, B, C = "a", "b", "c"
TENANT = "You are the assistant of tenant one. " * 5  # 180 characters: 2 blocks of 64


def test_prefix_keys_chain_over_whole_blocks() -> None:
    keys = prefix_keys("x" * 600, 256)
    assert len(keys) == 2  # the partial third block is not keyed
    assert prefix_keys("x" * 512 + "y", 256) == keys
    # a key stands for everything before it: the same block after another prefix differs
    assert prefix_keys("y" * 256 + "x" * 256, 256)[1] != keys[1]


def test_a_prefix_goes_back_to_its_replica() -> None:
    b: Balancer[str] = Balancer()
    first = b.pick([A, B, C], TENANT + "question 1")
    for n in range(2, 10):
        assert b.pick([A, B, C], TENANT + f"question {n}") == first
    assert b.picks == {"prefix": 8, "load": 1}
    # another tenant goes elsewhere while the first is busier
    b.started(first)
    other = b.pick([A, B, C], "Another tenant's system prompt. " * 5)
    assert other != first


def test_a_busy_prefix_replica_is_passed_over() -> None:
    b: Balancer[str] = Balancer(slack=2)
    owner = b.pick([A, B], TENANT + "q")
    for _ in range(2):
        b.started(owner)
    assert b.pick([A, B], TENANT + "q2") == owner  # 2 busier: within the slack
    b.started(owner)
    assert b.pick([A, B], TENANT + "q3") != owner  # 3 busier: the least busy
    # the prefix now points at the replica that was last sent it
    assert b.pick([A, B], TENANT + "q4") != owner


def test_a_queueing_replica_is_passed_over_for_one_that_is_not() -> None:
    b: Balancer[str] = Balancer()
    owner = b.pick([A, B], TENANT)
    b.report(owner, Load(running=8, waiting=1))
    other = B if owner == A else A
    b.report(other, Load(running=8, waiting=0))
    assert b.pick([A, B], TENANT + "more") == other


def test_reported_load_counts_other_gateways_calls() -> None:
    b: Balancer[str] = Balancer("least-load")
    b.report(A, Load(running=5))
    b.started(B)
    assert b.pick([A, B]) == B
    assert b.load(A) == 5 and b.load(B) == 1
    b.report(A, None)  # it stopped answering: only our own calls count
    assert b.pick([A, B]) == A


def test_round_robin_and_exclusions() -> None:
    b: Balancer[str] = Balancer("round-robin")
    assert {b.pick([A, B, C]) for _ in range(3)} == {A, B, C}
    assert b.pick([A, B], exclude=[A]) == B
    assert b.pick([A, B], exclude=[A, B]) in (A, B)  # every one tried: any again
    with pytest.raises(ValueError, match="no replica"):
        b.pick([])


def test_a_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="round-robin"):
        Balancer("random")  # type: ignore[arg-type]
    assert balancing_policy({"AUTOGLM_GATEWAY_BALANCE": "least-load"}) == "least-load"
    assert balancing_policy({}) == "prefix-load"
    with pytest.raises(ValueError, match="AUTOGLM_GATEWAY_BALANCE must be one of"):
        balancing_policy({"AUTOGLM_GATEWAY_BALANCE": "fastest"})


def test_the_index_is_bounded() -> None:
    b: Balancer[str] = Balancer(index_size=10, block_chars=4)
    for n in range(50):
        b.pick([A, B], f"{n:04d}" * 5)
    assert len(b._index) == 10


def test_tries_go_to_each_replica_once_then_stop() -> None:
    r1, r2 = Replica("http://r1", "r1"), Replica("http://r2", "r2")
    hub = Hub(Routing())
    target = Target("a", 1, "http://svc", "svc", replicas=(r1, r2))
    assert sorted(r.url for r in hub.tries(target)) == ["http://r1", "http://r2"]
    one = Target("a", 1, "http://svc", "svc")
    assert [r.url for r in hub.tries(one)] == ["http://svc", "http://svc"]  # tried twice
    retried = hub.traffic.retries.labels("a")._value.get()
    assert retried == 2


@given(st.lists(st.tuples(st.sampled_from([A, B, C]), st.booleans(),
                          st.integers(0, 3), st.integers(0, 2)), max_size=60),
       st.sampled_from(["prefix-load", "least-load", "round-robin"]))
def test_any_sequence_picks_a_candidate_and_keeps_counts_whole(
        steps: list[tuple[str, bool, int, int]], policy: str) -> None:
    b: Balancer[str] = Balancer(policy, block_chars=8)  # type: ignore[arg-type]
    held: list[str] = []
    for replica, start, tenant, waiting in steps:
        b.report(replica, Load(running=len(held), waiting=waiting))
        if start or not held:
            chosen = b.pick([A, B], f"tenant {tenant} " * 4)
            assert chosen in (A, B)
            b.started(chosen)
            held.append(chosen)
        else:
            b.ended(held.pop())
    for replica in (A, B):
        assert b.inflight.get(replica, 0) == held.count(replica)


def test_a_wrong_gateway_environment_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_GATEWAY_BALANCE", "least-load")
    assert environment_error() is None
    monkeypatch.setenv("AUTOGLM_GATEWAY_BALANCE", "fastest")
    assert environment_error() == ("AUTOGLM_GATEWAY_BALANCE must be one of prefix-load, "
                                   "least-load, round-robin, got 'fastest'")
    monkeypatch.delenv("AUTOGLM_GATEWAY_BALANCE")
    monkeypatch.setenv("AUTOGLM_GATEWAY_HEARTBEAT_SECONDS", "-1")
    assert environment_error() == "heartbeat_seconds must be positive, got -1.0"
