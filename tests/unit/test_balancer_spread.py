"""The balancer spreads idle-time calls over an expert's replicas whatever the calls to other
experts in between (a light, regular load must reach a newly added replica)."""

from __future__ import annotations

from autoglm.endpoints import Balancer


def test_ties_rotate_per_expert() -> None:
    b: Balancer[str] = Balancer(lambda a: a, lambda _: None)
    b.update({0: ["a0", "a1"], 1: ["b0", "b1"]})
    seen = set()
    for _ in range(4):  # each request: one call to expert 0, one to expert 1, all idle
        for expert in (0, 1):
            r = b.acquire(expert)
            if expert == 0:
                seen.add(r.address)
            b.release(r)
    assert seen == {"a0", "a1"}
