"""Our model code against transformers, architecture by architecture, and the import that
splits a Hugging Face checkpoint into a router and per-expert slices (no servers)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from autoglm.models.decoder import forward
from autoglm.repository import import_checkpoint, load_canary, load_reference
from autoglm.testing.checkpoints import (
    ARCHITECTURES,
    reference_model,
    reference_routing,
    write_checkpoint,
)

SHAPES = ((1, 1), (2, 13), (3, 7), (1, 40))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_imported_model_equals_transformers(arch: str, tmp_path: Path) -> None:
    tied = arch == "Qwen2MoeForCausalLM"  # one architecture with tied embeddings
    src = write_checkpoint(arch, tmp_path / "ckpt", seed=3, tied=tied)
    built = import_checkpoint(src, tmp_path / "repo", 1, "m", progress=False)
    ours, theirs = load_reference(built.repository, 1), reference_model(src)
    gen = torch.Generator().manual_seed(0)
    for b, s in SHAPES:
        ids = torch.randint(0, built.config.vocab_size, (b, s), generator=gen)
        with torch.no_grad():
            want = theirs(ids).logits
        logits, routed = forward(ours.router, ids, ours.local_fanout)
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
        assert routed == reference_routing(theirs, ids), "same tokens to the same experts"
    canary, expected = load_canary(built.repository, 1)
    with torch.no_grad():
        np.testing.assert_allclose(theirs(torch.from_numpy(canary)).logits.numpy(), expected,
                                   rtol=1e-4, atol=1e-4)


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "DeepseekV3ForCausalLM"])
def test_sharded_and_fused_checkpoints_import_to_the_same_bytes(arch: str,
                                                               tmp_path: Path) -> None:
    repos = {}
    for variant, kw in (("plain", {}), ("sharded", {"shards": 3}), ("fused", {"fused": True})):
        src = write_checkpoint(arch, tmp_path / variant, seed=5, **kw)
        repos[variant] = tree(import_checkpoint(src, tmp_path / f"repo-{variant}", 2, "m",
                                                progress=False).repository)
    assert repos["sharded"] == repos["plain"]
    assert repos["fused"] == repos["plain"]
    slices = [f for f in repos["plain"] if f.endswith("weights.safetensors")]
    assert len(slices) == 1 + 8, "router and one slice per expert"


def test_each_part_holds_only_its_own_tensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    src = write_checkpoint("Glm4MoeForCausalLM", tmp_path / "ckpt")
    repo = import_checkpoint(src, tmp_path / "repo", 1, "m", progress=False).repository
    with safe_open(str(repo / "expert_5" / "1" / "weights.safetensors"), "pt") as st:
        names = set(st.keys())
    # layer 0 is dense: expert 5 exists in layers 1..3 only
    assert names == {f"model.layers.{layer}.mlp.experts.5.{m}.weight"
                     for layer in (1, 2, 3) for m in ("gate_proj", "up_proj", "down_proj")}
    with safe_open(str(repo / "router" / "1" / "weights.safetensors"), "pt") as st:
        router = set(st.keys())
    assert not any(".mlp.experts." in n for n in router)
    assert {"model.layers.1.mlp.shared_experts.gate_proj.weight",
            "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.0.mlp.up_proj.weight",
            "model.embed_tokens.weight", "lm_head.weight"} <= router
    assert (repo / "router" / "1" / "hf" / "tokenizer.json").exists()


def test_every_file_of_an_imported_version_is_readable_by_the_pods(tmp_path: Path) -> None:
    """Triton pods run as user 1000 and read a repository a volume holds (safetensors alone
    would write weights 0600)."""
    src = write_checkpoint("Qwen3MoeForCausalLM", tmp_path / "ckpt", seed=1)
    repo = import_checkpoint(src, tmp_path / "repo", 1, "m", progress=False).repository
    unreadable = [str(p) for p in repo.rglob("*") if not p.stat().st_mode & 0o004]
    assert not unreadable
