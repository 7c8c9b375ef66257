"""The balancer spreads idle-time calls over an expert's servers whatever the calls to other
experts in between (a light, regular load must reach a newly added replica)."""

from __future__ import annotations

from autoglm.endpoints import Balancer


def test_ties_rotate_per_expert() -> None:
    b = Balancer()
    b.update({"a0": [0], "a1": [0], "b0": [1], "b1": [1]})
    seen = set()
    for _ in range(4):  # each request: one call to expert 0, one to expert 1, all idle
        chosen, _ = b.assign([0, 1])
        seen.add(chosen[0].address)
        for s in {s.address: s for s in chosen.values()}.values():
            b.release(s)
    assert seen == {"a0", "a1"}


def test_a_replicated_expert_rotates_among_its_servers() -> None:
    b = Balancer()
    b.update({"a": [0, 1], "b": [0, 2]})
    seen = set()
    for _ in range(4):
        chosen, _ = b.assign([0, 1])  # a is called anyway: 0 still reaches b
        seen.add(chosen[0].address)
        for s in {s.address: s for s in chosen.values()}.values():
            b.release(s)
    assert seen == {"a", "b"}
