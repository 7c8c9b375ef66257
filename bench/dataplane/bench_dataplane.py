"""bench/dataplane: throughput and latency of a real-architecture MoE checkpoint served four
ways, and the memory of each server.

The ``bench`` checkpoint (Qwen3-MoE-shaped, written offline by ``write_tiny_checkpoint``) is
imported into a Triton model repository (``import_checkpoint``) and run as

(a) the in-process reference (``load_reference``: our layers, the whole model, threads),
(b) transformers' forward of the same checkpoint in one process (``AutoModelForCausalLM``),
(c) a router server and one server per expert, wired over gRPC (the deployed shape),
(d) a router server and two servers per expert (the same expert servers as (c), plus one
    more replica each; the router balances between them).

Before timing, each form's logits are compared with (a). Then closed-loop clients at several
concurrencies, the forms interleaved in rounds (the machine is shared and noisy), medians
over rounds printed as ratios to (a) of the same round. Memory: the RSS of the router server
and of every expert server (each holds one expert slice), with the slice's weight bytes, and
of expert servers for a checkpoint whose experts are twice as wide, to show that an expert
server's memory grows with its slice.

    make bench   (or: .venv/bin/python bench/dataplane/bench_dataplane.py [--rounds 3])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.http as httpclient
from numpy.typing import NDArray

from autoglm.local.dataplane import DataPlane
from autoglm.models.tiny import PRESETS, TinySpec, as_dict, write_tiny_checkpoint
from autoglm.plan import expert_model, router_model
from autoglm.repository import import_checkpoint, load_reference, load_weights, pinned_config
from autoglm.triton import TritonServer

Ids = NDArray[np.int64]
Call = Callable[[Ids], NDArray[Any]]
Stats = tuple[float, float, float]  # requests/s, p50 ms, p99 ms
MiB = 2**20
VERSION, WIDE_VERSION = 1, 2
TOLERANCE = 1e-4  # max abs logit difference accepted against the reference


def measure(make_call: Callable[[], Call], concurrency: int, seconds: float,
            ids: Ids) -> Stats:
    """(requests/s, p50 ms, p99 ms) with ``concurrency`` closed-loop clients."""
    latencies: list[float] = []
    lock = threading.Lock()
    calls = [make_call() for _ in range(concurrency)]  # connections made before the clock
    stop = time.monotonic() + seconds

    def client(call: Call) -> None:
        mine = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            call(ids)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in calls]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return len(latencies) / elapsed, q[49] * 1e3, q[98] * 1e3


def in_process(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], Call]:
    def make() -> Call:
        def call(ids: Ids) -> NDArray[Any]:
            with torch.inference_mode():  # thread-local: set in the calling thread
                return model(torch.from_numpy(ids)).numpy()
        return call
    return make


def triton(server: TritonServer) -> Callable[[], Call]:
    def make() -> Call:
        client = httpclient.InferenceServerClient(server.http_url)

        def call(ids: Ids) -> NDArray[Any]:
            inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
            inp.set_data_from_numpy(ids)
            out: NDArray[Any] = client.infer(router_model(), [inp]).as_numpy("LOGITS")
            return out
        return call
    return make


def touch_slice(server: TritonServer, expert: int, spec: TinySpec, tokens: int = 16) -> int:
    """One direct call to an expert server through every layer of its slice, so that all of
    its weights are resident (they are not before their first use); then its RSS."""
    layer = np.repeat(np.arange(spec.layers, dtype=np.int32), tokens)[:, None]
    hidden = np.random.default_rng(expert).standard_normal(
        (layer.shape[0], spec.d_model)).astype(np.float32)
    with httpclient.InferenceServerClient(server.http_url) as client:
        inputs = [httpclient.InferInput("LAYER", list(layer.shape), "INT32"),
                  httpclient.InferInput("HIDDEN", list(hidden.shape), "FP32")]
        inputs[0].set_data_from_numpy(layer)
        inputs[1].set_data_from_numpy(hidden)
        out = client.infer(expert_model(expert), inputs).as_numpy("OUTPUT")
    assert out.shape == hidden.shape
    return server.rss_bytes()


def weight_bytes(folder: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_weights(folder, dtype=None).values())


def replicas_seen(router: TritonServer, expert: int) -> float:
    text = urllib.request.urlopen(router.metrics_url, timeout=5).read().decode()
    m = re.search(rf'^autoglm_expert_replicas{{expert="{expert}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def stop_all(servers: Iterable[TritonServer]) -> None:
    """Stop servers in parallel (each waits for its process group to exit)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda s: s.stop(), servers))


def load_transformers(src: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert not hf.training  # from_pretrained leaves it in eval mode

    def forward(ids: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = hf(input_ids=ids).logits
        return logits
    return forward


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks run
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement window")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--wide-servers", type=int, default=2,
                    help="expert servers started for the 2x-wider checkpoint")
    args = ap.parse_args()
    started = time.monotonic()
    spec = PRESETS[args.preset]
    wide = dataclasses.replace(spec, d_ff=2 * spec.d_ff)
    ids = np.random.default_rng(0).integers(
        0, spec.vocab_size, (args.batch, min(args.seq, spec.max_seq))).astype(np.int64)

    with tempfile.TemporaryDirectory(prefix="autoglm-bench-") as tmp:
        repo, ckpt = Path(tmp) / "repo", Path(tmp) / "ckpt"
        write_tiny_checkpoint(ckpt, spec, f"bench-{args.preset}", VERSION)
        built = import_checkpoint(ckpt, repo, VERSION, f"bench-{args.preset}", progress=False)
        with tempfile.TemporaryDirectory(prefix="autoglm-bench-wide-") as wide_src:
            write_tiny_checkpoint(Path(wide_src), wide, f"bench-{args.preset}-wide",
                                  WIDE_VERSION)
            import_checkpoint(Path(wide_src), repo, WIDE_VERSION, f"bench-{args.preset}-wide",
                              progress=False)
        print(f"model {args.preset} ({built.config.architecture}): {json.dumps(as_dict(spec))}"
              f"; request {ids.shape}; {args.rounds} rounds x {args.seconds:g} s per"
              " form and concurrency, interleaved", flush=True)

        ref = load_reference(repo, VERSION)
        hf = load_transformers(ckpt)
        torch.set_num_threads(1)  # one core per request, like a Triton instance

        plane = DataPlane(repo, VERSION, Path(tmp) / "plane")
        extra: list[TritonServer] = []  # every server started outside the plane
        try:
            rows, memory = run(args, spec, wide, repo, ids, ref, hf, plane, extra)
        finally:
            stop_all([*plane.servers(), *extra])
            plane.stop()  # no-ops once stopped; kept as the last word
            for s in extra:
                s.stop()
            mine = [*plane.servers(), *extra]
            left = [f for s in mine for f in s.shm_regions()]
            alive = sum(s.popen is not None for s in mine)
            print(f"cleanup: {len(mine)} servers stopped ({alive} alive), "
                  f"{len(left)} shared-memory regions left", flush=True)

    report(rows, memory)
    print(f"\nbench took {time.monotonic() - started:.0f} s")
    return 0


def single_router(plane: DataPlane, extra: list[TritonServer]) -> TritonServer:
    """A second router whose endpoints file lists only each expert's first replica."""
    endpoints = plane.workdir / "single-endpoints.json"
    endpoints.write_text(json.dumps({str(e): [servers[0].grpc_url]
                                     for e, servers in plane.experts.items()}))
    server = TritonServer(
        plane.repository, {router_model(): plane.version},
        env={"AUTOGLM_EXPERT_ENDPOINTS_FILE": str(endpoints),
             "AUTOGLM_RESOLVE_SECONDS": str(plane.resolve_seconds),
             "AUTOGLM_EXPERT_TIMEOUT_SECONDS": str(plane.expert_timeout_seconds)},
        log_path=plane.workdir / "router-single.log")
    extra.append(server)  # stopped by the caller, even if the start fails
    return server.start()


Memory = dict[str, Any]


def run(args: argparse.Namespace, spec: TinySpec, wide: TinySpec, repo: Path, ids: Ids,
        ref: Callable[[torch.Tensor], torch.Tensor],
        hf: Callable[[torch.Tensor], torch.Tensor], plane: DataPlane,
        extra: list[TritonServer]) -> tuple[dict[str, dict[int, list[Stats]]], Memory]:
    # -- servers; each expert server's memory once its slice has been read once ------------
    t0 = time.monotonic()
    plane.start(replicas=2)
    assert plane.router is not None
    memory: Memory = {
        "experts": {e: [touch_slice(s, e, spec) for s in ss]
                    for e, ss in plane.experts.items()},
        "router_weights": weight_bytes(repo / router_model() / str(VERSION)),
        "slice_weights": [weight_bytes(repo / expert_model(e) / str(VERSION))
                          for e in range(spec.num_experts)],
        "wide_weights": weight_bytes(repo / expert_model(0) / str(WIDE_VERSION)),
        "d_ff": (spec.d_ff, wide.d_ff),
        "router_instances": pinned_config(repo, router_model(), VERSION)
        ["instance_group"][0]["count"],
        "wide": [],
    }
    wide_servers: list[TritonServer] = []
    for e in range(min(args.wide_servers, spec.num_experts)):
        s = TritonServer(repo, {expert_model(e): WIDE_VERSION},
                         log_path=plane.workdir / f"wide-expert-{e}.log")
        extra.append(s)
        wide_servers.append(s)
        s.start()
        memory["wide"].append(touch_slice(s, e, wide))
    stop_all(wide_servers)  # not needed for the timing
    single = single_router(plane, extra)
    print(f"servers up in {time.monotonic() - t0:.0f} s: 2 routers, "
          f"{2 * spec.num_experts} expert servers", flush=True)
    for e in range(spec.num_experts):
        assert replicas_seen(single, e) == 1.0 and replicas_seen(plane.router, e) == 2.0

    forms: dict[str, Callable[[], Call]] = {
        "(a) reference, 1 process": in_process(ref),
        "(b) transformers, 1 process": in_process(hf),
        "(c) router + 1 server/expert": triton(single),
        "(d) router + 2 servers/expert": triton(plane.router),
    }

    # -- the logits of every form against the reference, before timing -------------------
    rng = np.random.default_rng(1)
    checks = [ids, *(rng.integers(0, spec.vocab_size, (b, s)).astype(np.int64)
                     for b, s in ((2, 17), (3, 5)))]
    call_ref = forms["(a) reference, 1 process"]()
    expected = [call_ref(x) for x in checks]
    print(f"max |logits - reference| over {len(checks)} requests "
          f"({', '.join('x'.join(map(str, x.shape)) for x in checks)}):")
    for name, make in forms.items():
        call = make()
        diff = max(float(np.abs(call(x) - want).max()) for x, want in zip(checks, expected,
                                                                        strict=True))
        print(f"  {name:32} {diff:.2e}", flush=True)
        if diff > TOLERANCE:
            raise SystemExit(f"{name}: logits differ from the reference by {diff:.2e}")
        measure(make, max(args.concurrency), 0.5, ids)  # warm-up: threads, connections
    memory["router"], memory["single"] = plane.router.rss_bytes(), single.rss_bytes()

    # -- timing: rounds of every (concurrency, form), the form order rotated per round ------
    rows: dict[str, dict[int, list[Stats]]] = {n: {c: [] for c in args.concurrency}
                                               for n in forms}
    names = list(forms)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for c in args.concurrency:
            for name in order:
                rows[name][c].append(measure(forms[name], c, args.seconds, ids))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    memory["router_after"] = plane.router.rss_bytes()
    memory["single_after"] = single.rss_bytes()
    memory["experts_after"] = {e: [s.rss_bytes() for s in ss]
                               for e, ss in plane.experts.items()}
    return rows, memory


def report(rows: dict[str, dict[int, list[Stats]]], memory: Memory) -> None:
    base = rows["(a) reference, 1 process"]
    print(f"\n{'':32} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
          f" {'req/s vs a':>11} {'p50 vs a':>9} {'p99 vs a':>9}")
    for name, by_c in rows.items():
        for c, runs in by_c.items():
            med = [statistics.median(r[i] for r in runs) for i in range(3)]
            # the ratio to (a) of the same round, median over rounds
            ratio = [statistics.median(r[i] / b[i] for r, b in zip(runs, base[c], strict=True))
                     for i in range(3)]
            print(f"{name:32} {c:>4} {med[0]:>8.1f} {med[1]:>8.1f} {med[2]:>8.1f}"
                  f" {ratio[0]:>11.2f} {ratio[1]:>9.2f} {ratio[2]:>9.2f}")

    print("\nmemory (RSS of the server and its Python-backend stubs, MiB; warm: routers after"
          " the\nchecks, expert servers after one direct call through every layer):")
    print(f"  {'':36} {'weights':>8} {'warm':>9} {'after runs':>11}")
    n = memory["router_instances"]
    for label, key in (("router server of (c)", "single"), ("router server of (d)", "router")):
        print(f"  {f'{label}, {n} instances':36} {memory['router_weights'] / MiB:>8.1f}"
              f" {memory[key] / MiB:>9.1f} {memory[key + '_after'] / MiB:>11.1f}")
    for e, rss in memory["experts"].items():
        for k, v in enumerate(rss):
            print(f"  {f'expert_{e} server, replica {k}':36}"
                  f" {memory['slice_weights'][e] / MiB:>8.1f} {v / MiB:>9.1f}"
                  f" {memory['experts_after'][e][k] / MiB:>11.1f}")
    narrow = [v for rss in memory["experts"].values() for v in rss]
    d_ff, d_ff_wide = memory["d_ff"]
    n_med, w_med = statistics.median(narrow), statistics.median(memory["wide"])
    dw = memory["wide_weights"] - memory["slice_weights"][0]
    print("\nan expert server's memory against its slice (warm: after one call per layer):")
    print(f"  {'':36} {'weights':>8} {'RSS med':>9} {'RSS range':>15}")
    for label, weights, rss in ((f"d_ff {d_ff} ({len(narrow)} servers)",
                                 memory["slice_weights"][0], narrow),
                                (f"d_ff {d_ff_wide} ({len(memory['wide'])} servers)",
                                 memory["wide_weights"], memory["wide"])):
        rng = f"{min(rss) / MiB:.1f}-{max(rss) / MiB:.1f}"
        print(f"  {'expert server, ' + label:36} {weights / MiB:>8.1f}"
              f" {statistics.median(rss) / MiB:>9.1f} {rng:>15}")
    print(f"  {'difference':36} {dw / MiB:>8.1f} {(w_med - n_med) / MiB:>9.1f}"
          f"   (RSS/weights {(w_med - n_med) / dw:.2f})")


if __name__ == "__main__":
    sys.exit(main())
