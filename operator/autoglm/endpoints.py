"""Where each expert's replicas are, and which one takes the next call.

A :class:`Resolver` turns an endpoint spec into addresses, re-read every few seconds:

* ``dns:///host:port``: every address the name resolves to (a headless Service lists one
  per ready pod);
* ``host:port|host:port``: a fixed list;
* a JSON file ``{"<expert>": ["host:port", ...]}`` that the local runtime rewrites.

:class:`Balancer` keeps one channel per replica and sends each call to the replica with the
fewest calls in flight, skipping for a moment a replica that just failed, so new replicas
get traffic within a resolve period and gRPC connection pinning never starves them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

C = TypeVar("C")


def _resolve_one(spec: str) -> list[str]:
    if spec.startswith("dns:///"):
        host, _, port = spec[len("dns:///"):].rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror:
            return []
        return sorted({f"{i[4][0]}:{port}" for i in infos})
    return [a for a in spec.split("|") if a]


@dataclass
class Resolver:
    """Expert index → replica addresses, from specs (one per expert) or a JSON file."""

    specs: Sequence[str] = ()
    file: Path | None = None
    _mtime: float = field(default=-1.0, init=False)
    _cache: dict[int, list[str]] = field(default_factory=dict, init=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Resolver:
        specs = [s for s in env.get("AUTOGLM_EXPERT_ENDPOINTS", "").split(",") if s]
        file = env.get("AUTOGLM_EXPERT_ENDPOINTS_FILE")
        return cls(specs, Path(file) if file else None)

    def resolve(self) -> dict[int, list[str]]:
        if self.file is not None:
            try:
                mtime = self.file.stat().st_mtime
                if mtime != self._mtime:
                    raw = json.loads(self.file.read_text())
                    self._cache = {int(k): list(v) for k, v in raw.items()}
                    self._mtime = mtime
            except (OSError, ValueError):
                pass  # a file being rewritten: keep the last good answer
            return dict(self._cache)
        return {i: _resolve_one(s) for i, s in enumerate(self.specs)}


class NoReplica(RuntimeError):
    """No replica of an expert is known or reachable."""


@dataclass
class Replica(Generic[C]):
    address: str
    channel: C
    in_flight: int = 0
    down_until: float = 0.0


class Balancer(Generic[C]):
    """Least-outstanding-requests over each expert's replicas, one channel per replica."""

    def __init__(self, connect: Callable[[str], C], close: Callable[[C], None],
                 penalty_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        self._connect, self._close = connect, close
        self._penalty = penalty_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._replicas: dict[int, dict[str, Replica[C]]] = {}
        # per expert: one counter shared by all experts lets a regular request mix always
        # land the same expert on the same replica (the parity of the other calls decides)
        self._rr: dict[int, int] = {}

    def update(self, endpoints: Mapping[int, Sequence[str]]) -> None:
        """Adopt a new view: open channels to new replicas, close those gone."""
        closing: list[C] = []
        with self._lock:
            for expert, addresses in endpoints.items():
                current = self._replicas.setdefault(expert, {})
                for a in addresses:
                    if a not in current:
                        current[a] = Replica(a, self._connect(a))
                for a in list(current):
                    if a not in addresses:
                        closing.append(current.pop(a).channel)
        for c in closing:
            self._close(c)

    def addresses(self, expert: int) -> list[str]:
        with self._lock:
            return sorted(self._replicas.get(expert, {}))

    def acquire(self, expert: int, exclude: Sequence[str] = ()) -> Replica[C]:
        now = self._clock()
        with self._lock:
            pool = [r for r in self._replicas.get(expert, {}).values()
                    if r.address not in exclude]
            if not pool:
                raise NoReplica(f"expert {expert}: no replica known")
            healthy = [r for r in pool if r.down_until <= now] or pool
            least = min(r.in_flight for r in healthy)
            ties = [r for r in healthy if r.in_flight == least]
            n = self._rr[expert] = self._rr.get(expert, -1) + 1
            chosen = ties[n % len(ties)]
            chosen.in_flight += 1
            return chosen

    def release(self, replica: Replica[C], failed: bool = False) -> None:
        with self._lock:
            replica.in_flight -= 1
            if failed:
                replica.down_until = self._clock() + self._penalty
            else:
                replica.down_until = 0.0

    def close(self) -> None:
        self.update({e: [] for e in list(self._replicas)})
