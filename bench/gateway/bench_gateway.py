"""bench/gateway: the latency the gateway adds, against the router directly, same run.

The tiny model on real Triton servers (router + one server per expert); closed-loop
stock tritonclient.http clients with keep-alive, direct to the router and through the
gateway, alternated in rounds so drift on the shared machine hits both alike.

    .venv/bin/python bench/gateway/bench_gateway.py [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from autoglm.gateway.app import GatewayServer, Routing, Target
from autoglm.local.dataplane import DataPlane
from autoglm.models.tiny import PRESETS
from autoglm.procs import free_port
from autoglm.repository import build


def run(url: str, concurrency: int, seconds: float) -> list[float]:
    ids = np.arange(16, dtype=np.int64).reshape(1, 16)
    out: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        mine = []
        with httpclient.InferenceServerClient(url) as c:
            inp = httpclient.InferInput("INPUT_IDS", [1, 16], "INT64")
            inp.set_data_from_numpy(ids)
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                c.infer("router", [inp])
                mine.append(time.perf_counter() - t0)
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-") as tmp:
        repo = Path(tmp) / "repo"
        build(repo, "tiny-moe", 1, PRESETS["tiny"])
        plane = DataPlane(repo, 1, Path(tmp) / "plane")
        gateway: GatewayServer | None = None
        try:
            plane.start(1)
            assert plane.router is not None
            routing = Routing(Target("a", 1, f"http://{plane.router.http_url}"))
            gateway = GatewayServer(routing, free_port()).start()
            urls = {"direct": plane.router.http_url,
                    "gateway": f"127.0.0.1:{gateway.port}"}
            print(f"{'conc':>4} {'path':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
            for c in (1, 4):
                lat: dict[str, list[float]] = {"direct": [], "gateway": []}
                for _ in range(args.rounds):
                    for name, url in urls.items():
                        lat[name] += run(url, c, args.seconds)
                stats = {}
                for name, xs in lat.items():
                    q = statistics.quantiles(xs, n=100)
                    stats[name] = (len(xs) / (args.rounds * args.seconds), q[49] * 1e3,
                                   q[98] * 1e3)
                    print(f"{c:>4} {name:>8} {stats[name][0]:>8.1f} {stats[name][1]:>8.2f}"
                          f" {stats[name][2]:>8.2f}")
                d, g = stats["direct"], stats["gateway"]
                print(f"{c:>4} {'ratio':>8} {g[0] / d[0]:>8.2f} {g[1] / d[1]:>8.2f}"
                      f" {g[2] / d[2]:>8.2f}   (gateway adds {g[1] - d[1]:.2f} ms at p50)")
        finally:
            if gateway is not None:
                gateway.stop()
            plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
