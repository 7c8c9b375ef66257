"""Rotary embeddings against transformers 5: parameters, inv_freq, cos/sin and the rotation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
from transformers.models.glm4_moe import modeling_glm4_moe as glm
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen

from autoglm.models.rope import Rotary, UnsupportedConfig, apply_rotary, rope_parameters

SMALL = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 1, "vocab_size": 32}
DEEPSEEK_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def qwen3(**hf: Any) -> dict[str, Any]:
    return {"architectures": ["Qwen3MoeForCausalLM"], **SMALL, "head_dim": 32, **hf}


def glm4(**hf: Any) -> dict[str, Any]:
    return {"architectures": ["Glm4MoeForCausalLM"], **SMALL, "head_dim": 32, **hf}


def deepseek(**hf: Any) -> dict[str, Any]:
    return {"architectures": ["DeepseekV3ForCausalLM"], **SMALL, "qk_rope_head_dim": 32,
            "qk_nope_head_dim": 16, "v_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 16,
            **hf}


# name -> (config.json dict, positions' max + 1): each rope type, both sides of a boundary
CASES: dict[str, tuple[dict[str, Any], int]] = {
    "default": (qwen3(rope_theta=1e6, max_position_embeddings=256), 256),
    "default-no-theta": (qwen3(max_position_embeddings=256), 256),
    "linear-legacy": (qwen3(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0},
                            max_position_embeddings=256), 256),
    "linear-int-factor": (qwen3(rope_parameters={"rope_type": "linear", "factor": 3,
                                                 "rope_theta": 10000.0},
                                max_position_embeddings=256), 256),
    "dynamic-within": (qwen3(rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                              "rope_theta": 1e6},
                             max_position_embeddings=128), 100),
    "dynamic-at-limit": (qwen3(rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                                "rope_theta": 1e6},
                               max_position_embeddings=128), 128),
    "dynamic-beyond": (qwen3(rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                              "rope_theta": 1e6},
                             max_position_embeddings=128), 777),
    "dynamic-beyond-int-factor": (qwen3(rope_scaling={"type": "dynamic", "factor": 2},
                                        rope_theta=10000, max_position_embeddings=64), 300),
    "yarn-qwen": (qwen3(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 64,
                                         "rope_theta": 1e6},
                        max_position_embeddings=256), 256),
    "yarn-implicit-original": (qwen3(rope_scaling={"rope_type": "yarn", "factor": 4.0},
                                     rope_theta=1e6, max_position_embeddings=64), 200),
    "yarn-no-truncate": (qwen3(rope_parameters={"rope_type": "yarn", "factor": 8.0,
                                                "original_max_position_embeddings": 64,
                                                "truncate": False, "beta_fast": 16,
                                                "rope_theta": 1e4},
                               max_position_embeddings=512), 512),
    "yarn-deepseek-mscale": (deepseek(rope_scaling=DEEPSEEK_YARN, rope_theta=10000,
                                      max_position_embeddings=163840), 5000),
    "yarn-deepseek-mscale-ratio": (deepseek(rope_scaling={**DEEPSEEK_YARN, "mscale": 0.707},
                                            rope_theta=10000,
                                            max_position_embeddings=163840), 5000),
    "yarn-deepseek-no-mscale": (deepseek(rope_scaling={k: v for k, v in DEEPSEEK_YARN.items()
                                                       if not k.startswith("mscale")},
                                         rope_theta=10000, max_position_embeddings=163840),
                                5000),
    "yarn-attention-factor": (qwen3(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                     "attention_factor": 0.8,
                                                     "original_max_position_embeddings": 64,
                                                     "rope_theta": 1e6},
                                    max_position_embeddings=256), 256),
    "llama3": (qwen3(rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64,
                                      "rope_theta": 5e5},
                     max_position_embeddings=512), 512),
    # transformers' rope init re-standardizes once the top-level key is an attribute: it wins
    "llama3-top-level-original": (qwen3(rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                         "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 64,
                                                         "rope_theta": 5e5},
                                        original_max_position_embeddings=32,
                                        max_position_embeddings=512), 512),
    "longrope-short": (qwen3(rope_parameters={"rope_type": "longrope", "factor": 4.0,
                                              "short_factor": [1.0 + i / 16 for i in range(16)],
                                              "long_factor": [1.0 + i for i in range(16)],
                                              "original_max_position_embeddings": 64,
                                              "rope_theta": 1e4},
                             max_position_embeddings=256), 64),
    "longrope-long": (qwen3(rope_parameters={"rope_type": "longrope",
                                             "short_factor": [1.0 + i / 16 for i in range(16)],
                                             "long_factor": [1.0 + i for i in range(16)],
                                             "rope_theta": 1e4},
                            original_max_position_embeddings=64,
                            max_position_embeddings=256), 65),
    # partial_rotary_factor 0.5: Glm4Moe's default when config.json omits it, and explicit
    "partial-glm-default": (glm4(rope_theta=1e6, max_position_embeddings=256), 256),
    "partial-glm-explicit": (glm4(rope_theta=1e6, partial_rotary_factor=0.5,
                                  max_position_embeddings=256), 256),
    "partial-glm-yarn": (glm4(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 64,
                                               "rope_theta": 1e6,
                                               "partial_rotary_factor": 0.5},
                              max_position_embeddings=256), 256),
    "partial-glm-dynamic-beyond": (glm4(rope_scaling={"type": "dynamic", "factor": 2.0},
                                        rope_theta=1e4, partial_rotary_factor=0.5,
                                        max_position_embeddings=64), 1000),
}


def hf_side(hf: dict[str, Any]) -> tuple[transformers.PreTrainedConfig, nn.Module, int]:
    """transformers' config and rotary module for a config.json dict, and our head_dim."""
    arch = hf["architectures"][0]
    kwargs = {k: v for k, v in hf.items() if k != "architectures"}
    if arch.startswith("Qwen3"):
        qcfg = transformers.Qwen3MoeConfig(**kwargs)
        return qcfg, qwen.Qwen3MoeRotaryEmbedding(qcfg), qcfg.head_dim
    if arch.startswith("Glm4"):
        gcfg = transformers.Glm4MoeConfig(**kwargs)
        return gcfg, glm.Glm4MoeRotaryEmbedding(gcfg), gcfg.head_dim
    dcfg = transformers.DeepseekV3Config(**kwargs)
    return dcfg, ds.DeepseekV3RotaryEmbedding(dcfg), dcfg.qk_rope_head_dim


def our_params(hf: dict[str, Any]) -> dict[str, Any]:
    if "Glm4" in hf["architectures"][0]:  # Glm4MoeConfig's default for a config.json without it
        return rope_parameters(hf, default_partial_rotary_factor=0.5)
    return rope_parameters(hf)


def ours(hf: dict[str, Any]) -> Rotary:
    head_dim = hf.get("qk_rope_head_dim") or hf["head_dim"]
    return Rotary(our_params(hf), head_dim, hf["max_position_embeddings"])


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def positions(seq_len: int) -> torch.Tensor:
    """A [2, 9] batch whose longest position is seq_len - 1, with a repeated and a 0 position."""
    first = torch.linspace(0, seq_len - 1, 9).round().long()
    second = torch.tensor([0, 3, 3, 7, 11, 12, 13, 14, 15]).clamp(max=seq_len - 1)
    return torch.stack([first, second])


@pytest.mark.parametrize("name", list(CASES))
def test_cos_sin_match_transformers(name: str) -> None:
    hf, seq_len = CASES[name]
    config, module, _ = hf_side(hf)
    rotary = ours(hf)

    # (after building the module: its rope init re-standardizes config.rope_parameters)
    assert our_params(hf) == {k: v for k, v in config.rope_parameters.items() if k != "type"}

    close(rotary.inv_freq, module.get_buffer("original_inv_freq"))
    pos = positions(seq_len)
    x = torch.zeros(1, dtype=torch.float32)
    cos_ref, sin_ref = module(x, pos)
    cos, sin = rotary.cos_sin(pos)
    assert rotary.rotary_dim == cos_ref.shape[-1] == module.get_buffer("inv_freq").shape[0] * 2
    assert rotary.attention_scaling == pytest.approx(module.attention_scaling, abs=1e-12)
    # after the forward, which re-picks dynamic/longrope frequencies for these positions
    close(rotary.inv_freq_for(pos), module.get_buffer("inv_freq"))
    close(cos, cos_ref)
    close(sin, sin_ref)


def test_dynamic_rescales_only_past_the_limit() -> None:
    hf, _ = CASES["dynamic-beyond"]
    rotary = ours(hf)
    base = Rotary({"rope_type": "default", "rope_theta": 1e6}, 32, 128)
    assert torch.equal(rotary.inv_freq_for(positions(128)), base.inv_freq)
    grown = rotary.inv_freq_for(positions(129))
    assert (grown[1:] < base.inv_freq[1:]).all()  # a larger base: lower frequencies
    # stateless: a shorter batch after a longer one is back on the original frequencies
    assert torch.equal(rotary.inv_freq_for(positions(100)), base.inv_freq)


def test_yarn_deepseek_attention_scaling() -> None:
    """mscale == mscale_all_dim cancels in cos/sin (DeepSeek applies it to the softmax scale)."""
    assert ours(CASES["yarn-deepseek-mscale"][0]).attention_scaling == 1.0
    assert ours(CASES["yarn-deepseek-no-mscale"][0]).attention_scaling == pytest.approx(
        0.1 * torch.log(torch.tensor(40.0)).item() + 1.0)


ApplyRef = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@pytest.mark.parametrize(("name", "interleave", "reference"), [
    ("default", False, qwen.apply_rotary_pos_emb),
    ("partial-glm-default", False, glm.apply_rotary_pos_emb),
    ("partial-glm-yarn", False, glm.apply_rotary_pos_emb),
    ("yarn-deepseek-mscale", False, ds.apply_rotary_pos_emb),
    ("yarn-deepseek-mscale", True, ds.apply_rotary_pos_emb_interleave),
    ("yarn-deepseek-no-mscale", True, ds.apply_rotary_pos_emb_interleave),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_matches_transformers(name: str, interleave: bool, reference: ApplyRef,
                                           dtype: torch.dtype) -> None:
    hf, seq_len = CASES[name]
    _, module, head_dim = hf_side(hf)
    pos = positions(seq_len)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, pos.shape[1], head_dim, generator=gen).to(dtype)
    k = torch.randn(2, 1, pos.shape[1], head_dim, generator=gen).to(dtype)
    cos_ref, sin_ref = module(q, pos)  # cast to q's dtype, as the model does
    q_ref, k_ref = reference(q, k, cos_ref, sin_ref)

    cos, sin = ours(hf).cos_sin(pos)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_out = apply_rotary(q, cos, sin, interleave=interleave)
    k_out = apply_rotary(k, cos, sin, interleave=interleave)
    if dtype == torch.float32:
        close(q_out, q_ref)
        close(k_out, k_ref)
    else:  # the same bf16 inputs and formula: identical roundings
        assert q_out.dtype == dtype and torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


def test_apply_rotary_leaves_the_pass_dims() -> None:
    x = torch.randn(1, 2, 3, 8)
    cos, sin = Rotary({"rope_type": "default", "rope_theta": 1e4,
                       "partial_rotary_factor": 0.5}, 8, 16).cos_sin(torch.arange(3)[None])
    out = apply_rotary(x, cos[:, None], sin[:, None])
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert torch.equal(out[..., 0, :], x[..., 0, :])  # position 0: no rotation


def test_rope_parameters_legacy() -> None:
    hf = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2},
          "max_position_embeddings": 4096}
    assert rope_parameters(hf) == {"rope_type": "linear", "factor": 2, "rope_theta": 500000.0}
    assert rope_parameters({}) == {"rope_type": "default", "rope_theta": 10000.0}
    assert rope_parameters({"rope_scaling": None}, default_theta=1e6) == {
        "rope_type": "default", "rope_theta": 1e6}
    # the dict's own theta wins over the top level; top-level partial factor is folded in
    assert rope_parameters({"rope_theta": 1.0, "partial_rotary_factor": 0.25,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 2.0}}
                           ) == {"rope_type": "default", "rope_theta": 2.0,
                                 "partial_rotary_factor": 0.25}
    yarn = rope_parameters({"rope_theta": 10000, "max_position_embeddings": 163840,
                            "rope_scaling": DEEPSEEK_YARN})
    assert yarn["rope_type"] == "yarn" and "type" not in yarn
    assert yarn["original_max_position_embeddings"] == 4096
    assert rope_parameters({"max_position_embeddings": 2048, "rope_scaling": {
        "rope_type": "yarn", "factor": 2.0}})["original_max_position_embeddings"] == 2048
    assert rope_parameters({"max_position_embeddings": 2048,
                            "original_max_position_embeddings": 512,
                            "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 1024}}
                           )["original_max_position_embeddings"] == 512


@pytest.mark.parametrize("rope", [{"rope_type": "su", "factor": 2.0}, {"type": "mrope"},
                                  {"rope_type": "proportional"}])
def test_unknown_rope_type_is_refused_by_name(rope: dict[str, Any]) -> None:
    name = rope.get("rope_type", rope.get("type"))
    with pytest.raises(UnsupportedConfig, match=f"rope_type '{name}'"):
        rope_parameters({"rope_scaling": rope})
    with pytest.raises(UnsupportedConfig, match=f"rope_type '{name}'"):
        Rotary({"rope_theta": 1e4, **rope, "rope_type": name}, 8, 16)


def test_unsupported_shapes_are_refused() -> None:
    nested = {"layer_types": ["full_attention", "sliding_attention"], "rope_parameters": {
        "full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "linear",
                                                                         "factor": 2.0}}}
    with pytest.raises(UnsupportedConfig, match="per-layer"):
        rope_parameters(nested)
    with pytest.raises(UnsupportedConfig, match="missing factor"):
        rope_parameters({"rope_scaling": {"type": "linear"}})
    with pytest.raises(UnsupportedConfig, match="even"):
        Rotary({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, 6, 16)
