"""Qwen3-MoE (``Qwen3MoeForCausalLM``): GQA with per-head q/k RMSNorm, softmax top-k
(renormalized with ``norm_topk_prob``), no shared expert, optional dense layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoglm.models.config import GateConfig, ModelConfig, common, need
from autoglm.models.qwen2_moe import moe_layers, sliding_window

ARCHITECTURE = "Qwen3MoeForCausalLM"


def config(hf: Mapping[str, Any]) -> ModelConfig:
    c = common(hf, ARCHITECTURE)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **c,
        num_experts=int(need(hf, "num_experts", "num_local_experts")),
        top_k=int(need(hf, "num_experts_per_tok")),
        moe_intermediate_size=int(need(hf, "moe_intermediate_size")),
        intermediate_size=int(hf.get("intermediate_size") or 0),
        moe_layers=moe_layers(hf, c["num_layers"]),
        gate=GateConfig(scoring="softmax", norm_topk_prob=bool(hf.get("norm_topk_prob", False))),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        sliding_window=sliding_window(hf),
    )


def canonical(name: str) -> str:
    return name
