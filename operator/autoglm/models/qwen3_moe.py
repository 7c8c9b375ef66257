"""Qwen3-MoE (``Qwen3MoeForCausalLM``): GQA with per-head q/k RMSNorm, softmax top-k
(renormalized with ``norm_topk_prob``), no shared expert, optional dense layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoglm.models.config import ModelConfig, common
from autoglm.models.qwen2_moe import sliding_window, softmax_moe

ARCHITECTURE = "Qwen3MoeForCausalLM"


def config(hf: Mapping[str, Any]) -> ModelConfig:
    c = common(hf, ARCHITECTURE)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **c,
        **softmax_moe(hf, c["num_layers"]),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        sliding_window=sliding_window(hf),
    )


def canonical(name: str) -> str:
    return name
