"""One normalized description of a sparse MoE decoder, whatever its architecture.

Each architecture module turns its checkpoint's ``config.json`` into a :class:`ModelConfig`;
the shared layers read only this. It is stored with every imported version (``model.json``)
so servers need no transformers and no original config to load a slice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from autoglm.models.errors import UnsupportedConfig


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool


@dataclass(frozen=True)
class GateConfig:
    """How a token picks its experts and what weight each gets."""

    scoring: Literal["softmax", "sigmoid"]
    norm_topk_prob: bool
    routed_scaling_factor: float = 1.0
    n_group: int = 1            # group-limited top-k: keep the best topk_group groups ...
    topk_group: int = 1         # ... ranked by the sum of each group's top-2 scores
    correction_bias: bool = False  # e_score_correction_bias: shifts the choice, not the weight


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: Mapping[str, Any]
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    moe_layers: tuple[int, ...]
    gate: GateConfig
    intermediate_size: int = 0           # dense MLP layers
    shared_intermediate_size: int = 0    # 0: no shared expert
    shared_expert_gate: bool = False     # Qwen2-MoE: sigmoid(gate(x)) * shared(x)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    mla: MLAConfig | None = None
    extra_layers: int = 0  # multi-token-prediction layers stored after the model's own: ignored
    eos_token_ids: tuple[int, ...] = field(default=())

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def slice_bytes(self, element_bytes: int = 4) -> int:
        """One routed expert's weights, every MoE layer (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size * len(self.moe_layers) \
            * element_bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        d["gate"] = GateConfig(**d["gate"])
        d["mla"] = MLAConfig(**d["mla"]) if d.get("mla") else None
        d["moe_layers"] = tuple(d["moe_layers"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def need(hf: Mapping[str, Any], key: str, *aliases: str) -> Any:
    """A required value; transformers writes some under another name (``attribute_map``)."""
    for k in (key, *aliases):
        if hf.get(k) is not None:
            return hf[k]
    raise UnsupportedConfig(f"config.json has no {key!r}")


def check_activation(hf: Mapping[str, Any]) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfig(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")


def eos_ids(hf: Mapping[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def head_dim(hf: Mapping[str, Any]) -> int:
    return int(hf.get("head_dim") or need(hf, "hidden_size") // need(hf, "num_attention_heads"))


def common(hf: Mapping[str, Any], architecture: str, default_theta: float = 10000.0,
           default_partial_rotary_factor: float | None = None) -> dict[str, Any]:
    """The fields every architecture reads the same way (defaults: transformers')."""
    from autoglm.models.rope import rope_parameters

    check_activation(hf)
    heads = int(need(hf, "num_attention_heads"))
    return {
        "architecture": architecture,
        "vocab_size": int(need(hf, "vocab_size")),
        "hidden_size": int(need(hf, "hidden_size")),
        "num_layers": int(need(hf, "num_hidden_layers")),
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": head_dim(hf),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(need(hf, "max_position_embeddings")),
        "rope": rope_parameters(hf, default_theta=default_theta,
                                default_partial_rotary_factor=default_partial_rotary_factor),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "eos_token_ids": eos_ids(hf),
    }
