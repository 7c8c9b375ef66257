"""A Hugging Face checkpoint directory, read tensor by tensor, and what it must contain.

The architecture module maps ``config.json`` to a :class:`ModelConfig` and the Hub's tensor
names to canonical ones; :func:`expected` lists every canonical tensor with its shape, so a
missing, unexpected or misshapen tensor is refused before anything is written. Routed experts
come either one tensor per expert (the Hub layout) or fused per layer as transformers holds
them (``mlp.experts.gate_up_proj`` [E, 2I, d], ``mlp.experts.down_proj`` [E, d, I]); a fused
tensor is read one expert's slice at a time, so memory follows the slice being written.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import safe_open

from autoglm.models import deepseek_v3, glm4_moe, mixtral, qwen2_moe, qwen3_moe
from autoglm.models.config import ModelConfig
from autoglm.models.decoder import layer_prefix
from autoglm.models.errors import CheckpointError, UnsupportedConfig

ARCHITECTURES: dict[str, ModuleType] = {
    m.ARCHITECTURE: m for m in (mixtral, qwen2_moe, qwen3_moe, glm4_moe, deepseek_v3)}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FUSED = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\."
                    r"(gate_up_proj|down_proj)$")
_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
# Buffers some exporters save that carry no weights.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_hf_config(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (expected a Hugging Face checkpoint "
                              "folder)" if src.exists() else f"{src}: no such directory")
    path = src / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{src}: no config.json (not a Hugging Face checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable: {e}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return hf


def module_for(hf: Mapping[str, Any]) -> ModuleType:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    raise UnsupportedConfig(
        f"architectures {archs} is not supported; supported: {', '.join(ARCHITECTURES)}")


def model_config(hf: Mapping[str, Any]) -> ModelConfig:
    cfg: ModelConfig = module_for(hf).config(hf)
    if cfg.gate.n_group > 1 and cfg.num_experts % cfg.gate.n_group:
        raise UnsupportedConfig(f"n_group {cfg.gate.n_group} does not divide "
                                f"{cfg.num_experts} routed experts")
    if cfg.top_k > cfg.num_experts:
        raise UnsupportedConfig(f"num_experts_per_tok {cfg.top_k} exceeds "
                                f"{cfg.num_experts} experts")
    return cfg


def owner(name: str) -> int | None:
    """The expert whose slice holds a canonical tensor, or None for the router."""
    m = _EXPERT.match(name)
    return int(m.group(1)) if m else None


def expected(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of the model and its shape."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d),
                                       "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)

    def proj(name: str, rows: int, cols: int, bias: bool = False) -> None:
        out[f"{name}.weight"] = (rows, cols)
        if bias:
            out[f"{name}.bias"] = (rows,)

    def swiglu(prefix: str, inner: int) -> None:
        proj(f"{prefix}.gate_proj", inner, d)
        proj(f"{prefix}.up_proj", inner, d)
        proj(f"{prefix}.down_proj", d, inner)

    h = cfg.num_heads
    for layer in range(cfg.num_layers):
        p = layer_prefix(layer)
        out[f"{p}.input_layernorm.weight"] = (d,)
        out[f"{p}.post_attention_layernorm.weight"] = (d,)
        a = f"{p}.self_attn"
        if (m := cfg.mla) is not None:
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            if m.q_lora_rank is None:
                proj(f"{a}.q_proj", h * qk, d)
            else:
                proj(f"{a}.q_a_proj", m.q_lora_rank, d, cfg.qkv_bias)
                out[f"{a}.q_a_layernorm.weight"] = (m.q_lora_rank,)
                proj(f"{a}.q_b_proj", h * qk, m.q_lora_rank)
            proj(f"{a}.kv_a_proj_with_mqa", m.kv_lora_rank + m.qk_rope_head_dim, d, cfg.qkv_bias)
            out[f"{a}.kv_a_layernorm.weight"] = (m.kv_lora_rank,)
            proj(f"{a}.kv_b_proj", h * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
            proj(f"{a}.o_proj", d, h * m.v_head_dim, cfg.o_bias)
        else:
            hd, kv = cfg.head_dim, cfg.num_kv_heads
            proj(f"{a}.q_proj", h * hd, d, cfg.qkv_bias)
            proj(f"{a}.k_proj", kv * hd, d, cfg.qkv_bias)
            proj(f"{a}.v_proj", kv * hd, d, cfg.qkv_bias)
            proj(f"{a}.o_proj", d, h * hd, cfg.o_bias)
            if cfg.qk_norm:
                out[f"{a}.q_norm.weight"] = (hd,)
                out[f"{a}.k_norm.weight"] = (hd,)
        if not cfg.is_moe(layer):
            swiglu(f"{p}.mlp", cfg.intermediate_size)
            continue
        proj(f"{p}.mlp.gate", cfg.num_experts, d)
        if cfg.gate.correction_bias:
            out[f"{p}.mlp.gate.e_score_correction_bias"] = (cfg.num_experts,)
        for e in range(cfg.num_experts):
            swiglu(f"{p}.mlp.experts.{e}", cfg.moe_intermediate_size)
        if cfg.shared_intermediate_size:
            if cfg.shared_expert_gate:
                swiglu(f"{p}.mlp.shared_expert", cfg.shared_intermediate_size)
                proj(f"{p}.mlp.shared_expert_gate", 1, d)
            else:
                swiglu(f"{p}.mlp.shared_experts", cfg.shared_intermediate_size)
    return out


@dataclass(frozen=True)
class _Where:
    file: Path
    name: str                       # the name in the file
    expert: int | None = None       # a fused tensor: this expert's slice ...
    half: int | None = None         # ... and, of gate_up_proj, gate (0) or up (1)


class Checkpoint:
    """The tensors of a checkpoint directory under canonical names, read one at a time."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.hf = read_hf_config(src)
        self.module = module_for(self.hf)
        self.config = model_config(self.hf)
        self._where: dict[str, _Where] = {}
        # from the headers, by the name in the file: checked and sized without reopening
        self._itemsize: dict[str, int] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._index()

    def _files(self) -> list[Path]:
        index = self.src / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable: {e}") from None
            files = sorted({self.src / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{index} names {f.name}, which is missing")
            return files
        single = self.src / "model.safetensors"
        if single.exists():
            return [single]
        raise CheckpointError(f"{self.src}: no model.safetensors or "
                              "model.safetensors.index.json")

    def _open(self, f: Path) -> Any:
        try:
            return safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own error type for damaged files
            size = f.stat().st_size if f.exists() else 0
            raise CheckpointError(f"{f}: not a readable safetensors file ({size} bytes): "
                                  f"{e}") from None

    def _index(self) -> None:
        cfg = self.config
        for f in self._files():
            with self._open(f) as st:
                for raw in st.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    if _IGNORED.search(raw):
                        continue
                    m = _LAYER.match(raw)
                    if m and int(m.group(1)) >= cfg.num_layers and \
                            int(m.group(1)) < cfg.num_layers + cfg.extra_layers:
                        continue  # multi-token-prediction layers: not served
                    header = st.get_slice(raw)
                    self._itemsize[raw] = _ITEMSIZE.get(header.get_dtype(), 4)
                    self._shape[raw] = tuple(header.get_shape())
                    if fused := _FUSED.match(raw):
                        self._index_fused(f, raw, fused.group(1), fused.group(2),
                                          self._shape[raw])
                        continue
                    self._add(self.module.canonical(raw), _Where(f, raw))

    def _index_fused(self, f: Path, raw: str, prefix: str, kind: str,
                     shape: tuple[int, ...]) -> None:
        cfg = self.config
        want = (cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size) \
            if kind == "gate_up_proj" else \
            (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if shape != want:
            raise CheckpointError(f"{raw}: shape {list(shape)} does not fit the config "
                                  f"(expected {list(want)})")
        for e in range(cfg.num_experts):
            if kind == "gate_up_proj":
                self._add(f"{prefix}.mlp.experts.{e}.gate_proj.weight", _Where(f, raw, e, 0))
                self._add(f"{prefix}.mlp.experts.{e}.up_proj.weight", _Where(f, raw, e, 1))
            else:
                self._add(f"{prefix}.mlp.experts.{e}.down_proj.weight", _Where(f, raw, e))

    def _add(self, name: str, where: _Where) -> None:
        if name in self._where:
            raise CheckpointError(f"tensor {name} appears twice ({self._where[name].file.name}"
                                  f", {where.file.name})")
        self._where[name] = where

    def validate(self) -> None:
        """Every expected tensor present with its shape, nothing else (headers only)."""
        want = expected(self.config)
        if self.config.tie_word_embeddings:
            self._where.pop("lm_head.weight", None)  # some exporters keep the tied copy
        missing = sorted(set(want) - set(self._where))
        unexpected = sorted(set(self._where) - set(want))
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(f"missing tensor {', '.join(missing[:3])}{more}")
        if unexpected:
            more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
            raise CheckpointError(f"unexpected tensor {', '.join(unexpected[:3])}{more} "
                                  f"(not part of a {self.config.architecture} with this "
                                  "config)")
        for name, where in self._where.items():
            if where.expert is not None:
                continue  # the fused tensor's shape was checked whole
            shape = self._shape[where.name]
            if shape != want[name]:
                raise CheckpointError(f"{where.name}: shape {list(shape)} does not fit the "
                                      f"config (expected {list(want[name])})")

    def nbytes(self) -> int:
        """What the model's tensors weigh, from the headers (for the progress bar)."""
        want = expected(self.config)
        return sum(math.prod(want[n]) * self._itemsize[w.name]
                   for n, w in self._where.items() if n in want)

    def names(self, expert: int | None) -> list[str]:
        """The canonical tensors of the router (None) or of one expert's slice."""
        return sorted(n for n in self._where if owner(n) == expert)

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors, one at a time, in the checkpoint's dtype (each file opened once)."""
        with contextlib.ExitStack() as stack:
            files: dict[Path, Any] = {}
            for name in names:
                w = self._where[name]
                if w.file not in files:
                    files[w.file] = stack.enter_context(self._open(w.file))
                st = files[w.file]
                try:
                    if w.expert is None:
                        t = st.get_tensor(w.name)
                    else:
                        t = st.get_slice(w.name)[w.expert]
                        if w.half is not None:
                            i = self.config.moe_intermediate_size
                            t = t[w.half * i:(w.half + 1) * i]
                except Exception as e:
                    raise CheckpointError(f"{w.file}: reading {w.name} failed: {e}") from None
                yield name, t.contiguous()
