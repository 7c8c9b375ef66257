"""Peer engine for bench/generate: llama-cpp-python on the same HF checkpoint.

Runs in the llama-cpp-python virtualenv that setup.sh builds (not the project's .venv):

    ~/.cache/autoglm/bench-peers/llama-cpp-python-0.3.36/bin/python \
        bench/generate/peers/run_llamacpp.py --checkpoint DIR --prompts P.json \
        --new-tokens 64 --concurrency 8

The HF checkpoint is converted to GGUF (f32, no quantisation) with the converter setup.sh copied
out of the llama-cpp-python sdist, once per checkpoint content (cache: --gguf-cache). The prompts
file is a JSON list of token-id lists (or {"prompts": [...]}); token ids are fed directly, so the
GGUF's tokenizer only has to load, not to match. Decoding is greedy, EOS ignored, exactly
--new-tokens new tokens per prompt.

Concurrency: llama.cpp batches several sequences in one context (n_seq_max, one llama_decode
over a batch that mixes the prefill of new requests with one decode token per running
request, as llama-server's continuous batching does). The high-level llama_cpp.Llama object
serves one sequence at a time, so this drives the low-level llama_cpp API instead: at most
--concurrency requests in flight, the next prompt admitted as soon as a sequence finishes
(closed loop, like C clients each sending its next request when the previous one ended). TTFT
is measured from a request's admission to its first token; ITL between its consecutive tokens.

Prints ONE JSON line on stdout (everything else goes to stderr):
    {"engine", "concurrency", "tokens", "seconds", "tokens_per_s", "ttft_ms": {"p50","p99"},
     "itl_ms": {"p50","p99"}, "first_tokens", "settings"}
--dump-tokens FILE writes every prompt's new tokens ({"tokens": [[...], ...]}) for
reference.py --compare.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from peer_common import load_prompts, summary

DEFAULT_CACHE = Path.home() / ".cache" / "autoglm" / "bench-peers" / "gguf"
# The converter setup.sh copied out of the sdist: <venv>/converter.
DEFAULT_CONVERTER = Path(sys.prefix) / "converter"
HASHED = ("config.json", "tokenizer.json", "tokenizer_config.json")

# Run inside a subprocess: the upstream converter, except that a BPE pre-tokenizer it does not
# recognise (the project's tiny tokenizer is not in its hash table) is written as "default"
# instead of refusing the model. The bench feeds token ids, so this only affects text.
_CONVERT = r"""
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def _pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        print("convert: unrecognised BPE pre-tokenizer, written as 'default'", file=sys.stderr)
        return "default"
base.TextModel.get_vocab_base_pre = _pre
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def checkpoint_hash(ckpt: Path, converter: Path) -> str:
    h = hashlib.sha256()
    h.update((converter / "convert_hf_to_gguf.py").read_bytes())
    files = [ckpt / n for n in HASHED if (ckpt / n).exists()] + sorted(ckpt.glob("*.safetensors"))
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def convert(ckpt: Path, cache: Path, converter: Path) -> Path:
    out = cache / f"{ckpt.name}-{checkpoint_hash(ckpt, converter)}-f32.gguf"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            _CONVERT,
            str(converter),
            str(ckpt),
            "--outtype",
            "f32",
            "--outfile",
            str(tmp),
        ],
        check=True,
        stdout=sys.stderr,
    )
    tmp.rename(out)
    log(f"converted {ckpt} -> {out} in {time.perf_counter() - t0:.1f}s")
    return out


@dataclass
class Request:
    index: int
    prompt: list[int]
    seq: int = -1
    admitted: float = 0.0
    pos: int = 0
    feed: list[int] = field(default_factory=list)  # tokens for the next decode
    out: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


class Engine:
    """A llama.cpp context with n_seq_max sequences, driven through llama_cpp's C API."""

    def __init__(
        self,
        gguf: Path,
        n_seq: int,
        n_ctx_seq: int,
        threads: int,
        kv_type: str,
        flash_attn: str,
        kv_unified: bool,
    ):
        import llama_cpp as L  # type: ignore[import-not-found,unused-ignore]

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = L.llama_context_default_params()
        cp.n_seq_max = n_seq
        # unified: one KV buffer that every sequence's attention scans (masked); split: one
        # stream of n_ctx / n_seq_max cells per sequence.
        cp.kv_unified = kv_unified
        cp.n_ctx = n_seq * n_ctx_seq
        cp.n_batch = cp.n_ubatch = max(512, min(cp.n_ctx, 4096))
        cp.n_threads = cp.n_threads_batch = threads
        kv = {"f32": L.GGML_TYPE_F32, "f16": L.GGML_TYPE_F16}[kv_type]
        cp.type_k = cp.type_v = kv
        cp.flash_attn_type = {"auto": -1, "off": 0, "on": 1}[flash_attn]
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_batch = cp.n_batch
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    def decode(self, rows: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decodes (token, pos, seq, wants_logits) rows in one batch (split into n_batch chunks
        when larger); returns the greedy next token of every row that wants logits, in order."""
        L, b = self.L, self.batch
        picks: list[int] = []
        for start in range(0, len(rows), self.n_batch):
            chunk = rows[start : start + self.n_batch]
            for i, (tok, pos, seq, want) in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = want
            b.n_tokens = len(chunk)
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for i, (_, _, _, want) in enumerate(chunk):
                if want:
                    ptr = L.llama_get_logits_ith(self.ctx, i)
                    logits = np.ctypeslib.as_array(
                        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)
                    )
                    picks.append(int(logits.argmax()))
        return picks

    def free_seq(self, seq: int) -> None:
        self.L.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def clear(self) -> None:
        self.L.llama_memory_clear(self.mem, True)


def run(
    engine: Engine, prompts: list[list[int]], new_tokens: int, concurrency: int
) -> tuple[list[Request], float]:
    pending = [Request(i, p) for i, p in enumerate(prompts)]
    pending.reverse()
    free = list(range(concurrency))
    running: list[Request] = []
    done: list[Request] = []
    t0 = time.perf_counter()
    while pending or running:
        now = time.perf_counter()
        while pending and free:  # admit: a free slot takes the next request at once
            r = pending.pop()
            r.seq, r.admitted, r.feed = free.pop(), now, list(r.prompt)
            running.append(r)
        rows: list[tuple[int, int, int, bool]] = []
        for r in running:
            last = len(r.feed) - 1
            rows += [(t, r.pos + k, r.seq, k == last) for k, t in enumerate(r.feed)]
        picks = engine.decode(rows)
        now = time.perf_counter()
        still: list[Request] = []
        for r, tok in zip(running, picks, strict=True):
            r.pos += len(r.feed)
            r.out.append(tok)
            r.times.append(now)
            r.feed = [tok]
            if len(r.out) == new_tokens:
                engine.free_seq(r.seq)
                free.append(r.seq)
                done.append(r)
            else:
                still.append(r)
        running = still
    return sorted(done, key=lambda r: r.index), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("PEER_THREADS", 2)))
    ap.add_argument("--gguf-cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--converter", type=Path, default=DEFAULT_CONVERTER)
    ap.add_argument(
        "--kv-type",
        choices=("f32", "f16"),
        default="f32",
        help="KV cache type (f32 keeps the math exact; llama.cpp's default is f16)",
    )
    ap.add_argument(
        "--flash-attn",
        choices=("auto", "on", "off"),
        default="off",
        help="llama.cpp's CPU flash attention (what 'auto' picks) is ~2x faster at "
        "32 sequences but rounds: on the bench checkpoint half the prompts' 64 "
        "greedy tokens then differ from transformers' (some from the 3rd token); "
        "off keeps all equal",
    )
    ap.add_argument(
        "--kv-unified",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one KV buffer shared by all sequences (default) or one per sequence",
    )
    ap.add_argument("--verbose", action="store_true", help="llama.cpp's own log on stderr")
    ap.add_argument("--dump-tokens", type=Path, help="write every prompt's new tokens here")
    args = ap.parse_args()

    import llama_cpp  # type: ignore[import-not-found,unused-ignore]
    from llama_cpp._logger import set_verbose  # type: ignore[import-not-found,unused-ignore]

    set_verbose(args.verbose)
    prompts = load_prompts(args.prompts)
    if not prompts or args.new_tokens < 1 or args.concurrency < 1:
        ap.error("need prompts, --new-tokens >= 1 and --concurrency >= 1")
    gguf = convert(args.checkpoint, args.gguf_cache, args.converter)
    c = min(args.concurrency, len(prompts))
    n_ctx_seq = max(len(p) for p in prompts) + args.new_tokens
    engine = Engine(
        gguf, c, n_ctx_seq, args.threads, args.kv_type, args.flash_attn, args.kv_unified
    )
    # Warm-up (allocations, thread pool): one short request, then an empty KV cache.
    run(engine, prompts[:1], min(4, args.new_tokens), 1)
    engine.clear()

    reqs, seconds = run(engine, prompts, args.new_tokens, c)
    settings = {"threads": args.threads, "kv_type": args.kv_type, "flash_attn": args.flash_attn,
                "kv_unified": args.kv_unified, "gguf": "f32"}
    print(json.dumps(summary(f"llama-cpp-python {llama_cpp.__version__}", args.concurrency,
                             [r.out for r in reqs], [r.admitted for r in reqs],
                             [r.times for r in reqs], seconds, settings, args.dump_tokens)),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
