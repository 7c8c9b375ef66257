"""Shared layers, as functions over a checkpoint's tensors (canonical Hugging Face names).

Each follows transformers' order of operations (where it casts, where it normalizes), so the
disaggregated pipeline matches transformers' forward in fp32 to ~1e-6, far inside 1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn.functional as F

from autoglm.models.config import GateConfig, ModelConfig
from autoglm.models.rope import Rotary, apply_rotary

Weights = Mapping[str, torch.Tensor]


class KVCache(Protocol):
    """Per-layer key/value store of a batch of sequences (the generation engine fills it).

    ``update`` stores the new entries of ``layer`` ([B, heads, S_new, D] each; MLA stores its
    compressed latent and rotary key) and returns everything the batch may attend to, with
    each entry's position ([B, T]; -1 marks an empty slot)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def linear(x: torch.Tensor, w: Weights, prefix: str) -> torch.Tensor:
    return F.linear(x, w[f"{prefix}.weight"], w.get(f"{prefix}.bias"))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
           down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def grouped_swiglu(x: torch.Tensor, counts: list[int], gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """Several experts' SwiGLUs as three batched matmuls: x [Σ counts, d] holds each expert's
    rows in turn; gate, up [k, i, d] and down [k, d, i] are the k experts' weights. Rows are
    padded to the largest group, the layout a GPU wants (one launch per projection, not one
    per expert)."""
    k, longest = len(counts), max(counts, default=0)
    if k == 0 or longest == 0:
        return x.new_zeros(x.shape)
    lengths = torch.tensor(counts, device=x.device)
    valid = torch.arange(longest, device=x.device) < lengths[:, None]  # [k, longest]
    padded = x.new_zeros(k, longest, x.shape[1])
    padded[valid] = x
    h = F.silu(padded @ gate.transpose(1, 2)) * (padded @ up.transpose(1, 2))
    return (h @ down.transpose(1, 2))[valid]


def mlp(x: torch.Tensor, w: Weights, prefix: str) -> torch.Tensor:
    """A SwiGLU MLP stored as ``<prefix>.{gate,up,down}_proj``: dense layers, shared experts."""
    return swiglu(x, w[f"{prefix}.gate_proj.weight"], w[f"{prefix}.up_proj.weight"],
                  w[f"{prefix}.down_proj.weight"])


def route(gate: GateConfig, top_k: int, h: torch.Tensor, weight: torch.Tensor,
          bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [T, d] → (expert ids [T, k], combine weights [T, k]) as the architecture's gate
    defines them."""
    if gate.scoring == "softmax":
        logits = F.linear(h, weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, idx = torch.topk(probs, top_k, dim=-1)
        if gate.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return idx, (top * gate.routed_scaling_factor).to(h.dtype)
    # Sigmoid scores; the correction bias steers which experts win, not their weights.
    scores = F.linear(h.to(torch.float32), weight.to(torch.float32)).sigmoid()
    choice = scores if bias is None else scores + bias.to(torch.float32)
    n = weight.shape[0]
    if gate.n_group > 1:
        groups = choice.view(-1, gate.n_group, n // gate.n_group)
        group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.topk(group_scores, k=gate.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, keep, 1).bool()
        mask = mask.unsqueeze(-1).expand(-1, gate.n_group, n // gate.n_group).reshape(-1, n)
        choice = choice.masked_fill(~mask, float("-inf"))
    idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    top = scores.gather(1, idx)
    if gate.norm_topk_prob:
        top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, top * gate.routed_scaling_factor


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
           k_pos: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """Causal attention by position: a query sees keys at or before it (within the sliding
    window, if any); q [B, H, S, D], k/v [B, Hk, T, D], positions [B, S] / [B, T]."""
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed &= qp - kp < window
    if k.shape[1] != q.shape[1]:
        # Grouped-query attention: each kv head serves a group of query heads. Fold the group
        # into the query rows rather than repeating k/v per head: the same products, without
        # copying the whole cache once per group member at every step.
        b, h, s, d = q.shape
        rep = h // k.shape[1]
        allowed = allowed.unsqueeze(2).expand(-1, -1, rep, -1, -1).reshape(b, 1, rep * s, -1)
        out = F.scaled_dot_product_attention(q.reshape(b, k.shape[1], rep * s, d), k, v,
                                             attn_mask=allowed, scale=scale)
        return out.reshape(b, h, s, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _positions_of(cache: KVCache | None, layer: int, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if cache is None:
        return k, v, positions
    return cache.update(layer, k, v, positions)


def gqa(cfg: ModelConfig, rotary: Rotary, w: Weights, p: str, layer: int, x: torch.Tensor,
        positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Grouped-query attention (Mixtral, Qwen, GLM): x [B, S, d] → [B, S, d]."""
    b, s, _ = x.shape
    shape = (b, s, -1, cfg.head_dim)
    q = linear(x, w, f"{p}.q_proj").view(shape)
    k = linear(x, w, f"{p}.k_proj").view(shape)
    v = linear(x, w, f"{p}.v_proj").view(shape)
    if cfg.qk_norm:  # per head, before the rotation
        q = rms_norm(q, w[f"{p}.q_norm.weight"], cfg.rms_norm_eps)
        k = rms_norm(k, w[f"{p}.k_norm.weight"], cfg.rms_norm_eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = (t.to(x.dtype).unsqueeze(1) for t in rotary.cos_sin(positions))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v, k_pos = _positions_of(cache, layer, k, v, positions)
    out = attend(q, k, v, positions, k_pos, cfg.head_dim ** -0.5, cfg.sliding_window)
    return linear(out.transpose(1, 2).reshape(b, s, -1), w, f"{p}.o_proj")


def mla_scale(cfg: ModelConfig) -> float:
    """Softmax scale of MLA: YaRN checkpoints multiply it by mscale² (``mscale_all_dim``)."""
    assert cfg.mla is not None
    scale: float = (cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim) ** -0.5
    rope = cfg.rope
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        factor = float(rope["factor"])
        m = 0.1 * float(rope["mscale_all_dim"]) * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale *= m * m
    return scale


def mla(cfg: ModelConfig, rotary: Rotary, w: Weights, p: str, layer: int, x: torch.Tensor,
        positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Multi-head latent attention (DeepSeek-V3); the cache holds the compressed latent."""
    m = cfg.mla
    assert m is not None
    b, s, _ = x.shape
    if m.q_lora_rank is None:
        q = linear(x, w, f"{p}.q_proj")
    else:
        qa = rms_norm(linear(x, w, f"{p}.q_a_proj"), w[f"{p}.q_a_layernorm.weight"],
                      cfg.rms_norm_eps)
        q = linear(qa, w, f"{p}.q_b_proj")
    q = q.view(b, s, -1, m.qk_nope_head_dim + m.qk_rope_head_dim).transpose(1, 2)
    q_pass, q_rot = torch.split(q, [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
    compressed = linear(x, w, f"{p}.kv_a_proj_with_mqa")
    latent, k_rot = torch.split(compressed, [m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
    latent = rms_norm(latent, w[f"{p}.kv_a_layernorm.weight"], cfg.rms_norm_eps)
    latent = latent.view(b, 1, s, m.kv_lora_rank)
    k_rot = k_rot.view(b, 1, s, m.qk_rope_head_dim)
    cos, sin = (t.to(x.dtype).unsqueeze(1) for t in rotary.cos_sin(positions))
    q_rot = apply_rotary(q_rot, cos, sin, interleave=m.rope_interleave)
    k_rot = apply_rotary(k_rot, cos, sin, interleave=m.rope_interleave)
    latent, k_rot, k_pos = _positions_of(cache, layer, latent, k_rot, positions)
    t = latent.shape[2]
    kv = linear(latent, w, f"{p}.kv_b_proj").view(b, t, -1, m.qk_nope_head_dim + m.v_head_dim)
    k_nope, v = torch.split(kv.transpose(1, 2), [m.qk_nope_head_dim, m.v_head_dim], dim=-1)
    k = torch.cat([k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
    out = attend(torch.cat([q_pass, q_rot], dim=-1), k, v, positions, k_pos, mla_scale(cfg),
                 None)
    return linear(out.transpose(1, 2).reshape(b, s, -1), w, f"{p}.o_proj")
