"""bench/routing: spreading a chat workload over 2 router replicas, by policy.

The workload: tenants, each with its own 1k-token system prompt, send chats (the prompt, then
a 16-token question; 8 tokens answered) at Poisson arrivals. Two engines stand for two router
replicas, each set up as the router's ``generate`` model (prompt chunks of 128, 256 tokens a
step, prefix caching on) with KV room for about half the tenants' prompts: a replica that
sees every tenant keeps evicting them. The gateway's own balancer (``autoglm.gateway.balance``)
picks the replica of each arrival, told each engine's running and waiting sequences as the
gateway reads them, for three policies on the same trace: prefix-plus-load, least-load and
round-robin.

Each replica runs on its own clock: a step of an engine costs what it took here (measured),
and a replica idles until its next request arrives, as two machines would. That keeps the two
replicas from competing for this machine's cores and makes the figures independent of the
other policy's run. The arrival rate is set from a measured uncached prefill, so that round
robin runs at about 80% load. TTFT is from arrival to the first token; tokens/s is every
token generated over the time to the last one.

Then the engine with and without prefix caching, for the TTFT of a request whose 1k-token
prefix is cached (``bench_prefix``).

    .venv/bin/python bench/routing/bench_routing.py [--requests 160] [--tenants 8] [--seed 0]

Lines starting with PASS or FAIL give the goals: prefix-plus-load's TTFT p90 at least 2x
better than round-robin's; a cached 1k-token prefix cuts TTFT at least 3x. The exit status
is 0 either way.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autoglm.engine.sampler import SamplingParams
from autoglm.engine.scheduler import Engine, Request
from autoglm.gateway.balance import POLICIES, Balancer, Load, Policy
from autoglm.models.decoder import Model

sys.path.insert(0, str(Path(__file__).parent))
import bench_prefix

PREFIX, QUESTION, ANSWER = 1024, 16, 8
GOAL_ROUTING, LOAD = 2.0, 0.8
KV_TENANTS = 4.5  # the tenants' prompts one replica's KV cache holds


@dataclass
class Arrival:
    at: float  # seconds since the start
    tenant: int
    prompt: list[int]


@dataclass
class Replica:
    engine: Engine
    clock: float = 0.0  # this replica's own time (seconds)
    arrivals: dict[int, Arrival] = field(default_factory=dict)  # engine id → its arrival


@dataclass
class Result:
    ttft: list[float]
    tokens: int
    makespan: float
    hit_tokens: int
    prompt_tokens: int
    per_replica: list[int]

    def p(self, q: float) -> float:
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def engine(model: Model, kv_tokens: int) -> Engine:
    return Engine(model.router, model.local_fanout, kv_capacity_tokens=kv_tokens,
                  max_batch_tokens=256, prefill_chunk=128, prefix_caching=True)


def simulate(model: Model, policy: Policy, trace: list[Arrival], kv_tokens: int) -> Result:
    """The trace on two replicas whose every step costs its measured time."""
    replicas = [Replica(engine(model, kv_tokens)) for _ in range(2)]
    balancer: Balancer[int] = Balancer(policy)
    params = SamplingParams(max_tokens=ANSWER, temperature=0.0)  # no EOS: ANSWER tokens
    ttft: list[float] = []
    firsts: set[tuple[int, int]] = set()
    sent = [0, 0]
    pending = list(trace)
    with torch.inference_mode():
        while pending or any(r.engine.has_work() for r in replicas):
            busy = [r for r in replicas if r.engine.has_work()]
            step = min(busy, key=lambda r: r.clock) if busy else None
            if pending and (step is None or pending[0].at <= step.clock):
                a = pending.pop(0)
                for i, r in enumerate(replicas):
                    s = r.engine.stats()
                    balancer.report(i, Load(s.running, s.waiting))
                i = balancer.pick([0, 1], ",".join(map(str, a.prompt)))
                r = replicas[i]
                r.clock = max(r.clock, a.at)  # idle until it arrives
                r.arrivals[r.engine.add(Request(a.prompt, params))] = a
                balancer.started(i)
                sent[i] += 1
                continue
            assert step is not None
            t0 = time.perf_counter()
            events = step.engine.step()
            step.clock += time.perf_counter() - t0
            i = replicas.index(step)
            for e in events:
                if (i, e.id) not in firsts:
                    firsts.add((i, e.id))
                    ttft.append(step.clock - step.arrivals[e.id].at)
                if e.finish:
                    balancer.ended(i)
    stats = [r.engine.stats() for r in replicas]
    return Result(ttft, sum(s.generated_tokens for s in stats),
                  max(r.clock for r in replicas) - trace[0].at,
                  sum(s.prefix_hit_tokens for s in stats),
                  sum(s.prompt_tokens for s in stats), sent)


def uncached_prefill_seconds(model: Model, tokens: list[int]) -> float:
    """The best of 3 first tokens of the prompt, each on a new engine (nothing cached)."""
    with torch.inference_mode():
        return min(bench_prefix.first_token(engine(model, 4 * PREFIX), tokens)[0]
                   for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=15, help="of the prefix-cache bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = bench_prefix.load(Path(tmp))
    rng = random.Random(args.seed)
    vocab = model.cfg.vocab_size

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    prompts = [tokens(PREFIX) for _ in range(args.tenants)]
    prefill = uncached_prefill_seconds(model, prompts[0])
    kv_tokens = int(KV_TENANTS * PREFIX)
    rate = 2 * LOAD / prefill  # arrivals/s: round robin (every prompt prefilled) at LOAD
    trace, at = [], 0.0
    for _ in range(args.requests):
        at += rng.expovariate(rate)
        t = rng.randrange(args.tenants)
        trace.append(Arrival(at, t, prompts[t] + tokens(QUESTION)))
    print(f"tiny checkpoint; {args.tenants} tenants with {PREFIX}-token system prompts, "
          f"{args.requests} chats ({QUESTION}-token questions, {ANSWER} tokens answered), "
          f"2 replicas of {kv_tokens} KV tokens each; uncached prefill {prefill * 1e3:.0f} ms, "
          f"arrivals {rate:.1f}/s; torch threads 1")
    results = {policy: simulate(model, policy, trace, kv_tokens) for policy in POLICIES}
    base = results["round-robin"]
    print(f"{'policy':<12} {'TTFT p50':>10} {'TTFT p90':>10} {'tokens/s':>9} "
          f"{'prefix hits':>11} {'per replica':>12}   (ratios: against round-robin)")
    for policy, r in results.items():
        tps = r.tokens / r.makespan
        print(f"{policy:<12} {r.p(0.5) * 1e3:8.1f}ms {r.p(0.9) * 1e3:8.1f}ms {tps:9.1f} "
              f"{r.hit_tokens / r.prompt_tokens:10.0%} {r.per_replica!s:>12}   "
              f"p90 {base.p(0.9) / r.p(0.9):.2f}x, tokens/s "
              f"{tps / (base.tokens / base.makespan):.2f}x")
    ratio = base.p(0.9) / results["prefix-load"].p(0.9)
    verdict = "PASS" if ratio >= GOAL_ROUTING else "FAIL"
    print(f"{verdict} routing: prefix-plus-load beats round-robin on TTFT p90 by >= "
          f"{GOAL_ROUTING:.0f}x: {ratio:.1f}x (least-load "
          f"{base.p(0.9) / results['least-load'].p(0.9):.1f}x)")
    sys.argv = [sys.argv[0], "--rounds", str(args.rounds)]
    bench_prefix.main()


if __name__ == "__main__":
    main()
