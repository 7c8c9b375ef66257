"""bench/dataplane: throughput and latency of a real-architecture MoE checkpoint served four
ways, and the memory of an expert server against the number of experts it holds.

The ``bench`` checkpoint (Qwen3-MoE-shaped, written offline by ``write_tiny_checkpoint``) is
imported into a Triton model repository (``import_checkpoint``: ``expert_<i>/<V>/`` holds
expert i's weights, which expert servers load through the one ``experts`` model) and run as

(a) the in-process reference (``load_reference``: our layers, the whole model, threads),
(b) transformers' forward of the same checkpoint in one process (``AutoModelForCausalLM``),
(c) a router server and one expert server per expert (``DataPlane`` of capacity 1: the
    unpacked layout, the baseline; one call per expert per layer),
(d) a router server and packed expert servers (``DataPlane`` of capacity
    ceil(experts / 2): 2 servers, each holding half of the experts; one call per server
    per layer carries the rows of every expert it holds).

Before timing, each form's logits are compared with (a) (a difference above 1e-4 ends the
bench), and the router forms' calls to expert servers per request are counted
(``autoglm_expert_server_calls_total``). Then closed-loop clients at several concurrencies,
the forms interleaved in rounds (the machine is shared and noisy), medians over rounds printed
as ratios to (a) of the same round; the goal line is (d)'s requests/s against (a)'s at
concurrency 16 (goal: >= 0.8).

Memory: expert servers holding 1, 2, 4, ... and all of the experts are started on their own,
each warmed by one direct call per MoE layer carrying rows of every expert it holds (checked
against the reference's slices), and their RSS (server and Python-backend stub) is printed
against the weight bytes they hold, with a linear fit (base + growth per expert slice). From
those measured figures, an extrapolation for a 256-expert model with slices of this size: one
server per expert (256 x the measured 1-expert RSS) against 4 packed servers (4 x (base + 64 x
growth per slice)). The routers and expert servers of (c) and (d) are reported too, warm and
after the timed runs.

    make bench   (or: .venv/bin/python bench/dataplane/bench_dataplane.py [--rounds 3])
    quick check: .venv/bin/python bench/dataplane/bench_dataplane.py --rounds 1 \\
                     --seconds 0.5 --concurrency 1 16
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.http as httpclient
from numpy.typing import NDArray

from autoglm.local.dataplane import DataPlane
from autoglm.models.decoder import Model
from autoglm.models.tiny import PRESETS, TinySpec, as_dict, write_tiny_checkpoint
from autoglm.plan import (
    SERVER_EXPERTS_ENV,
    expert_folder,
    experts_model,
    format_server_experts,
    router_model,
)
from autoglm.repository import import_checkpoint, load_reference, load_weights, pinned_config
from autoglm.triton import TritonServer

Ids = NDArray[np.int64]
Call = Callable[[Ids], NDArray[Any]]
Stats = tuple[float, float, float]  # requests/s, p50 ms, p99 ms
Memory = dict[str, Any]
MiB, GiB = 2**20, 2**30
VERSION = 1
TOLERANCE = 1e-4  # max abs logit difference accepted against the reference
GOAL_CONCURRENCY, GOAL_RATIO = 16, 0.8  # the packed form's requests/s against (a)'s
REF, HF, ONE, PACKED = ("(a) reference, 1 process", "(b) transformers, 1 process",
                        "(c) router + 1 server/expert", "(d) router + packed servers")


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


def expert_inputs(layer: int, experts: Sequence[int], counts: Sequence[int],
                  hidden: NDArray[np.float32]) -> list[httpclient.InferInput]:
    """One call to ``experts``: one layer's rows of several experts, in order."""
    arrays = [("LAYER", np.array([layer], dtype=np.int32)),
              ("EXPERTS", np.array(experts, dtype=np.int32)),
              ("COUNTS", np.array(counts, dtype=np.int32)), ("HIDDEN", hidden)]
    inputs = []
    for name, a in arrays:
        inp = httpclient.InferInput(name, list(a.shape),
                                    "INT32" if a.dtype == np.int32 else "FP32")
        inp.set_data_from_numpy(a)
        inputs.append(inp)
    return inputs


def warm(server: TritonServer, held: Sequence[int], ref: Model, tokens: int = 16) -> int:
    """Ask the server what it holds, then one direct call per MoE layer carrying ``tokens``
    rows of every expert it holds, so that all of its weights are resident (they are not
    before their first use), each checked against the reference's slices; then its RSS."""
    cfg = ref.cfg
    rng = np.random.default_rng(len(held))
    with httpclient.InferenceServerClient(server.http_url) as client:
        report = client.infer(experts_model(), [],
                              outputs=[httpclient.InferRequestedOutput("HELD")])
        got_held = report.as_numpy("HELD")
        assert got_held is not None and got_held.tolist() == sorted(held), \
            f"server reports {got_held}, asked for {sorted(held)}"
        for layer in cfg.moe_layers:
            x = rng.standard_normal((tokens * len(held), cfg.hidden_size)).astype(np.float32)
            out = client.infer(experts_model(), expert_inputs(
                layer, held, [tokens] * len(held), x)).as_numpy("OUTPUT")
            assert out is not None
            with torch.no_grad():
                want = np.concatenate([
                    ref.experts[e](layer, torch.from_numpy(x[k * tokens:(k + 1) * tokens]))
                    .numpy() for k, e in enumerate(held)])
            diff = float(np.abs(out - want).max())
            if diff > TOLERANCE:
                raise SystemExit(f"expert server holding {format_server_experts(held)}: "
                                 f"layer {layer} differs from the reference by {diff:.2e}")
    return server.rss_bytes()


def weight_bytes(folder: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_weights(folder, dtype=None).values())


def scrape(server: TritonServer) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        return str(r.read().decode())


def sample(text: str, name: str, expert: int | None = None) -> float:
    """One sample of the metric ``name`` (``expert``: its sample labelled so); 0 if absent."""
    labels = r"(?:\{\})?" if expert is None else rf'\{{expert="{expert}"\}}'
    m = re.search(rf"^{name}{labels} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for_replicas(router: TritonServer, num_experts: int, want: float = 1.0,
                      timeout: float = 30.0) -> None:
    """Until the router reports ``want`` servers for every expert."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(router)
        seen = [sample(text, "autoglm_expert_replicas", e) for e in range(num_experts)]
        if all(s == want for s in seen):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the router sees {seen} servers per expert, not {want:g} each")
        time.sleep(0.2)


def server_calls(router: TritonServer) -> float:
    """The router's count, once what it summed has reached Triton (it flushes every 0.5 s)."""
    time.sleep(1.1)
    return sample(scrape(router), "autoglm_expert_server_calls_total")


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


def default_sizes(num_experts: int) -> list[int]:
    """1, 2, 4, ... below ``num_experts``, and ``num_experts``."""
    return [*(2**k for k in range(num_experts.bit_length()) if 2**k < num_experts),
            num_experts]


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks run
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement window")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, GOAL_CONCURRENCY])
    ap.add_argument("--capacity", type=int, default=None,
                    help="experts per packed server of (d) (default: ceil(experts / 2))")
    ap.add_argument("--memory-sizes", type=int, nargs="+", default=None,
                    help="experts held by the servers of the memory table "
                         "(default: 1 2 4 ... and all)")
    ap.add_argument("--extrapolate-experts", type=int, default=256,
                    help="experts of the model the memory estimate is for")
    ap.add_argument("--extrapolate-servers", type=int, default=4,
                    help="packed servers of that estimate")
    args = ap.parse_args()
    spec = PRESETS[args.preset]
    args.capacity = args.capacity or math.ceil(spec.num_experts / 2)
    args.memory_sizes = sorted(set(args.memory_sizes or default_sizes(spec.num_experts)))
    if not 1 <= args.capacity <= spec.num_experts:
        ap.error(f"--capacity: 1 to {spec.num_experts}")
    if len(args.memory_sizes) < 2 or not all(1 <= n <= spec.num_experts
                                             for n in args.memory_sizes):
        ap.error(f"--memory-sizes: two or more sizes of 1 to {spec.num_experts}")
    if args.extrapolate_experts < 1 or args.extrapolate_servers < 1:
        ap.error("--extrapolate-experts and --extrapolate-servers: 1 or more")
    started = time.monotonic()
    ids = np.random.default_rng(0).integers(
        0, spec.vocab_size, (args.batch, min(args.seq, spec.max_seq))).astype(np.int64)

    with tempfile.TemporaryDirectory(prefix="autoglm-bench-") as tmp:
        repo, ckpt = Path(tmp) / "repo", Path(tmp) / "ckpt"
        write_tiny_checkpoint(ckpt, spec, f"bench-{args.preset}", VERSION)
        built = import_checkpoint(ckpt, repo, VERSION, f"bench-{args.preset}", progress=False)
        print(f"model {args.preset} ({built.config.architecture}): {json.dumps(as_dict(spec))}"
              f"; request {ids.shape}; {args.rounds} rounds x {args.seconds:g} s per"
              " form and concurrency, interleaved", flush=True)

        ref = load_reference(repo, VERSION)
        hf = load_transformers(ckpt)
        torch.set_num_threads(1)  # one core per request, like a Triton instance

        one = DataPlane(repo, VERSION, Path(tmp) / "plane-one", capacity=1)
        packed = DataPlane(repo, VERSION, Path(tmp) / "plane-packed", capacity=args.capacity)
        extra: list[TritonServer] = []  # every server started outside the planes
        try:
            memory = measure_memory(args, spec, repo, ref, Path(tmp), extra)
            rows = run(args, spec, repo, ids, ref, hf, one, packed, memory)
        finally:
            mine = [*one.servers(), *packed.servers(), *extra]
            stop_all(mine)
            one.stop()  # no-ops once stopped; kept as the last word
            packed.stop()
            for s in extra:
                s.stop()
            left = [f for s in mine for f in s.shm_regions()]
            alive = sum(s.popen is not None for s in mine)
            print(f"cleanup: {len(mine)} servers stopped ({alive} alive), "
                  f"{len(left)} shared-memory regions left", flush=True)

    report(args, rows, memory)
    print(f"\nbench took {time.monotonic() - started:.0f} s")
    return 0


def measure_memory(args: argparse.Namespace, spec: TinySpec, repo: Path, ref: Model,
                   tmp: Path, extra: list[TritonServer]) -> Memory:
    """Expert servers holding ``args.memory_sizes`` experts (0..n-1), each warmed and its RSS
    taken, then stopped (they are not needed for the timing)."""
    t0 = time.monotonic()
    slices = [weight_bytes(repo / expert_folder(e) / str(VERSION))
              for e in range(spec.num_experts)]
    servers = []
    for n in args.memory_sizes:
        held = list(range(n))
        s = TritonServer(repo, {experts_model(): VERSION},
                         env={SERVER_EXPERTS_ENV: format_server_experts(held)},
                         log_path=tmp / f"memory-{n}-experts.log")
        extra.append(s)  # stopped by the caller, even if the start fails
        servers.append((held, s))
    # One at a time, from this thread: a server is killed when the thread that started it
    # exits (PR_SET_PDEATHSIG, autoglm.procs), so not from a pool's threads.
    for _, s in servers:
        s.start()
    sizes = [(len(held), sum(slices[e] for e in held), warm(s, held, ref))
             for held, s in servers]
    stop_all(s for _, s in servers)
    print(f"memory: {len(servers)} expert servers ({', '.join(str(n) for n, _, _ in sizes)}"
          f" experts) started, warmed and stopped in {time.monotonic() - t0:.0f} s",
          flush=True)
    return {"sizes": sizes, "slice": statistics.median(slices),
            "router_weights": weight_bytes(repo / router_model() / str(VERSION)),
            "router_instances": pinned_config(repo, router_model(), VERSION)
            ["instance_group"][0]["count"],
            "expert_instances": pinned_config(repo, experts_model(), VERSION)
            ["instance_group"][0]["count"]}


def run(args: argparse.Namespace, spec: TinySpec, repo: Path, ids: Ids, ref: Model,
        hf: Callable[[torch.Tensor], torch.Tensor], one: DataPlane, packed: DataPlane,
        memory: Memory) -> dict[str, dict[int, list[Stats]]]:
    # -- the two layouts, each expert once ------------------------------------------------
    t0 = time.monotonic()
    planes = {ONE: one.start(1), PACKED: packed.start(1)}
    for plane in planes.values():
        assert plane.router is not None
        wait_for_replicas(plane.router, spec.num_experts)
    layouts = {name: [format_server_experts(x.held) for x in plane.expert_servers]
               for name, plane in planes.items()}
    print(f"servers up in {time.monotonic() - t0:.0f} s: (c) {len(layouts[ONE])} expert "
          f"servers, (d) {len(layouts[PACKED])} of up to {args.capacity} experts "
          f"({' | '.join(layouts[PACKED])}), a router each", flush=True)
    routers = {name: plane.router for name, plane in planes.items()
               if plane.router is not None}

    forms: dict[str, Callable[[], Call]] = {
        REF: in_process(ref), HF: in_process(hf),
        ONE: triton(routers[ONE]), PACKED: triton(routers[PACKED]),
    }

    # -- the logits of every form against the reference, before timing -------------------
    rng = np.random.default_rng(1)
    checks = [ids, *(rng.integers(0, spec.vocab_size, (b, s)).astype(np.int64)
                     for b, s in ((2, 17), (3, 5)))]
    call_ref = forms[REF]()
    expected = [call_ref(x) for x in checks]
    print(f"max |logits - reference| over {len(checks)} requests "
          f"({', '.join('x'.join(map(str, x.shape)) for x in checks)}):")
    for name, make in forms.items():
        router = routers.get(name)
        before = server_calls(router) if router is not None else 0.0
        call = make()
        diff = max(float(np.abs(call(x) - want).max()) for x, want in zip(checks, expected,
                                                                        strict=True))
        calls = "" if router is None else \
            f"  ({(server_calls(router) - before) / len(checks):.1f} expert-server calls" \
            " per request)"
        print(f"  {name:32} {diff:.2e}{calls}", flush=True)
        if diff > TOLERANCE:
            raise SystemExit(f"{name}: logits differ from the reference by {diff:.2e}")
        measure(make, max(args.concurrency), 0.5, ids)  # warm-up: threads, connections

    def rss(plane: DataPlane) -> tuple[int, list[int]]:
        assert plane.router is not None
        return plane.router.rss_bytes(), [x.server.rss_bytes() for x in plane.expert_servers]

    memory["planes"] = {name: {"layout": layouts[name], "warm": rss(plane)}
                        for name, plane in planes.items()}

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

    for name, plane in planes.items():
        memory["planes"][name]["after"] = rss(plane)
    return rows


def ratios(runs: list[Stats], base: list[Stats]) -> list[float]:
    """The ratio to (a) of the same round, median over rounds, per statistic."""
    return [statistics.median(r[i] / b[i] for r, b in zip(runs, base, strict=True))
            for i in range(3)]


def report(args: argparse.Namespace, rows: dict[str, dict[int, list[Stats]]],
           memory: Memory) -> None:
    base = rows[REF]
    print(f"\n{'':32} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
          f" {'req/s vs a':>11} {'p50 vs a':>9} {'p99 vs a':>9}")
    for name, by_c in rows.items():
        for c, runs in by_c.items():
            med = [statistics.median(r[i] for r in runs) for i in range(3)]
            ratio = ratios(runs, base[c])
            print(f"{name:32} {c:>4} {med[0]:>8.1f} {med[1]:>8.1f} {med[2]:>8.1f}"
                  f" {ratio[0]:>11.2f} {ratio[1]:>9.2f} {ratio[2]:>9.2f}")

    c = GOAL_CONCURRENCY if GOAL_CONCURRENCY in args.concurrency else max(args.concurrency)
    note = "" if c == GOAL_CONCURRENCY else \
        f" (concurrency {GOAL_CONCURRENCY} was not run: at {c} instead)"
    packed, unpacked = ratios(rows[PACKED][c], base[c])[0], ratios(rows[ONE][c], base[c])[0]
    print(f"\ngoal: (d) packed servers >= {GOAL_RATIO:g}x (a)'s requests/s at concurrency "
          f"{GOAL_CONCURRENCY}{note}:\n  (d) packed / (a) reference = {packed:.2f} "
          f"({'met' if packed >= GOAL_RATIO else 'NOT met'}); "
          f"(c) 1 server/expert / (a) = {unpacked:.2f}")

    print(f"\nmemory of the timed servers (RSS of the server and its Python-backend stubs, "
          f"MiB; warm: after\nthe logits checks; the router has {memory['router_instances']}"
          f" instances, {memory['router_weights'] / MiB:.1f} MiB of weights):")
    print(f"  {'':44} {'warm':>9} {'after runs':>11}")
    for name, plane in memory["planes"].items():
        (r_warm, e_warm), (r_after, e_after) = plane["warm"], plane["after"]
        print(f"  {name[:3] + ' router':44} {r_warm / MiB:>9.1f} {r_after / MiB:>11.1f}")
        for held, w, a in zip(plane["layout"], e_warm, e_after, strict=True):
            print(f"  {name[:3] + ' expert server, experts ' + held:44} {w / MiB:>9.1f}"
                  f" {a / MiB:>11.1f}")
        print(f"  {name[:3] + ' all expert servers':44} {sum(e_warm) / MiB:>9.1f}"
              f" {sum(e_after) / MiB:>11.1f}")

    sizes: list[tuple[int, int, int]] = memory["sizes"]
    print(f"\nan expert server's memory against the experts it holds (RSS of the server and "
          f"its stub,\n{memory['expert_instances']} instance; warm: after one direct call per"
          " MoE layer carrying rows of every held expert):")
    print(f"  {'experts held':>12} {'weights MiB':>12} {'RSS MiB':>9} {'RSS - weights':>14}")
    for n, w, r in sizes:
        print(f"  {n:>12} {w / MiB:>12.1f} {r / MiB:>9.1f} {(r - w) / MiB:>14.1f}")
    growth, base_rss = statistics.linear_regression([float(n) for n, _, _ in sizes],
                                                    [float(r) for _, _, r in sizes])
    print(f"  linear fit: RSS = {base_rss / MiB:.1f} MiB base + {growth / MiB:.1f} MiB per "
          f"expert slice (a slice's weights: {memory['slice'] / MiB:.1f} MiB)")

    n, k = args.extrapolate_experts, args.extrapolate_servers
    one_rss = next((r for m, _, r in sizes if m == 1), None)
    per_server = math.ceil(n / k)
    packed_total = k * (base_rss + per_server * growth)
    print(f"\nestimate for a {n}-expert model with slices of this size (an extrapolation from "
          "the\nmeasured figures above, not measured):")
    if one_rss is not None:
        print(f"  {f'one server per expert ({n} servers)':38} {n} x {one_rss / MiB:.1f} MiB"
              f" (measured 1-expert RSS) = {n * one_rss / GiB:.2f} GiB")
    print(f"  {f'{k} packed servers of {per_server} experts':38} {k} x ({base_rss / MiB:.1f}"
          f" MiB fitted base + {per_server} x {growth / MiB:.1f} MiB fitted per slice)"
          f" = {packed_total / GiB:.2f} GiB")
    if one_rss is not None:
        print(f"  {'ratio':38} {n * one_rss / packed_total:.1f}x less memory packed")


if __name__ == "__main__":
    sys.exit(main())
