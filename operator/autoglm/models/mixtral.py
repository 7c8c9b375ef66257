"""Mixtral (``MixtralForCausalLM``): GQA, softmax top-k renormalized, no shared expert."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from autoglm.models.config import GateConfig, ModelConfig, common, need

ARCHITECTURE = "MixtralForCausalLM"
# The Hub names Mixtral's MoE block and expert matrices its own way.
_RENAMES = ((re.compile(r"\.block_sparse_moe\."), ".mlp."),
            (re.compile(r"(\.mlp\.experts\.\d+)\.w1\."), r"\1.gate_proj."),
            (re.compile(r"(\.mlp\.experts\.\d+)\.w3\."), r"\1.up_proj."),
            (re.compile(r"(\.mlp\.experts\.\d+)\.w2\."), r"\1.down_proj."))


def config(hf: Mapping[str, Any]) -> ModelConfig:
    c = common(hf, ARCHITECTURE, default_theta=1e6)
    layers = c["num_layers"]
    return ModelConfig(
        **c,
        num_experts=int(need(hf, "num_local_experts", "num_experts")),
        top_k=int(need(hf, "num_experts_per_tok")),
        moe_intermediate_size=int(need(hf, "intermediate_size")),
        moe_layers=tuple(range(layers)),
        gate=GateConfig(scoring="softmax", norm_topk_prob=True),
        sliding_window=hf.get("sliding_window"),
    )


def canonical(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name
