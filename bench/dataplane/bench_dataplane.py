"""bench/dataplane: throughput and latency of the MoE model served three ways.

(a) the reference forward in one process (torch, threads), (b) router and experts in one
Triton server, (c) the router and one server per expert, wired over gRPC (the deployed
shape). Each at several client concurrencies, printed side by side as ratios to (a)
measured in the same run, plus the memory of every server.

    make bench   (or: .venv/bin/python bench/dataplane/bench_dataplane.py --seconds 8)
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.http as httpclient

from autoglm.local.dataplane import DataPlane
from autoglm.moe import PRESETS
from autoglm.plan import expert_model, router_model
from autoglm.procs import free_port
from autoglm.repository import build, load_reference
from autoglm.triton import TritonServer

Call = Callable[[np.ndarray[Any, Any]], Any]


def measure(make_call: Callable[[], Call], concurrency: int, seconds: float,
            ids: np.ndarray[Any, Any]) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) with `concurrency` closed-loop clients."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        call = make_call()
        mine = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            call(ids)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    q = statistics.quantiles(latencies, n=100)
    return len(latencies) / elapsed, q[49] * 1e3, q[98] * 1e3


def triton_call(server: TritonServer) -> Callable[[], Call]:
    def make() -> Call:
        client = httpclient.InferenceServerClient(server.http_url)

        def call(ids: np.ndarray[Any, Any]) -> Any:
            inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
            inp.set_data_from_numpy(ids)
            return client.infer("router", [inp]).as_numpy("LOGITS")
        return call
    return make


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    rows: dict[str, dict[int, tuple[float, float, float]]] = {}
    memory: dict[str, float] = {}
    ids = np.random.default_rng(0).integers(
        0, cfg.vocab_size, (args.batch, min(args.seq, cfg.max_seq))).astype(np.int64)
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-") as tmp:
        repo = Path(tmp) / "repo"
        build(repo, f"bench-{args.preset}", 1, cfg)
        print(f"model {args.preset}: {json.dumps(cfg.as_dict())}; request {ids.shape}",
              flush=True)

        ref = load_reference(repo, 1)
        torch.set_num_threads(1)

        def make_ref() -> Call:
            def call(x: np.ndarray[Any, Any]) -> Any:
                return ref(torch.from_numpy(x))
            return call

        rows["(a) reference, 1 process"] = {
            c: measure(make_ref, c, args.seconds, ids) for c in args.concurrency}
        print("(a) done", flush=True)

        # (b) one server holding the router and every expert, calling itself over gRPC
        endpoints = Path(tmp) / "endpoints.json"
        one = TritonServer(repo, {router_model(): 1,
                                  **{expert_model(i): 1 for i in range(cfg.num_experts)}},
                           env={"AUTOGLM_EXPERT_ENDPOINTS_FILE": str(endpoints)},
                           log_path=Path(tmp) / "one.log")
        one.grpc_port = free_port()
        endpoints.write_text(json.dumps({str(i): [f"127.0.0.1:{one.grpc_port}"]
                                         for i in range(cfg.num_experts)}))
        try:
            one.start()
            memory["(b) one server"] = one.rss_bytes() / 2**20
            rows["(b) router+experts, 1 server"] = {
                c: measure(triton_call(one), c, args.seconds, ids) for c in args.concurrency}
        finally:
            one.stop()
        print("(b) done", flush=True)

        plane = DataPlane(repo, 1, Path(tmp) / "plane")
        try:
            plane.start(replicas=1)
            assert plane.router is not None
            memory["(c) router server"] = plane.router.rss_bytes() / 2**20
            memory["(c) each expert server"] = statistics.mean(
                s.rss_bytes() for ss in plane.experts.values() for s in ss) / 2**20
            rows["(c) router + expert servers"] = {
                c: measure(triton_call(plane.router), c, args.seconds, ids)
                for c in args.concurrency}
        finally:
            plane.stop()

    base = rows["(a) reference, 1 process"]
    print(f"\n{'':32} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
          f" {'req/s vs a':>11} {'p50 vs a':>9} {'p99 vs a':>9}")
    for name, by_c in rows.items():
        for c, (rps, p50, p99) in by_c.items():
            b = base[c]
            print(f"{name:32} {c:>4} {rps:>8.1f} {p50:>8.1f} {p99:>8.1f}"
                  f" {rps / b[0]:>11.2f} {p50 / b[1]:>9.2f} {p99 / b[2]:>9.2f}")
    print("\nmemory (RSS, server and its Python-backend stubs):")
    for k, v in memory.items():
        print(f"  {k:28} {v:8.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
