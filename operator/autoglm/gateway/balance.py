"""Which router replica serves a request: pure (no I/O), shared by every surface of the
gateway and by ``bench/routing``.

Three policies (``AUTOGLM_GATEWAY_BALANCE``):

- ``prefix-load`` (default): a generation goes to the replica that most likely holds its
  prompt's prefix in its KV cache, unless that replica is busier than the least busy one by
  more than ``slack`` (or queues while another does not); otherwise to the least busy.
  Prefix scoring alone overloads the replica of a popular prefix (llm-d measured about 55% of
  requests succeeding); load alone scatters a tenant's system prompt over every replica's
  cache, which then holds each prefix once per replica and evicts them sooner.
- ``least-load``: the least busy replica.
- ``round-robin``: each replica in turn.

A replica's load is what the gateway knows at once (its own calls in flight there) or, if
more, what the replica itself last reported (its running + waiting sequences, read from its
metrics every fraction of a second: other gateways' calls too, without Prometheus' lag).

The prefix index is the gateway's own, approximate: the prompt is cut into blocks of
``block_chars`` characters, each keyed by a hash chained over every block before it (as the
engine keys its KV blocks by tokens), and each key remembers the replica it was last sent to.
A prompt matches the replica last sent the longest run of its leading blocks. The index is bounded
(least recently used keys go first), so a gateway's memory does not grow with traffic.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from prometheus_client.parser import text_string_to_metric_families

R = TypeVar("R", bound=Hashable)
Policy = Literal["prefix-load", "least-load", "round-robin"]
POLICIES: tuple[Policy, ...] = ("prefix-load", "least-load", "round-robin")


@dataclass(frozen=True)
class Load:
    """What a replica reported of itself (its engine's gauges)."""

    running: int = 0
    waiting: int = 0

    @property
    def busy(self) -> int:
        return self.running + self.waiting


def engine_load(text: str) -> Load | None:
    """A router's running and waiting sequences from its metrics page (None: not there)."""
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name in ("autoglm_generate_running", "autoglm_generate_waiting"):
                found[family.name] = sum(s.value for s in family.samples)
    except ValueError:  # a malformed page: nothing read from it
        return None
    if len(found) < 2:
        return None
    return Load(int(found["autoglm_generate_running"]), int(found["autoglm_generate_waiting"]))


def prefix_keys(prompt: str, block_chars: int) -> list[bytes]:
    """The chained keys of the prompt's whole blocks: key i stands for blocks 0..i."""
    keys: list[bytes] = []
    previous = b""
    for start in range(0, len(prompt) - block_chars + 1, block_chars):
        previous = hashlib.blake2b(previous + prompt[start:start + block_chars].encode(),
                                   digest_size=16).digest()
        keys.append(previous)
    return keys


class Balancer(Generic[R]):
    """Picks replicas and keeps what it needs for that: calls in flight per replica, the
    loads they last reported, and the prefix index."""

    def __init__(self, policy: Policy = "prefix-load", block_chars: int = 64,
                 index_size: int = 65536, slack: int = 4) -> None:
        if policy not in POLICIES:
            raise ValueError(f"balancing policy must be one of {', '.join(POLICIES)}, "
                             f"got {policy!r}")
        self.policy, self.block_chars = policy, block_chars
        self.index_size, self.slack = index_size, slack
        self.inflight: dict[R, int] = {}
        self.reported: dict[R, Load] = {}
        self._index: OrderedDict[bytes, R] = OrderedDict()
        self._turn = 0
        self.picks = {"prefix": 0, "load": 0}  # why replicas were picked (prefix-load)

    # -- what the balancer knows ----------------------------------------------------------

    def started(self, replica: R) -> None:
        self.inflight[replica] = self.inflight.get(replica, 0) + 1

    def ended(self, replica: R) -> None:
        left = self.inflight.get(replica, 0) - 1
        if left > 0:
            self.inflight[replica] = left
        else:
            self.inflight.pop(replica, None)

    def report(self, replica: R, load: Load | None) -> None:
        """The replica's own figures (None: it did not answer; only ours count then)."""
        if load is None:
            self.reported.pop(replica, None)
        else:
            self.reported[replica] = load

    def forget(self, keep: Iterable[R]) -> None:
        """Drop the reports of replicas no longer served (their index keys age out)."""
        kept = set(keep)
        for gone in [r for r in self.reported if r not in kept]:
            del self.reported[gone]

    def load(self, replica: R) -> int:
        reported = self.reported.get(replica)
        return max(self.inflight.get(replica, 0), reported.busy if reported else 0)

    def queueing(self, replica: R) -> bool:
        reported = self.reported.get(replica)
        return reported is not None and reported.waiting > 0

    # -- picking --------------------------------------------------------------------------

    def pick(self, replicas: Sequence[R], prompt: str | None = None,
             exclude: Iterable[R] = ()) -> R:
        """The replica for a request (``prompt``: the text its prefix is read from; None
        for a request that is not a generation). ``exclude``: replicas already tried; if
        every one was, the least busy of all."""
        if not replicas:
            raise ValueError("no replica to pick from")
        tried = set(exclude)
        candidates = [r for r in replicas if r not in tried] or list(replicas)
        if self.policy == "round-robin":
            self._turn += 1
            chosen = candidates[self._turn % len(candidates)]
        else:
            chosen = self._least(candidates)
            if self.policy == "prefix-load" and prompt:
                chosen = self._by_prefix(candidates, prompt, chosen)
        return chosen

    def _least(self, candidates: Sequence[R]) -> R:
        # ties go to the replica after the last one picked, so idle replicas share the work
        self._turn += 1
        n = len(candidates)
        order = [candidates[(self._turn + i) % n] for i in range(n)]
        return min(order, key=lambda r: (self.queueing(r), self.load(r)))

    def _by_prefix(self, candidates: Sequence[R], prompt: str, least: R) -> R:
        keys = prefix_keys(prompt, self.block_chars)
        owner = self._owner(candidates, keys)
        chosen = least
        if owner is not None and owner != least and self._has_room(owner, least):
            chosen = owner
        self.picks["prefix" if owner is not None and chosen == owner else "load"] += 1
        self._remember(keys, chosen)
        return chosen

    def _owner(self, candidates: Sequence[R], keys: Sequence[bytes]) -> R | None:
        """The candidate last sent the longest known run of this prompt's leading blocks
        (a replica sent block i's key was sent every block before it too)."""
        allowed = set(candidates)
        owner = None
        for key in keys:
            replica = self._index.get(key)
            if replica is None:
                break
            if replica in allowed:
                owner = replica
        return owner

    def _has_room(self, owner: R, least: R) -> bool:
        """The prefix's replica is not saturated: it does not queue while the least busy
        does not, and is not busier than it by more than ``slack`` (nor by half again)."""
        if self.queueing(owner) and not self.queueing(least):
            return False
        base = self.load(least)
        return self.load(owner) <= base + max(self.slack, base // 2)

    def _remember(self, keys: Sequence[bytes], replica: R) -> None:
        for key in keys:
            self._index[key] = replica
            self._index.move_to_end(key)
        while len(self._index) > self.index_size:
            self._index.popitem(last=False)
