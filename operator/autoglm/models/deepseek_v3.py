"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent attention (MLA), sigmoid
scores with ``e_score_correction_bias`` and group-limited top-k, shared experts, the first
``first_k_dense_replace`` layers dense."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoglm.models.config import MLAConfig, ModelConfig, common, need
from autoglm.models.glm4_moe import first_dense, sigmoid_gate

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
    moe_size = int(need(hf, "moe_intermediate_size"))
    return ModelConfig(
        **c,
        num_experts=int(need(hf, "n_routed_experts", "num_local_experts")),
        top_k=int(need(hf, "num_experts_per_tok")),
        moe_intermediate_size=moe_size,
        intermediate_size=int(need(hf, "intermediate_size")),
        moe_layers=first_dense(hf, c["num_layers"], 3),
        gate=sigmoid_gate(hf, 2.5),
        shared_intermediate_size=moe_size * int(hf.get("n_shared_experts") or 0),
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        mla=mla,
        extra_layers=int(hf.get("num_nextn_predict_layers") or 0),
    )


def canonical(name: str) -> str:
    return name
