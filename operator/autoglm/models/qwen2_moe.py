"""Qwen2-MoE (``Qwen2MoeForCausalLM``): GQA with qkv bias, softmax top-k (renormalized only
with ``norm_topk_prob``), a shared expert behind a sigmoid gate, optional dense layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoglm.models.config import GateConfig, ModelConfig, common, need


def moe_layers(hf: Mapping[str, Any], layers: int) -> tuple[int, ...]:
    """Qwen's rule: sparse unless listed in ``mlp_only_layers``, every ``decoder_sparse_step``."""
    dense = set(hf.get("mlp_only_layers") or ())
    step = int(hf.get("decoder_sparse_step") or 1)
    experts = int(need(hf, "num_experts", "num_local_experts"))
    return tuple(i for i in range(layers)
                 if i not in dense and experts > 0 and (i + 1) % step == 0)


def softmax_moe(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """The MoE fields Qwen2-MoE and Qwen3-MoE read alike."""
    return {"num_experts": int(need(hf, "num_experts", "num_local_experts")),
            "top_k": int(need(hf, "num_experts_per_tok")),
            "moe_intermediate_size": int(need(hf, "moe_intermediate_size")),
            "intermediate_size": int(hf.get("intermediate_size") or 0),
            "moe_layers": moe_layers(hf, layers),
            "gate": GateConfig(scoring="softmax",
                               norm_topk_prob=bool(hf.get("norm_topk_prob", False)))}


def sliding_window(hf: Mapping[str, Any]) -> int | None:
    return int(hf["sliding_window"]) if hf.get("use_sliding_window") else None


ARCHITECTURE = "Qwen2MoeForCausalLM"


def config(hf: Mapping[str, Any]) -> ModelConfig:
    c = common(hf, ARCHITECTURE)
    if sliding_window(hf) is not None:
        from autoglm.models.errors import UnsupportedConfig
        # Qwen2-MoE slides only on layers past max_window_layers: not implemented.
        raise UnsupportedConfig("use_sliding_window is not supported for Qwen2-MoE")
    return ModelConfig(
        **c,
        **softmax_moe(hf, c["num_layers"]),
        shared_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
        shared_expert_gate=bool(hf.get("shared_expert_intermediate_size")),
        qkv_bias=bool(hf.get("qkv_bias", True)),
    )


def canonical(name: str) -> str:
    return name
