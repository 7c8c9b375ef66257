"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent attention (MLA), sigmoid
scores with ``e_score_correction_bias`` and group-limited top-k, shared experts, the first
``first_k_dense_replace`` layers dense."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoglm.models.config import MLAConfig, ModelConfig, common, need
from autoglm.models.glm4_moe import sigmoid_moe

ARCHITECTURE = "DeepseekV3ForCausalLM"


def config(hf: Mapping[str, Any]) -> ModelConfig:
    c = common(hf, ARCHITECTURE)
    mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank"),
                    kv_lora_rank=int(need(hf, "kv_lora_rank")),
                    qk_nope_head_dim=int(need(hf, "qk_nope_head_dim")),
                    qk_rope_head_dim=int(need(hf, "qk_rope_head_dim")),
                    v_head_dim=int(need(hf, "v_head_dim")),
                    rope_interleave=bool(hf.get("rope_interleave", True)))
    # RoPE covers only the rope part of each head.
    c["head_dim"] = mla.qk_rope_head_dim
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **c,
        **sigmoid_moe(hf, c["num_layers"], first_dense_default=3, scale_default=2.5),
        qkv_bias=bias,
        o_bias=bias,
        mla=mla,
    )


def canonical(name: str) -> str:
    return name
