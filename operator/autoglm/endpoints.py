"""Where the expert servers are, what each holds, and which one takes an expert's rows.

A :class:`Resolver` turns endpoint specs into server addresses, re-read every few seconds:

* ``dns:///host:port``: every address the name resolves to (a headless Service lists one
  per ready pod);
* ``host:port|host:port``: a fixed list;
* a JSON file ``["host:port", ...]`` that the local runtime rewrites.

What a server holds is what the server itself reports (the router asks each one,
:mod:`autoglm.backends.fanout`); :class:`Balancer` keeps that view and chooses, for one
layer's experts, one server per expert: among the servers reporting it, the one with the
fewest calls in flight, skipping for a moment a server that just failed, and among equals in
rotation per expert, so that a regular load reaches every replica of an expert (preferring
a server the layer calls anyway saves a call but starved new replicas: a light load never
reached them). The experts chosen on one server go in one call: at most one call per server
per layer.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# getaddrinfo's answers that mean "no such name or no address", not "no answer now"
_NO_ADDRESS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def _resolve_one(spec: str) -> list[str] | None:
    """The addresses ``spec`` names; None when DNS gave no answer now (a timeout, a
    server failure): the caller keeps what it last knew, as gRPC's own resolver does."""
    if spec.startswith("dns:///"):
        host, _, port = spec[len("dns:///"):].rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            return [] if e.errno in _NO_ADDRESS else None
        return sorted({f"{i[4][0]}:{port}" for i in infos})
    return [a for a in spec.split("|") if a]


@dataclass
class Resolver:
    """The expert servers' addresses, from specs or a JSON file."""

    specs: Sequence[str] = ()
    file: Path | None = None
    _mtime: float = field(default=-1.0, init=False)
    _cache: list[str] = field(default_factory=list, init=False)
    _last: dict[str, list[str]] = field(default_factory=dict, init=False)  # per spec

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Resolver:
        specs = [s for s in env.get("AUTOGLM_EXPERT_ENDPOINTS", "").split(",") if s]
        file = env.get("AUTOGLM_EXPERT_ENDPOINTS_FILE")
        return cls(specs, Path(file) if file else None)

    def resolve(self) -> list[str]:
        if self.file is not None:
            try:
                mtime = self.file.stat().st_mtime
                if mtime != self._mtime:
                    raw = json.loads(self.file.read_text())
                    if not isinstance(raw, list):
                        raise ValueError("not a list")
                    self._cache = sorted({str(a) for a in raw})
                    self._mtime = mtime
            except (OSError, ValueError):
                pass  # a file being rewritten: keep the last good answer
            return list(self._cache)
        out: set[str] = set()
        for spec in self.specs:
            found = _resolve_one(spec)
            if found is not None:
                self._last[spec] = found
            out.update(self._last.get(spec, []))
        return sorted(out)


@dataclass
class Server:
    address: str
    experts: frozenset[int]
    in_flight: int = 0
    down_until: float = 0.0


class Balancer:
    """The servers and what each reports; least-outstanding choice per expert."""

    def __init__(self, penalty_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._penalty = penalty_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._servers: dict[str, Server] = {}
        self._rr: dict[int, int] = {}  # per expert: ties rotate whatever other calls do

    def update(self, holdings: Mapping[str, Iterable[int]]) -> None:
        """Adopt a new view (address → the experts it reports); calls in flight to a server
        that left still end normally."""
        with self._lock:
            for a in list(self._servers):
                if a not in holdings:
                    del self._servers[a]
            for a, experts in holdings.items():
                held = frozenset(experts)
                s = self._servers.get(a)
                if s is None:
                    self._servers[a] = Server(a, held)
                else:
                    s.experts = held

    def addresses(self, expert: int) -> list[str]:
        with self._lock:
            return sorted(a for a, s in self._servers.items() if expert in s.experts)

    def holdings(self) -> dict[str, frozenset[int]]:
        with self._lock:
            return {a: s.experts for a, s in self._servers.items()}

    def assign(self, experts: Iterable[int], exclude: Mapping[int, Collection[str]] = {},
               ) -> tuple[dict[int, Server], dict[int, str]]:
        """A server for each expert (and in flight on it: :meth:`release` each server once
        per expert group sent), and why for those that have none."""
        now = self._clock()
        chosen: dict[int, Server] = {}
        missing: dict[int, str] = {}
        with self._lock:
            pools = {e: [s for s in self._servers.values()
                         if e in s.experts and s.address not in exclude.get(e, ())]
                     for e in experts}
            in_call: set[str] = set()
            busy = {a: s.in_flight for a, s in self._servers.items()}  # before this call's
            for e in sorted(pools):
                pool = pools[e]
                if not pool:
                    tried = exclude.get(e, ())
                    missing[e] = ("every server reporting it failed" if tried
                                  else "no server reports it")
                    continue
                healthy = [s for s in pool if s.down_until <= now] or pool
                least = min(busy[s.address] for s in healthy)
                ties = [s for s in healthy if busy[s.address] == least]
                n = self._rr[e] = self._rr.get(e, -1) + 1
                s = ties[n % len(ties)]
                chosen[e] = s
                if s.address not in in_call:
                    in_call.add(s.address)
                    s.in_flight += 1
        return chosen, missing

    def release(self, server: Server, failed: bool = False) -> None:
        with self._lock:
            server.in_flight -= 1
            server.down_until = self._clock() + self._penalty if failed else 0.0
