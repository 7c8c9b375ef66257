"""The built-in tiny checkpoint: a real architecture (Qwen3-MoE-shaped), CPU-sized, written
offline with deterministic weights for (name, version), so the examples and tests need no
download. It is an ordinary Hugging Face checkpoint: ``autoglm model import`` reads it like
any other, and transformers loads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from autoglm.models.checkpoint import expected
from autoglm.models.qwen3_moe import ARCHITECTURE, config
from autoglm.models.vocab import write_tokenizer


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 256
    d_model: int = 32
    d_ff: int = 64          # each routed expert's intermediate size
    num_experts: int = 4
    top_k: int = 2
    layers: int = 2
    max_seq: int = 128
    heads: int = 4
    kv_heads: int = 2


PRESETS = {
    "tiny": TinySpec(),
    "bench": TinySpec(vocab_size=1024, d_model=256, d_ff=1024, num_experts=8, top_k=2,
                      layers=4, max_seq=512, heads=8, kv_heads=4),
}


def seed_for(name: str, version: int) -> int:
    digest = hashlib.sha256(f"{name}:{version}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def hf_config(spec: TinySpec) -> dict[str, Any]:
    return {
        "architectures": [ARCHITECTURE], "model_type": "qwen3_moe",
        "vocab_size": spec.vocab_size, "hidden_size": spec.d_model,
        "intermediate_size": 2 * spec.d_ff, "moe_intermediate_size": spec.d_ff,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": spec.d_model // spec.heads,
        "num_experts": spec.num_experts, "num_experts_per_tok": spec.top_k,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": spec.max_seq,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False, "tie_word_embeddings": False, "use_sliding_window": False,
        "torch_dtype": "float32", "bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0,
    }


def write_tiny_checkpoint(dest: Path, spec: TinySpec, name: str, version: int) -> Path:
    """A Hugging Face directory: config.json, model.safetensors, tokenizer, generation config.
    Weights are drawn with a generator seeded by (name, version): the same bytes anywhere;
    unit-scale outputs (std fan_in^-1/2) keep routing far from ties."""
    hf = hf_config(spec)
    gen = torch.Generator().manual_seed(seed_for(name, version))
    tensors: dict[str, torch.Tensor] = {}
    for tensor, shape in sorted(expected(config(hf)).items()):
        if len(shape) == 1:  # norms: around one
            tensors[tensor] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensors[tensor] = shape[1] ** -0.5 * torch.randn(shape, generator=gen)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(hf, indent=1))
    (dest / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 0, "pad_token_id": 0, "do_sample": False}, indent=1))
    write_tokenizer(dest, spec.vocab_size)
    return dest


def as_dict(spec: TinySpec) -> dict[str, int]:
    return asdict(spec)
