"""The data plane's model code on an NVIDIA GPU, against transformers on the same GPU.

Not a test (CI has no GPU): run it by hand where one is, ``python bench/gpu/gpu_check.py``.
For each architecture, a tiny random checkpoint (transformers, offline) is imported, and the
router tier and every expert slice are loaded onto the GPU the way the Triton backends load
them (``load_weights`` on ``cuda``). Checked: logits in fp32 and bf16, and the generation
engine's greedy tokens for 8 prompts of different lengths batched together. Then output
tokens/s of the engine (experts in process: the engine's own ceiling, no RPC) against
transformers' ``generate`` on the bench checkpoint, concurrency 1 and 32, as ratios.
Exit status 1 if fp32 logits or greedy tokens disagree.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from autoglm.engine.sampler import SamplingParams
from autoglm.engine.scheduler import Engine, Request
from autoglm.models.decoder import ExpertSlice, Model, RouterTier
from autoglm.models.tiny import PRESETS, write_tiny_checkpoint
from autoglm.plan import expert_folder, router_model
from autoglm.repository import import_checkpoint, load_part_config, load_weights
from autoglm.testing.checkpoints import ARCHITECTURES, write_checkpoint

DEV = "cuda"
LENGTHS = (1, 3, 5, 8, 11, 16, 23, 40)
NEW = 24


def on_gpu(repo: Path, dtype: torch.dtype) -> Model:
    """As ``repository.load_reference``, every part loaded on the GPU in ``dtype``."""
    folder = repo / router_model() / "1"
    _, cfg = load_part_config(folder)
    router = RouterTier(cfg, load_weights(folder, DEV, dtype))
    experts = [ExpertSlice(cfg, i, load_weights(repo / expert_folder(i) / "1", DEV, dtype))
               for i in range(cfg.num_experts)]
    return Model(router, experts)


def theirs(src: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    m: Any = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    m = m.to(DEV).eval()
    m.generation_config.pad_token_id = 0
    return m


def engine_tokens(model: Model, prompts: list[list[int]], new: int) -> dict[int, list[int]]:
    eng = Engine(model.router, model.local_fanout, kv_capacity_tokens=16384,
                 max_batch_tokens=512, prefill_chunk=128)
    ids = [eng.add(Request(p, SamplingParams(max_tokens=new, temperature=0.0)))
           for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    with torch.inference_mode():
        while eng.has_work():
            for e in eng.step():
                out[e.id].append(e.token)
    return {k: out[i] for k, i in enumerate(ids)}


def check(arch: str, work: Path) -> bool:
    src = write_checkpoint(arch, work / arch / "ckpt", seed=1)
    repo = import_checkpoint(src, work / arch / "repo", 1, "m", progress=False).repository
    gen = torch.Generator().manual_seed(0)
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        ours, ref = on_gpu(repo, dtype), theirs(src, dtype)
        ids = torch.randint(0, ours.cfg.vocab_size, (2, 13), generator=gen).to(DEV)
        with torch.inference_mode():
            got, want = ours(ids).float(), ref(ids).logits.float()
        diff = (got - want).abs().max().item()
        top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        line = f"{arch:24s} {str(dtype)[6:]:8s} logits max|diff| {diff:.2e}, top-1 same {top1:.3f}"
        if dtype == torch.float32:
            ok &= diff < 1e-3
            prompts = [torch.randint(0, ours.cfg.vocab_size, (n,), generator=gen).tolist()
                       for n in LENGTHS]
            mine = engine_tokens(ours, prompts, NEW)
            same = 0
            for k, p in enumerate(prompts):
                x = torch.tensor([p], device=DEV)
                with torch.inference_mode():
                    out = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                       max_new_tokens=NEW, eos_token_id=None)
                same += out[0, len(p):].tolist() == mine[k]
            ok &= same == len(prompts)
            line += f"; greedy, 8 prompts batched: {same}/{len(prompts)} equal transformers'"
        print(line, flush=True)
    return ok


def throughput(work: Path) -> None:
    spec = PRESETS["bench"]
    src = write_tiny_checkpoint(work / "bench" / "ckpt", spec, "bench-moe", 1)
    repo = import_checkpoint(src, work / "bench" / "repo", 1, "bench-moe",
                             progress=False).repository
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        ours, ref = on_gpu(repo, dtype), theirs(src, dtype)
        for conc in (1, 32):
            prompts = [torch.randint(1, 96, (32,), generator=gen).tolist() for _ in range(conc)]
            rates = {}
            for name in ("transformers", "autoglm", "transformers", "autoglm"):  # interleaved
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if name == "autoglm":
                    engine_tokens(ours, prompts, 64)
                else:
                    x = torch.tensor(prompts, device=DEV)
                    with torch.inference_mode():
                        ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                     max_new_tokens=64, min_new_tokens=64)
                torch.cuda.synchronize()
                rates[name] = conc * 64 / (time.perf_counter() - t0)  # the second round counts
            print(f"bench checkpoint {str(dtype)[6:]:8s} concurrency {conc:2d}: transformers "
                  f"{rates['transformers']:7.0f} tok/s, engine {rates['autoglm']:7.0f} tok/s "
                  f"(ratio {rates['autoglm'] / rates['transformers']:.2f})", flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ok = all([check(arch, Path(tmp)) for arch in ARCHITECTURES])
        throughput(Path(tmp))
    print("GPU check:", "all equal" if ok else "DISAGREEMENTS (above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
