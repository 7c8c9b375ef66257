"""Rotary position embeddings, numerically identical to transformers 5.

:func:`rope_parameters` turns a checkpoint's ``config.json`` into transformers' standardized
``rope_parameters`` dict; :class:`Rotary` computes the inverse frequencies and cos/sin from it;
:func:`apply_rotary` rotates queries/keys. Every formula keeps transformers' operation order
and dtypes (``transformers/modeling_rope_utils.py``) so fp32 outputs agree to float rounding:
a reordered product or a float64 intermediate would already show up as ~1e-7 drift, which
grows with position and compounds across layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from autoglm.models.errors import UnsupportedConfig

__all__ = ["SUPPORTED_ROPE_TYPES", "Rotary", "UnsupportedConfig", "apply_rotary",
           "rope_parameters"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")

# The types whose formula needs the pretraining context length (transformers fills it in).
_NEEDS_ORIGINAL_MAX = ("llama3", "yarn", "longrope")
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor"),
}


def rope_parameters(
    hf: Mapping[str, Any],
    *,
    default_theta: float = 10000.0,
    default_partial_rotary_factor: float | None = None,
) -> dict[str, Any]:
    """Standardize a checkpoint's config.json dict to transformers 5's ``rope_parameters`` form.

    Accepts ``rope_parameters`` (transformers 5) or legacy ``rope_scaling`` (``type`` is an
    alias of ``rope_type``) with top-level ``rope_theta``/``partial_rotary_factor``; values
    inside the dict win over top-level ones, and ``rope_scaling`` wins over ``rope_parameters``
    when both are set, as in transformers. ``default_theta`` and
    ``default_partial_rotary_factor`` are the architecture's defaults for a config that omits
    them (transformers' ``default_theta``; Glm4Moe's ``partial_rotary_factor=0.5``).
    For llama3/yarn/longrope, ``original_max_position_embeddings`` is taken from the top level
    when present there (it overrides the dict, as transformers does for Phi-3), else kept from
    the dict, else ``max_position_embeddings``.

    Raises UnsupportedConfig for a rope type other than :data:`SUPPORTED_ROPE_TYPES`, for
    per-layer-type (nested) parameters, and for missing required fields.
    """
    raw = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(raw, Mapping):
        raise UnsupportedConfig(f"rope parameters must be a JSON object, got {raw!r}")
    layer_types = set(hf.get("layer_types") or ())
    if any(isinstance(v, Mapping) or k in layer_types for k, v in raw.items()):
        raise UnsupportedConfig("per-layer-type rope parameters (nested rope_parameters) "
                                "are not supported")
    params = dict(raw)
    rope_type = params.pop("type", None)
    rope_type = params.setdefault("rope_type", rope_type or "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfig(f"rope_type {rope_type!r} is not supported "
                                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    theta = hf.get("rope_theta")
    params.setdefault("rope_theta", default_theta if theta is None else theta)
    partial = hf.get("partial_rotary_factor", default_partial_rotary_factor)
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    if rope_type in _NEEDS_ORIGINAL_MAX:
        if hf.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        elif params.get("original_max_position_embeddings") is None:
            if hf.get("max_position_embeddings") is None:
                raise UnsupportedConfig(f"rope_type {rope_type!r} needs "
                                        "original_max_position_embeddings or "
                                        "max_position_embeddings")
            params["original_max_position_embeddings"] = hf["max_position_embeddings"]
    missing = [k for k in _REQUIRED_KEYS.get(rope_type, ()) if params.get(k) is None]
    if missing:
        raise UnsupportedConfig(f"rope_type {rope_type!r} is missing {', '.join(missing)}")
    return params


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _exponents(dim: int, device: torch.device | None = None) -> torch.Tensor:
    """arange(0, dim, 2) / dim in float32, the exponent every rope type raises theta to.

    Divided on ``device``, as transformers does: CUDA divides by a scalar via its reciprocal,
    which can differ from the CPU's division in the last bit.
    """
    return torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** _exponents(dim))


def _yarn(params: Mapping[str, Any], base: float, dim: int,
          max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    original_max = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:  # DeepSeek-style configs may give only the two lengths
        factor = max_position_embeddings / original_max
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_get_mscale(factor, mscale)
                                     / _get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    truncate = params.get("truncate", True)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low: float = correction_dim(beta_fast)
    high: float = correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** _exponents(dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = (inv_freq_interpolation * (1 - extrapolation_factor)
                + inv_freq_extrapolation * extrapolation_factor)
    return inv_freq, float(attention_factor)


def _llama3(params: Mapping[str, Any], base: float, dim: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(base, dim)
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by factor, short ones kept, the band between interpolated
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


class Rotary:
    """inv_freq and attention scaling for one model.

    ``head_dim`` is the dim the rotation is computed over before ``partial_rotary_factor``:
    the rotary dim is ``int(head_dim * partial_rotary_factor)`` (DeepSeek MLA passes
    ``qk_rope_head_dim``). ``max_position_embeddings`` is the config's; 'dynamic' starts
    rescaling past it.
    """

    rotary_dim: int
    attention_scaling: float
    inv_freq: torch.Tensor  # float32 [rotary_dim // 2], on the CPU

    def __init__(self, params: Mapping[str, Any], head_dim: int,
                 max_position_embeddings: int) -> None:
        self.rope_type: str = params.get("rope_type", "default")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedConfig(f"rope_type {self.rope_type!r} is not supported")
        self.params = dict(params)
        self.base: float = params["rope_theta"]
        self.max_position_embeddings = max_position_embeddings
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        if dim <= 0 or dim % 2:
            # transformers would round an odd dim up to the next pair; no checkpoint we serve
            # does that, and yarn's ramp breaks on it, so refuse rather than guess.
            raise UnsupportedConfig(f"rotary dim {dim} (head_dim {head_dim} x "
                                    f"partial_rotary_factor) must be positive and even")
        self.rotary_dim = dim
        self.attention_scaling = 1.0
        self._long_inv_freq: torch.Tensor | None = None
        if self.rope_type == "default":
            self.inv_freq = _default_inv_freq(self.base, dim)
        elif self.rope_type == "linear":
            self.inv_freq = _default_inv_freq(self.base, dim)
            # scaling positions by 1/factor is the same as scaling the frequencies
            self.inv_freq /= params["factor"]
        elif self.rope_type == "dynamic":
            # transformers' init call: seq_len = max_position_embeddings, in Python floats
            factor = params["factor"]
            seq_len = max_position_embeddings
            base = self.base * ((factor * seq_len / max_position_embeddings)
                                - (factor - 1)) ** (dim / (dim - 2))
            self.inv_freq = _default_inv_freq(base, dim)
        elif self.rope_type == "yarn":
            self.inv_freq, self.attention_scaling = _yarn(params, self.base, dim,
                                                          max_position_embeddings)
        elif self.rope_type == "llama3":
            self.inv_freq = _llama3(params, self.base, dim)
        else:  # longrope
            self.inv_freq, self._long_inv_freq = self._longrope()

    def _longrope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(short, long) inv_freq; sets attention_scaling."""
        params, dim = self.params, self.rotary_dim
        original_max = params["original_max_position_embeddings"]
        factor = params.get("factor")
        if factor is None:  # Phi-3: the ratio of the two lengths
            factor = self.max_position_embeddings / original_max
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = (1.0 if factor <= 1.0 else
                                math.sqrt(1 + math.log(factor) / math.log(original_max)))
        self.attention_scaling = float(attention_factor)
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        short, long = (torch.tensor(params[k], dtype=torch.float32)
                       for k in ("short_factor", "long_factor"))
        return 1.0 / (short * self.base**shape), 1.0 / (long * self.base**shape)

    def _dynamic_inv_freq(self, seq_len: torch.Tensor) -> torch.Tensor:
        """inv_freq for a batch whose longest sequence is seq_len (an int64 scalar tensor).

        The same tensor arithmetic as transformers' recompute (float32 on the positions'
        device, not Python floats), selected with torch.where rather than a Python branch so
        it needs no host sync. Unlike transformers' module it keeps no state: transformers
        keeps the grown inv_freq for any later length in (max_position_embeddings, longest
        seen], which would make one request's cos/sin depend on earlier batches.
        """
        device, dim, mpe = seq_len.device, self.rotary_dim, self.max_position_embeddings
        factor = self.params["factor"]
        grown = torch.maximum(seq_len, torch.tensor(mpe, dtype=seq_len.dtype, device=device))
        base = self.base * ((factor * grown / mpe) - (factor - 1)) ** (dim / (dim - 2))
        scaled = 1.0 / (base ** _exponents(dim, device))
        return torch.where(seq_len > mpe, scaled, self.inv_freq.to(device))

    def inv_freq_for(self, positions: torch.Tensor) -> torch.Tensor:
        """The float32 inv_freq used for this batch of positions, on their device."""
        device = positions.device
        if self.rope_type == "dynamic" and positions.numel():
            return self._dynamic_inv_freq(torch.max(positions) + 1)
        if self.rope_type == "longrope" and positions.numel():
            assert self._long_inv_freq is not None
            seq_len = torch.max(positions) + 1
            original_max = self.params["original_max_position_embeddings"]
            return torch.where(seq_len > original_max, self._long_inv_freq.to(device),
                               self.inv_freq.to(device))
        return self.inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [*positions.shape, rotary_dim], float32, times attention_scaling.

        positions: int64 of any shape. Laid out as transformers does (emb = cat(freqs, freqs)),
        so :func:`apply_rotary` pairs dim i with dim i + rotary_dim // 2. For 'dynamic' and
        'longrope' the frequencies depend on max(positions) + 1, as in transformers' forward.
        """
        freqs = positions[..., None].float() * self.inv_freq_for(positions)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                 interleave: bool = False) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of x; the rest pass through (partial rotary).

    x is e.g. [..., heads, seq, D] with cos/sin [..., 1, seq, R] (the caller unsqueezes the
    head dim): anything that broadcasts. cos/sin are cast to x's dtype first, as
    transformers' rotary module returns them, so bf16 in gives bf16 out with the same
    rounding. ``interleave`` is DeepSeek-V3's rope_interleave: the rotated dims come as pairs
    (x0, x1), (x2, x3), … and leave as [even-rotated, odd-rotated].
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleave:
        # cos/sin are cat(freqs, freqs): the first half holds each pair's angle
        cos, sin = cos[..., : rotary_dim // 2], sin[..., : rotary_dim // 2]
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        rotated = (x_rot * cos) + (_rotate_half(x_rot) * sin)
    if x_pass.shape[-1] == 0:
        return rotated
    return torch.cat([rotated, x_pass], dim=-1)
