"""Tiny random Hugging Face MoE checkpoints, written offline, and transformers as the reference.

Each architecture is CPU-tiny but has its distinctive features switched on (shared experts,
dense layers, q/k norms, biases, partial or YaRN rotary embeddings, MLA, grouped routing with a
score-correction bias), so that our model code is compared against transformers on all of them.
transformers (a dev dependency only) is imported inside the functions: importing this module
stays cheap.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoglm.models.vocab import EOS_ID, write_tokenizer

if TYPE_CHECKING:
    import torch
    import transformers

ARCHITECTURES: tuple[str, ...] = (
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "Glm4MoeForCausalLM",
    "DeepseekV3ForCausalLM",
)

_CONFIG_CLASS = {
    "MixtralForCausalLM": "MixtralConfig",
    "Qwen2MoeForCausalLM": "Qwen2MoeConfig",
    "Qwen3MoeForCausalLM": "Qwen3MoeConfig",
    "Glm4MoeForCausalLM": "Glm4MoeConfig",
    "DeepseekV3ForCausalLM": "DeepseekV3Config",
}

# 0.2 rather than the usual 0.02: router logits then differ clearly between experts, so the
# top-k choice is not decided by rounding noise when our code is compared with transformers.
_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,
    "rms_norm_eps": 1e-6,
    "eos_token_id": EOS_ID,
    "pad_token_id": EOS_ID,
    "bos_token_id": None,
    "tie_word_embeddings": False,
}

# Dense MLPs (dense layers) are 96 wide, routed experts 32, so a mix-up shows as a shape error.
_ARCH: dict[str, dict[str, Any]] = {
    "MixtralForCausalLM": {
        "head_dim": 16,
        "intermediate_size": 32,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "sliding_window": None,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    },
    "Qwen2MoeForCausalLM": {
        # head_dim is implied (64 / 4), as in the Hub's Qwen2-MoE configs.
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "qkv_bias": True,
        "decoder_sparse_step": 2,  # layers 0 and 2 dense, 1 and 3 sparse
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    },
    "Qwen3MoeForCausalLM": {
        "head_dim": 16,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "mlp_only_layers": [1],
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "Glm4MoeForCausalLM": {
        "head_dim": 16,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "use_qk_norm": True,
        "attention_bias": True,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e6,
            "partial_rotary_factor": 0.5,
        },
    },
    "DeepseekV3ForCausalLM": {
        "num_key_value_heads": 4,  # MLA: one latent for all heads; the Hub sets it = heads
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "rope_interleave": True,
        # mscale != mscale_all_dim so that both the cos/sin factor and the softmax scale differ
        # from 1 (the released DeepSeek-V3 has 1.0 for both, which cancels in the cos/sin factor).
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    },
}

# Per-expert tensors as save_pretrained writes them (Mixtral: block_sparse_moe...w1/w2/w3).
_PER_EXPERT = re.compile(r"^model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts\.\d+\.")
# Fused expert tensors as transformers holds them: gate_up_proj [E, 2I, H], down_proj [E, H, I].
_FUSED = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(?:gate_up_proj|down_proj)$")


def tiny_config(arch: str, **overrides: Any) -> transformers.PretrainedConfig:
    """A CPU-tiny config for ``arch`` (one of ARCHITECTURES); ``overrides`` replace its fields
    (a ``rope_parameters`` override replaces the whole dict)."""
    import transformers

    if arch not in _ARCH:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    cls = getattr(transformers, _CONFIG_CLASS[arch])
    kwargs = {**_COMMON, **_ARCH[arch], **overrides}
    cfg: transformers.PretrainedConfig = cls(**kwargs)
    cfg.architectures = [arch]
    return cfg


def _randomize_defaults(model: transformers.PreTrainedModel) -> None:
    """Give the tensors that initialise to constants random values: zeros and ones would let
    code that ignores a bias, a norm weight or the routing correction pass the comparison."""
    import torch

    with torch.no_grad():
        for name, buf in model.named_buffers():
            # Saved with the checkpoint (DeepSeek-V3, GLM-4.5): shifts expert selection only.
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.2)
            elif p.dim() == 1:  # RMSNorm weights
                p.copy_(1.0 + torch.randn_like(p) * 0.1)
        # The padding row starts at zero (pad = eos here); give eos a real embedding.
        emb = model.get_input_embeddings()
        if isinstance(emb, torch.nn.Embedding) and emb.padding_idx is not None:
            emb.weight[emb.padding_idx].normal_(0.0, 0.2)


def _weight_files(dest: Path) -> list[Path]:
    return sorted(dest.glob("model*.safetensors"))


def write_checkpoint(arch: str, dest: Path, *, seed: int = 0, tied: bool = False,
                     shards: int = 1, fused: bool = False, **overrides: Any) -> Path:
    """Write a random ``arch`` checkpoint (fp32) into ``dest`` and return ``dest``.

    config.json, generation_config.json and weights via ``save_pretrained`` (the Hub layout:
    one tensor per routed expert), plus the tokenizer (``vocab.write_tokenizer``).
    ``tied``: the lm_head shares embed_tokens and is absent from the weights.
    ``shards`` > 1: at least that many ``model-0000i-of-0000n.safetensors`` and
    ``model.safetensors.index.json``.
    ``fused``: a single ``model.safetensors`` whose routed experts are stored per layer as
    ``model.layers.L.mlp.experts.gate_up_proj`` [E, 2*I, H] (gate rows, then up rows) and
    ``model.layers.L.mlp.experts.down_proj`` [E, H, I], every other tensor under its
    ``save_pretrained`` name (for Mixtral ``block_sparse_moe.gate.weight``).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if fused and shards > 1:
        raise ValueError("a fused checkpoint is written as a single model.safetensors")
    cfg = tiny_config(arch, tie_word_embeddings=tied, **overrides)
    torch.manual_seed(seed)
    model: transformers.PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        cfg, dtype=torch.float32)
    _randomize_defaults(model)

    dest.mkdir(parents=True, exist_ok=True)
    for stale in [*_weight_files(dest), dest / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(dest, max_shard_size=math.ceil(total / shards))
    else:
        model.save_pretrained(dest, max_shard_size=1 << 40)

    if fused:
        path = dest / "model.safetensors"
        tensors = {k: v for k, v in load_file(path).items() if not _PER_EXPERT.match(k)}
        for name, value in model.state_dict().items():
            if _FUSED.match(name):
                tensors[name] = value.detach().clone().contiguous()
        save_file(tensors, path, metadata={"format": "pt"})

    write_tokenizer(dest, cfg.vocab_size, model_max_length=cfg.max_position_embeddings)
    return dest


def reference_model(src: Path) -> torch.nn.Module:
    """transformers' model for the checkpoint in ``src``: fp32, eager attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def reference_routing(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, int]:
    """The tokens transformers' gates send to each routed expert for ``ids`` (all layers):
    every architecture's router module returns (logits, weights, expert indices)."""
    import torch

    counts: dict[int, int] = {}

    def hook(_m: torch.nn.Module, _inp: Any, out: Any) -> None:
        for e, n in zip(*torch.unique(out[2], return_counts=True), strict=True):
            counts[int(e)] = counts.get(int(e), 0) + int(n)

    gates = [m for m in model.modules() if re.search(r"Top[kK]Router$", type(m).__name__)]
    handles = [g.register_forward_hook(hook) for g in gates]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return counts
