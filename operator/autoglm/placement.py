"""Which expert server holds which expert replicas (pure: no I/O).

The autoscaler decides how many replicas each routed expert gets; the unit of deployment is an
expert server that holds up to ``capacity`` experts in one model, so one call per server per
layer carries the rows of every expert it holds. :func:`place` maps the replicas onto servers:

* every replica on a server, at most ``capacity`` per server, never two replicas of one expert
  on one server (a second copy there would add no capacity and no availability);
* servers balanced by load: each replica carries ``load[e] / replicas[e]`` (the router's
  per-expert token rate) when every expert's load is known, else 1 (balance by count);
* what a ``current`` placement already holds stays where it is, as far as the new replica
  counts allow: a move costs a slice load on the new server;
* deterministic: the same inputs give the same placement.

The greedy is DeepSeek EPLB's packing step (heaviest replica first, into the lightest server
with room), started from the kept replicas instead of from empty servers; when every server
with room already holds the expert, one replica is swapped to make room (so whatever fits is
placed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MOVES_PER_REBALANCE = 4  # live moves a rebalance makes at most: a few at a time, no pause


class PlacementError(ValueError):
    """Replicas that cannot be placed: the message says which and why."""


@dataclass(frozen=True)
class Placement:
    """Server ``s`` holds the experts ``servers[s]`` (each once)."""

    servers: tuple[frozenset[int], ...]

    def replicas(self, num_experts: int) -> list[int]:
        return [sum(e in held for held in self.servers) for e in range(num_experts)]

    def holders(self, expert: int) -> list[int]:
        """The servers holding ``expert``, in order."""
        return [s for s, held in enumerate(self.servers) if expert in held]


def servers_needed(replicas: Sequence[int], capacity: int) -> int:
    """The fewest servers that hold ``replicas``: enough slots, and at least as many servers
    as the most replicated expert has replicas."""
    if capacity < 1:
        raise PlacementError(f"a server must hold at least one expert, not {capacity}")
    return max(math.ceil(sum(replicas) / capacity), max(replicas, default=0))


def place(replicas: Sequence[int], capacity: int, load: Sequence[float | None] = (),
          current: Placement | None = None, servers: int | None = None) -> Placement:
    """``replicas[e]`` replicas of each expert on ``servers`` servers (default: the fewest
    that hold them) of ``capacity`` experts each; see the module's docstring."""
    n = servers_needed(replicas, capacity) if servers is None else servers
    problems = [f"expert {e} has {r} replicas" for e, r in enumerate(replicas) if r < 1]
    problems += [f"expert {e} has {r} replicas but there are {n} servers (at most one "
                 f"replica of an expert per server)" for e, r in enumerate(replicas) if r > n]
    if sum(replicas) > n * capacity:
        problems.append(f"{sum(replicas)} replicas do not fit on {n} servers of {capacity}")
    if problems:
        raise PlacementError("; ".join(problems))
    weight = _weights(replicas, load)
    held: list[set[int]] = [set() for _ in range(n)]
    kept = [0] * len(replicas)
    if current is not None:  # keep what still fits, heaviest first
        for s, experts in enumerate(current.servers[:n]):
            for e in sorted(experts, key=lambda e: (-weight[e], e)):
                if e < len(replicas) and kept[e] < replicas[e] and len(held[s]) < capacity:
                    held[s].add(e)
                    kept[e] += 1
    todo = sorted((e for e, r in enumerate(replicas) for _ in range(r - kept[e])),
                  key=lambda e: (-weight[e], e))
    def lightest(candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda s: (sum(weight[x] for x in held[s]), len(held[s]), s))

    for e in todo:
        room = [s for s in range(n) if len(held[s]) < capacity and e not in held[s]]
        if room:
            held[lightest(room)].add(e)
            continue
        # Every server with room holds e already. A full server t without e exists (e has
        # fewer than n replicas so far), and it holds some f that the server s with room
        # lacks (t has more experts than s): f moves to s, e takes its place on t.
        s = lightest([s for s in range(n) if len(held[s]) < capacity])
        t = lightest([t for t in range(n) if e not in held[t]])
        f = min(held[t] - held[s], key=lambda f: (weight[f], f))
        held[t].remove(f)
        held[s].add(f)
        held[t].add(e)
    return Placement(tuple(frozenset(h) for h in held))


def _weights(replicas: Sequence[int], load: Sequence[float | None]) -> list[float]:
    """The load one replica of each expert carries; 1 each unless every load is known."""
    known = [x for x in load if x is not None]
    if len(known) != len(replicas) or sum(known) <= 0:
        return [1.0] * len(replicas)
    return [float(x) / r for x, r in zip(known, replicas, strict=True)]


def server_loads(placement: Placement, replicas: Sequence[int],
                 load: Sequence[float | None]) -> list[float]:
    weight = _weights(replicas, load)
    return [sum(weight[e] for e in held) for held in placement.servers]


def imbalance(loads: Sequence[float]) -> float:
    """(max - mean) / mean of the servers' loads: 0 is perfectly even."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return (max(loads) - mean) / mean if mean > 0 else 0.0


def balancedness(loads: Sequence[float]) -> float:
    """DeepSeek's measure, mean / max: 1 is perfectly even."""
    top = max(loads, default=0.0)
    return sum(loads) / len(loads) / top if top > 0 else 1.0


def moves(before: Placement, after: Placement) -> int:
    """Replicas that ``after`` places on a server that did not hold them in ``before``."""
    return sum(len(a - (before.servers[s] if s < len(before.servers) else frozenset()))
               for s, a in enumerate(after.servers))


@dataclass(frozen=True)
class Move:
    """One replica of ``expert`` leaving server ``source`` for ``target`` (``source`` None: a
    new replica; ``target`` None: a replica removed)."""

    expert: int
    source: int | None
    target: int | None


@dataclass(frozen=True)
class Rebalance:
    placement: Placement
    moves: tuple[Move, ...]   # from the current placement to ``placement``
    imbalance_before: float   # the current placement with only the forced changes
    imbalance_after: float    # ``placement``
    acted: bool               # False: the gain was under the threshold, forced changes only


def rebalance(replicas: Sequence[int], capacity: int, load: Sequence[float | None],
              current: Placement, servers: int | None = None, threshold: float = 0.02,
              good_enough: float = 0.015, max_moves: int | None = None) -> Rebalance:
    """Placement that follows the load, moving as little as it can.

    First the forced changes only (:func:`place` from ``current``: new replicas placed,
    surplus ones dropped, the rest kept). Then, while the heaviest server can be made lighter,
    the one step that lowers it most: a replica moved to a server with room, or swapped with a
    lighter one on one of the lightest servers (a swap is two moves), until the imbalance is
    at most ``good_enough``. The result is taken only if it lowers the imbalance by more than
    ``threshold`` (hysteresis: a small gain is not worth moving slices for); at most
    ``max_moves`` moves beyond the forced ones."""
    n = max(len(current.servers), servers_needed(replicas, capacity)) \
        if servers is None else servers
    forced = place(replicas, capacity, load, current=current, servers=n)
    weight = _weights(replicas, load)
    held = [set(h) for h in forced.servers]
    loads = [sum(weight[e] for e in h) for h in held]
    budget = math.inf if max_moves is None else max_moves
    used = 0
    while used < budget and imbalance(loads) > good_enough:
        step = _best_step(held, loads, weight, capacity, budget - used)
        if step is None:
            break
        for e, s, t in step:
            held[s].remove(e)
            held[t].add(e)
            loads[s] -= weight[e]
            loads[t] += weight[e]
        used += len(step)
    result = Placement(tuple(frozenset(h) for h in held))
    before = imbalance(server_loads(forced, replicas, load))
    after = imbalance(server_loads(result, replicas, load))
    if before - after <= threshold:
        result, after = forced, before
    return Rebalance(result, moves_between(current, result), before, after, result != forced)


def _best_step(held: list[set[int]], loads: list[float], weight: Sequence[float],
               capacity: int, room: float) -> list[tuple[int, int, int]] | None:
    """The move or swap (as (expert, from, to) steps) that lowers the heaviest server most,
    keeping both servers under its load; None when none does."""
    s = max(range(len(held)), key=lambda x: (loads[x], -x))
    top = loads[s]
    best: tuple[float, int, list[tuple[int, int, int]]] | None = None
    lightest = sorted(range(len(held)), key=lambda x: (loads[x], x))[:3]
    for e in sorted(held[s]):
        for t in range(len(held)):
            if t != s and e not in held[t] and len(held[t]) < capacity:
                worst = max(top - weight[e], loads[t] + weight[e])
                if worst < top - 1e-9 and (best is None or (worst - top, 1) < best[:2]):
                    best = (worst - top, 1, [(e, s, t)])
        if room < 2:
            continue
        for t in lightest:
            if t == s or e in held[t]:
                continue
            for f in sorted(held[t] - held[s]):
                if weight[f] >= weight[e]:
                    continue
                worst = max(top - weight[e] + weight[f], loads[t] + weight[e] - weight[f])
                # a swap is two moves: it must gain twice what a move does
                if worst < top - 1e-9 and (best is None or ((worst - top) / 2, 2) < best[:2]):
                    best = ((worst - top) / 2, 2, [(e, s, t), (f, t, s)])
    return None if best is None else best[2]


def moves_between(before: Placement, after: Placement) -> tuple[Move, ...]:
    """The replica moves from ``before`` to ``after``: each expert's lost copies paired with
    its gained ones (the rest new or removed replicas), in expert then server order."""
    width = max(len(before.servers), len(after.servers))
    def at(p: Placement, s: int) -> frozenset[int]:
        return p.servers[s] if s < len(p.servers) else frozenset()

    out: list[Move] = []
    experts = sorted(set().union(*before.servers, *after.servers)) if width else []
    for e in experts:
        lost = [s for s in range(width) if e in at(before, s) and e not in at(after, s)]
        gained = [s for s in range(width) if e in at(after, s) and e not in at(before, s)]
        for i in range(max(len(lost), len(gained))):
            out.append(Move(e, lost[i] if i < len(lost) else None,
                            gained[i] if i < len(gained) else None))
    return tuple(out)


Order = dict[str, list[int]]  # an expert server's CONTROL: {"load": [...], "drop": [...]}
Reports = Sequence[Sequence[frozenset[int] | None]]  # per server, per pod: what it reports


@dataclass(frozen=True)
class Progress:
    """One step of serving ``live`` with ``moves`` under way (see :func:`progress`)."""

    orders: dict[tuple[int, int], Order]  # (server, pod) -> what to send it
    done: tuple[Move, ...]
    pending: tuple[Move, ...]
    placement: Placement  # ``live`` with the done moves made


def progress(live: Placement, moves: Sequence[Move], reports: Reports) -> Progress:
    """Make-before-break, from what the pods report (pure: the caller sends the orders and
    asks again). A move's expert is loaded on every pod of its target first; once all of
    them report it, its source's pods drop it; the move is done when none reports it any
    more. Pods also converge on ``live`` (a pod restarted from its template loads what
    moved in, and drops what moved out). A pod never drops an expert that no other server
    serves on every pod, so no order leaves an expert unserved. A move given up on (its
    target died, say) is left out of ``moves``: its target drops the copy, the source
    keeps serving."""
    width = max(len(live.servers), len(reports))

    def pods(s: int) -> Sequence[frozenset[int] | None]:
        return reports[s] if s < len(reports) else ()

    def full(s: int, e: int) -> bool:
        return bool(pods(s)) and all(r is not None and e in r for r in pods(s))

    want = [set(live.servers[s]) if s < len(live.servers) else set() for s in range(width)]
    done: list[Move] = []
    pending: list[Move] = []
    for m in moves:
        arrived = m.target is None or full(m.target, m.expert)
        if m.target is not None:
            want[m.target].add(m.expert)
        if arrived and m.source is not None:
            want[m.source].discard(m.expert)
        left = m.source is None or not any(
            r is not None and m.expert in r for r in pods(m.source))
        (done if arrived and left else pending).append(m)
    orders: dict[tuple[int, int], Order] = {}
    for s, answers in enumerate(reports):
        for i, r in enumerate(answers):
            if r is None:
                continue
            load = sorted(want[s] - r)
            drop = sorted(e for e in r - want[s]
                          if any(full(x, e) for x in range(width) if x != s))
            if load or drop:
                orders[(s, i)] = {"load": load, "drop": drop}
    held = [set(h) for h in live.servers] + [set() for _ in range(width - len(live.servers))]
    for m in done:
        if m.source is not None:
            held[m.source].discard(m.expert)
        if m.target is not None:
            held[m.target].add(m.expert)
    return Progress(orders, tuple(done), tuple(pending),
                    Placement(tuple(frozenset(h) for h in held)))
