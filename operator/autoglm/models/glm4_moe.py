"""GLM-4.5/4.6 (``Glm4MoeForCausalLM``): GQA with partial rotary and optional q/k norm,
sigmoid scores with ``e_score_correction_bias`` and group-limited top-k, shared experts,
the first ``first_k_dense_replace`` layers dense."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoglm.models.config import GateConfig, ModelConfig, common, need


def sigmoid_moe(hf: Mapping[str, Any], layers: int, first_dense_default: int,
                scale_default: float) -> dict[str, Any]:
    """The MoE fields GLM-4.5 and DeepSeek-V3 read alike (their defaults differ)."""
    moe_size = int(need(hf, "moe_intermediate_size"))
    return {"num_experts": int(need(hf, "n_routed_experts", "num_local_experts")),
            "top_k": int(need(hf, "num_experts_per_tok")),
            "moe_intermediate_size": moe_size,
            "intermediate_size": int(need(hf, "intermediate_size")),
            "moe_layers": first_dense(hf, layers, first_dense_default),
            "gate": sigmoid_gate(hf, scale_default),
            "shared_intermediate_size": moe_size * int(hf.get("n_shared_experts") or 0),
            "extra_layers": int(hf.get("num_nextn_predict_layers") or 0)}


def sigmoid_gate(hf: Mapping[str, Any], default_scale: float) -> GateConfig:
    return GateConfig(scoring="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                      routed_scaling_factor=float(hf.get("routed_scaling_factor",
                                                         default_scale)),
                      n_group=int(hf.get("n_group") or 1),
                      topk_group=int(hf.get("topk_group") or 1),
                      correction_bias=True)


def first_dense(hf: Mapping[str, Any], layers: int, default: int) -> tuple[int, ...]:
    k = hf.get("first_k_dense_replace")
    return tuple(range(default if k is None else int(k), layers))


ARCHITECTURE = "Glm4MoeForCausalLM"


def config(hf: Mapping[str, Any]) -> ModelConfig:
    c = common(hf, ARCHITECTURE, default_partial_rotary_factor=0.5)
    return ModelConfig(
        **c,
        **sigmoid_moe(hf, c["num_layers"], first_dense_default=1, scale_default=1.0),
        qkv_bias=bool(hf.get("attention_bias", False)),
        qk_norm=bool(hf.get("use_qk_norm", False)),
    )


def canonical(name: str) -> str:
    return name
