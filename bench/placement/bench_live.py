"""bench/placement/bench_live.py: tokens/s under a skewed load, the static placement against
the same servers after live rebalances, in one run.

A tiny model of 8 experts (top-2) on 4 real Triton expert servers of 2 experts each, placed
by count as the operator places them ({0,4} {1,5} {2,6} {3,7}). The load is skewed: the
prompts whose tokens go most to server 0's experts (measured on the router's own counters
from 24 random prompts). Phase 1 serves it on the static placement; then
`placement.rebalance`, from the per-expert load the router counted in phase 1, moves experts
live (`DataPlane.move`, rounds of at most 4 moves until it no longer acts); phase 2 serves
the same load. Printed: each phase's requests and tokens/s (prompt tokens of the router's
forward), the per-server imbalance of the load before and after, and live / static.

On this 2-core machine every server shares the same two cores, so a heavier server is not
a slower step the way it is when each server has its own GPU: expect a ratio near 1 here;
what it shows is that rebalancing live costs nothing while serving. The figure that matters
is a GPU cluster's (bench/gpu/gpu_check.py is where such checks go).

    .venv/bin/python bench/placement/bench_live.py [--seconds 20] [--clients 4]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from autoglm.local.dataplane import DataPlane
from autoglm.models.tiny import PRESETS
from autoglm.placement import (
    MOVES_PER_REBALANCE,
    Placement,
    imbalance,
    place,
    rebalance,
    server_loads,
)
from autoglm.testing import metric_value

MODEL = replace(PRESETS["tiny"], num_experts=8, top_k=2)
TOKENS = 16


def counts(plane: DataPlane) -> list[float]:
    assert plane.router is not None
    with urllib.request.urlopen(plane.router.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return [metric_value(text, "autoglm_expert_tokens_total", {"expert": str(e)}) or 0.0
            for e in range(MODEL.num_experts)]


def infer(client: httpclient.InferenceServerClient, prompt: list[int]) -> None:
    ids = np.array([prompt], dtype=np.int64)
    inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    client.infer("router", [inp])


def serve(plane: DataPlane, prompts: list[list[int]], seconds: float,
          clients: int) -> tuple[int, int, float]:
    """(answers, failures, seconds) of ``clients`` keep-alive clients for ``seconds``."""
    assert plane.router is not None
    url = plane.router.http_url
    done = [0] * clients
    failed = [0] * clients
    stop = threading.Event()

    def run(i: int) -> None:
        with httpclient.InferenceServerClient(url) as c:
            n = i
            while not stop.is_set():
                try:
                    infer(c, prompts[n % len(prompts)])
                    done[i] += 1
                except Exception:
                    failed[i] += 1
                n += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(done), sum(failed), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    from autoglm.repository import build

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build(repo, "tiny-moe", 1, MODEL)
        start = place([1] * MODEL.num_experts, 2)
        plane = DataPlane(repo, 1, Path(tmp) / "plane", capacity=2).start(start)
        try:
            assert plane.router is not None
            rng = np.random.default_rng(7)
            prompts = [rng.integers(0, MODEL.vocab_size, TOKENS).tolist() for _ in range(24)]
            share = []
            with httpclient.InferenceServerClient(plane.router.http_url) as c:
                for prompt in prompts:
                    before = counts(plane)
                    for _ in range(3):
                        infer(c, prompt)
                    time.sleep(0.6)  # the router adds to its counters every 0.5 s
                    got = [a - b for a, b in zip(counts(plane), before, strict=True)]
                    share.append(sum(got[e] for e in start.servers[0]) / max(sum(got), 1))
            hot = [prompts[i] for i in sorted(range(len(prompts)), key=lambda i: -share[i])[:4]]
            print(f"hot prompts: {np.mean(sorted(share)[-4:]):.2f} of their tokens to server "
                  f"0's experts (a random prompt: {np.mean(share):.2f})")

            before = counts(plane)
            static = serve(plane, hot, args.seconds, args.clients)
            load = [a - b for a, b in zip(counts(plane), before, strict=True)]
            replicas = [1] * MODEL.num_experts
            was = imbalance(server_loads(plane.placement, replicas, load))
            moved = 0
            for _ in range(5):
                rb = rebalance(replicas, 2, load, plane.placement, servers=4,
                               max_moves=MOVES_PER_REBALANCE)
                if not rb.acted:
                    break
                servers = [x.server for x in plane.expert_servers]
                for m in rb.moves:
                    assert m.source is not None and m.target is not None
                    moved += plane.move(m.expert, servers[m.source], servers[m.target])
            now = imbalance(server_loads(plane.placement, replicas, load))
            print(f"rebalanced live: {moved} moves, server imbalance {was:.2f} -> {now:.2f} "
                  f"({Placement(plane.placement.servers).servers})")
            time.sleep(2)  # the routers' next probe: dropped copies no longer asked for
            live = serve(plane, hot, args.seconds, args.clients)
        finally:
            plane.stop()
    for name, (n, failed, secs) in (("static", static), ("live", live)):
        print(f"{name:6}: {n} requests, {failed} failed, {n * TOKENS / secs:.1f} tokens/s")
    ratio = (live[0] / live[2]) / (static[0] / static[2]) if static[0] else float("nan")
    print(f"live / static tokens/s: {ratio:.2f}x (2 cores shared by every server: see the "
          "docstring)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
