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
              good_enough: float = 0.01, max_moves: int | None = None,
              move_cost: float = 0.25) -> Rebalance:
    """Placement that follows the load, moving as little as it can.

    First the forced changes only (:func:`place` from ``current``: new replicas placed,
    surplus ones dropped, the rest kept). Then a descent: while the heaviest server can be
    made lighter and the imbalance is over ``good_enough``, the step (:func:`_best_step`)
    that lowers it most per move: a replica moved to a server with room, or swapped with a
    lighter one of a lighter server. Moves are counted against ``current`` (a replica on a
    server that did not hold it), so moving again a replica the forced changes just placed,
    or back to a server that held it, costs nothing more; such free steps come first.

    Stopping rule, a price per move: each move costs ``move_cost / R`` of imbalance, R the
    replicas placed, at most ``threshold``. Moving the whole placement once must buy
    ``move_cost``: the servers load their moves side by side, so what a rebalance costs
    grows with the moves per server against the experts each holds, moves / R at any size.
    (The cap: in a small deployment a move is a large share of the placement but still one
    slice, and one move that clears the hysteresis is worth making.) Of the descent's
    prefixes the one with the lowest imbalance + price x moves is taken, so the steps past
    the last point where the moves paid for themselves are not made: an imbalance that
    only a long run of small gains would even out (noise in the load) moves little or
    nothing, while a server carrying clearly more load is still evened out. The descent
    stops once its moves cost more than the best prefix's value over the lowest imbalance
    possible (the heaviest replica's).

    Then hysteresis: the result is taken only if it lowers the imbalance by more than
    ``threshold`` (a small gain is not worth moving slices for), else the forced changes
    only; at most ``max_moves`` moves beyond the forced ones. ``move_cost=0`` evens the
    servers down to ``good_enough`` whatever it moves. Deterministic."""
    n = max(len(current.servers), servers_needed(replicas, capacity)) \
        if servers is None else servers
    forced = place(replicas, capacity, load, current=current, servers=n)
    weight = _weights(replicas, load)
    home = [current.servers[s] if s < len(current.servers) else frozenset[int]()
            for s in range(n)]
    held = [set(h) for h in forced.servers]
    loads = [sum(weight[e] for e in h) for h in held]
    order = [_by_weight(h, weight) for h in held]
    price = min(move_cost / max(sum(replicas), 1), threshold)
    mean = sum(loads) / n if n else 0.0
    floor = max(0.0, max(weight, default=0.0) / mean - 1) if mean > 0 else 0.0
    budget = math.inf if max_moves is None else max_moves
    steps: list[list[tuple[int, int, int]]] = []
    used = cost = 0
    best, keep = imbalance(loads), 0  # the best prefix's imbalance + price x cost, its length
    while used < budget and imbalance(loads) > good_enough:
        found = _best_step(held, loads, weight, capacity, budget - used, home, order)
        if found is None:
            break
        step, c = found
        for e, s, t in step:
            held[s].remove(e)
            held[t].add(e)
            loads[s] -= weight[e]
            loads[t] += weight[e]
        for s in {x for _, a, b in step for x in (a, b)}:
            order[s] = _by_weight(held[s], weight)
        steps.append(step)
        used += len(step)
        cost += c
        value = imbalance(loads) + price * cost
        if value < best - 1e-12:
            best, keep = value, len(steps)
        elif floor + price * cost >= best:  # no later prefix can repay what it moved
            break
    held = [set(h) for h in forced.servers]
    for step in steps[:keep]:
        for e, s, t in step:
            held[s].remove(e)
            held[t].add(e)
    result = Placement(tuple(frozenset(h) for h in held))
    before = imbalance(server_loads(forced, replicas, load))
    after = imbalance(server_loads(result, replicas, load))
    if before - after <= threshold:
        result, after = forced, before
    return Rebalance(result, moves_between(current, result), before, after, result != forced)


def _by_weight(held: set[int], weight: Sequence[float]) -> tuple[list[float], list[int]]:
    """A server's experts by weight (then number), and their weights."""
    experts = sorted(held, key=lambda e: (weight[e], e))
    return [weight[e] for e in experts], experts


def _best_step(held: list[set[int]], loads: list[float], weight: Sequence[float],
               capacity: int, room: float, home: Sequence[frozenset[int]],
               order: Sequence[tuple[list[float], list[int]]],
               ) -> tuple[list[tuple[int, int, int]], int] | None:
    """The move or swap (as (expert, from, to) steps, with its moves counted against
    ``home``: +1 for a replica landing where home lacks it, -1 for one leaving such a server)
    that lowers the heaviest server, keeping both servers under its load; None when none
    does. Free steps (no more moves) first, by the load they take off; then by load taken
    off per move. ``order``: each server's experts by weight (:func:`_by_weight`).

    Every lighter server is a candidate, lightest first, and the heaviest server's replicas
    heaviest first; a swap takes a replica whose weight is near the one that evens the two
    servers (three either side). Bounds keep it fast: a server ``gap`` under the top gains at
    most ``gap / 2`` and a replica at most its weight; once that is no better than the best
    found (its load, or its load per move), the rest are not looked at (a free step among
    them is given up)."""
    from bisect import bisect_left

    n = len(held)
    s = max(range(n), key=lambda x: (loads[x], -x))
    top = loads[s]
    eps = 1e-9 * top
    mine, was = held[s], home[s]
    best: list[tuple[int, int, int]] | None = None
    best_cost, best_free, best_value, size = 0, False, 0.0, 0  # value: gain, per move if paid
    lighter = sorted((t for t in range(n) if t != s and loads[t] < top),
                     key=lambda t: (loads[t], t))
    experts = sorted(mine, key=lambda e: (-weight[e], e))
    for t in lighter:
        gap = top - loads[t]
        if best is not None and gap / 2 <= best_value + eps:
            break
        theirs, had = held[t], home[t]
        roomy = len(theirs) < capacity
        weights, candidates = order[t]
        last = len(weights)
        for e in experts:
            we = weight[e]
            if best is not None and we <= best_value + eps:
                break  # a step of e gains at most its weight
            if e in theirs:
                continue
            cost = (e not in had) - (e not in was)
            if roomy:
                gain = we if we + we <= gap else gap - we
                if gain > eps:
                    free = cost <= 0
                    value = gain if free else gain / cost
                    if best is None or (free, value, -1) > (best_free, best_value, -size):
                        best, best_cost, best_free, best_value = [(e, s, t)], cost, free, value
                        size = 1
            if room < 2:
                continue
            i = bisect_left(weights, we - gap / 2)  # f evens s and t best
            for j in range(max(0, i - 3), min(last, i + 3)):
                d = we - weights[j]
                gain = d if d + d <= gap else gap - d
                if gain <= eps:
                    continue
                f = candidates[j]
                both = cost + (f not in was) - (f not in had)
                free = both <= 0
                value = gain if free else gain / both
                if (best is None or (free, value, -2) > (best_free, best_value, -size)) \
                        and f not in mine:
                    best, best_cost = [(e, s, t), (f, t, s)], both
                    best_free, best_value, size = free, value, 2
    return None if best is None else (best, best_cost)


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
