"""Reference greedy tokens for a checkpoint, from transformers (run it in the project's .venv).

    .venv/bin/python bench/generate/peers/reference.py --checkpoint DIR --prompts P.json \
        --new-tokens 24 [--compare TOKENS.json]

Prints one JSON line {"tokens": [[...], ...]} (the new tokens of every prompt: greedy, EOS
ignored, exactly N). With --compare FILE (a peer's --dump-tokens output) it also prints, per
prompt, how many leading tokens agree, and exits 1 when any prompt differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from peer_common import load_prompts
from transformers import AutoModelForCausalLM


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    new = [int(t) for t in out[0, len(prompt) :].tolist()]
    assert len(new) == n, f"generated {len(new)} tokens, wanted {n}"
    return new


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--compare", type=Path, help="a peer's --dump-tokens file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model: Any = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    model.eval()
    # EOS ignored: generation stops at max_new_tokens only.
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        ref = [greedy(model, p, args.new_tokens) for p in load_prompts(args.prompts)]
    print(json.dumps({"tokens": ref}))
    if args.compare is None:
        return 0
    peer = json.loads(args.compare.read_text())["tokens"]
    ok = True
    for i, (r, p) in enumerate(zip(ref, peer, strict=True)):
        pairs = enumerate(zip(r, p, strict=False))
        agree = next((k for k, (a, b) in pairs if a != b), min(len(r), len(p)))
        same = agree == len(r) == len(p)
        ok &= same
        verdict = "match" if same else "DIFFER"
        print(f"prompt {i}: {verdict} ({agree}/{len(r)} leading tokens agree)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
