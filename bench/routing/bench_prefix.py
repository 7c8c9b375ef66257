"""bench/routing: the engine's prefix cache, in process (no Triton, experts called locally).

Time to first token of a request whose 1k-token prefix (a tenant's system prompt) is already
cached, against the same request on an engine without prefix caching, on the tiny checkpoint
(``autoglm.models.tiny``, its window widened to 2048 positions). The engine is set up as the
router's ``generate`` model is by default (16k tokens of KV cache, 256 tokens a step, prompt
chunks of 128) and torch on one thread, as there. Each round asks both engines the same new
question (16 tokens) after the prefix, alternately (the machine is shared and noisy); the
cached engine saw the prefix once before the first round. Medians over rounds, and their
ratio. First tokens that differ in any round fail the goal (a ratio between different
outputs means nothing).

    .venv/bin/python bench/routing/bench_prefix.py [--rounds 15]

The last line starts with PASS or FAIL (the goal: >= 3x); the exit status is 0 either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from autoglm.engine.sampler import SamplingParams
from autoglm.engine.scheduler import Engine, Request
from autoglm.models.decoder import Model
from autoglm.models.tiny import PRESETS, write_tiny_checkpoint
from autoglm.repository import import_checkpoint, load_reference

PREFIX, QUESTION, GOAL = 1024, 16, 3.0
FIRST = SamplingParams(max_tokens=1, temperature=0.0)


def load(work: Path) -> Model:
    spec = dataclasses.replace(PRESETS["tiny"], max_seq=2048)
    src = write_tiny_checkpoint(work / "ckpt", spec, "bench-prefix", 1)
    return load_reference(import_checkpoint(src, work / "repo", 1, "m", progress=False)
                          .repository, 1)


def engine(model: Model, prefix_caching: bool) -> Engine:
    return Engine(model.router, model.local_fanout, kv_capacity_tokens=16384,
                  max_batch_tokens=256, prefill_chunk=128, prefix_caching=prefix_caching)


def first_token(eng: Engine, prompt: list[int]) -> tuple[float, int]:
    """Seconds from the request's arrival to its first token, and the token."""
    start = time.perf_counter()
    rid = eng.add(Request(prompt, FIRST))
    while True:
        for e in eng.step():
            if e.id == rid:
                return time.perf_counter() - start, e.token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = load(Path(tmp))
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size

    def tokens(n: int) -> list[int]:
        return [int(t) for t in torch.randint(1, vocab, (n,), generator=gen)]

    prefix = tokens(PREFIX)
    cached, uncached = engine(model, True), engine(model, False)
    with torch.inference_mode():
        first_token(cached, prefix + tokens(QUESTION))  # the tenant's first request
        first_token(uncached, prefix + tokens(QUESTION))  # warm-up alike
        times: dict[bool, list[float]] = {True: [], False: []}
        differ = 0
        for _ in range(args.rounds):
            prompt = prefix + tokens(QUESTION)
            got = {}
            for caching, eng in ((True, cached), (False, uncached)):
                seconds, got[caching] = first_token(eng, prompt)
                times[caching].append(seconds)
            differ += got[True] != got[False]
    hit = cached.stats()
    on, off = statistics.median(times[True]), statistics.median(times[False])
    ratio = off / on
    print(f"tiny checkpoint, {PREFIX}-token cached prefix + {QUESTION}-token question, "
          f"{args.rounds} rounds, torch threads 1")
    print(f"TTFT median  with prefix cache {on * 1e3:8.2f} ms   "
          f"without {off * 1e3:8.2f} ms   ratio {ratio:.1f}x")
    print(f"prefix cache hits: {hit.prefix_hit_tokens} of {hit.prompt_tokens} prompt tokens; "
          f"rounds whose first tokens differ: {differ}")
    verdict = "PASS" if ratio >= GOAL and not differ else "FAIL"
    print(f"{verdict} prefix cache: cached 1k-token prefix cuts TTFT by >= {GOAL:.0f}x: "
          f"{ratio:.1f}x" + (f" (first tokens differ in {differ} rounds)" if differ else ""))


if __name__ == "__main__":
    main()
