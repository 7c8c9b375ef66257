"""The tiny test checkpoints and tokenizer: files, tensor layouts, and transformers loading them."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from autoglm.models.vocab import EOS_ID, PRINTABLE, write_tokenizer
from autoglm.testing.checkpoints import (
    ARCHITECTURES,
    reference_model,
    tiny_config,
    write_checkpoint,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def tensors(dest: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(dest.glob("model*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 (not a dict)
    return out


def moe_layers(arch: str) -> list[int]:
    """Indices of the layers with routed experts in the tiny config."""
    cfg = tiny_config(arch)
    n = cfg.num_hidden_layers
    if arch == "Qwen2MoeForCausalLM":
        return [i for i in range(n) if (i + 1) % cfg.decoder_sparse_step == 0]
    if arch == "Qwen3MoeForCausalLM":
        return [i for i in range(n) if i not in cfg.mlp_only_layers]
    if arch in ("Glm4MoeForCausalLM", "DeepseekV3ForCausalLM"):
        return list(range(cfg.first_k_dense_replace, n))
    return list(range(n))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_files(arch: str, tmp_path: Path) -> None:
    dest = write_checkpoint(arch, tmp_path / "ck")
    config = json.loads((dest / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert config["eos_token_id"] == EOS_ID and config["vocab_size"] == 128
    assert json.loads((dest / "generation_config.json").read_text())["eos_token_id"] == EOS_ID
    assert (dest / "model.safetensors").is_file()
    assert not (dest / "model.safetensors.index.json").exists()
    for name in TOKENIZER_FILES:
        assert (dest / name).is_file(), name
    names = tensors(dest).keys()
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    # Hub layout: one tensor per routed expert, in the MoE layers only.
    expert = re.compile(r"model\.layers\.(\d+)\.\w+\.experts\.\d+\.")
    experts = {int(m.group(1)) for k in names if (m := expert.match(k))}
    assert sorted(experts) == moe_layers(arch)
    has_bias = any(k.endswith("e_score_correction_bias") for k in names)
    assert has_bias == (arch in ("Glm4MoeForCausalLM", "DeepseekV3ForCausalLM"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sharded_checkpoint(arch: str, tmp_path: Path) -> None:
    single = tensors(write_checkpoint(arch, tmp_path / "one"))
    dest = write_checkpoint(arch, tmp_path / "ck", shards=3)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3
    assert files == sorted(p.name for p in dest.glob("model-*-of-*.safetensors"))
    assert not (dest / "model.safetensors").exists()
    sharded = tensors(dest)
    assert sharded.keys() == single.keys() == index["weight_map"].keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_checkpoint(arch: str, tmp_path: Path) -> None:
    hub = tensors(write_checkpoint(arch, tmp_path / "hub", seed=5))
    dest = write_checkpoint(arch, tmp_path / "fused", seed=5, fused=True)
    assert [p.name for p in dest.glob("*.safetensors")] == ["model.safetensors"]
    fused = tensors(dest)
    assert not any(PER_EXPERT.search(k) for k in fused)
    if arch == "MixtralForCausalLM":
        w1, w3, w2 = (f"block_sparse_moe.experts.{{}}.{w}" for w in ("w1", "w3", "w2"))
    else:
        w1, w3, w2 = (f"mlp.experts.{{}}.{w}" for w in ("gate_proj", "up_proj", "down_proj"))
    for layer in moe_layers(arch):
        p = f"model.layers.{layer}."
        gate_up = fused.pop(p + "mlp.experts.gate_up_proj")
        down = fused.pop(p + "mlp.experts.down_proj")
        assert gate_up.shape == (8, 64, 64) and down.shape == (8, 64, 32)
        for e in range(8):  # gate rows first, then up
            assert torch.equal(gate_up[e, :32], hub[p + w1.format(e) + ".weight"])
            assert torch.equal(gate_up[e, 32:], hub[p + w3.format(e) + ".weight"])
            assert torch.equal(down[e], hub[p + w2.format(e) + ".weight"])
    # Everything else is stored as in the Hub layout.
    rest = {k: v for k, v in hub.items() if not PER_EXPERT.search(k)}
    assert fused.keys() == rest.keys()
    assert all(torch.equal(fused[k], rest[k]) for k in rest)


def test_tied_checkpoint(tmp_path: Path) -> None:
    dest = write_checkpoint("Qwen3MoeForCausalLM", tmp_path / "ck", tied=True)
    assert json.loads((dest / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in tensors(dest)


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "DeepseekV3ForCausalLM"])
def test_reference_loads_every_layout_alike(arch: str, tmp_path: Path) -> None:
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = []
    for name, kwargs in (("hub", {}), ("fused", {"fused": True}), ("sharded", {"shards": 2})):
        model = reference_model(write_checkpoint(arch, tmp_path / name, seed=2, **kwargs))
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.isfinite(logits[0]).all()
    assert all(torch.equal(logits[0], other) for other in logits[1:])


def test_checkpoint_is_deterministic(tmp_path: Path) -> None:
    a = write_checkpoint("Glm4MoeForCausalLM", tmp_path / "a", seed=3)
    b = write_checkpoint("Glm4MoeForCausalLM", tmp_path / "b", seed=3)
    c = write_checkpoint("Glm4MoeForCausalLM", tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tiny_config_overrides() -> None:
    cfg = tiny_config("Qwen2MoeForCausalLM", num_hidden_layers=2, vocab_size=200)
    assert (cfg.num_hidden_layers, cfg.vocab_size) == (2, 200)
    with pytest.raises(ValueError, match="unknown architecture"):
        tiny_config("LlamaForCausalLM")


@pytest.mark.parametrize("vocab_size", [98, 128, 700])
def test_tokenizer_round_trips_and_matches_transformers(vocab_size: int, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, vocab_size)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.get_vocab_size() == vocab_size
    assert hf.eos_token_id == hf.pad_token_id == EOS_ID
    rng = random.Random(vocab_size)
    texts = ["", " ", "  leading and trailing  ", "".join(PRINTABLE),
             "The capital of France is Paris. def f(x): return x ** 2"]
    texts += ["".join(rng.choices(PRINTABLE, k=rng.randint(1, 80))) for _ in range(100)]
    for text in texts:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == text
    # Every id decodes to printable ASCII (or a newline): valid UTF-8 whatever a model emits.
    for i in range(3, vocab_size):
        assert all(c in PRINTABLE or c == "\n" for c in tok.decode([i]))


def test_tokenizer_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, 128)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = hf(text)["input_ids"]
    assert ids[0] == hf.convert_tokens_to_ids("<|im_start|>") == 1
    assert hf.convert_tokens_to_ids("<|im_end|>") == 2
    assert hf.decode(ids) == text
    assert (tmp_path / "chat_template.jinja").read_text() == hf.chat_template


def test_tokenizer_is_deterministic_and_checks_size(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "a", 300)
    write_tokenizer(tmp_path / "b", 300)
    for name in TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(ValueError, match="at least 98"):
        write_tokenizer(tmp_path / "c", 97)
