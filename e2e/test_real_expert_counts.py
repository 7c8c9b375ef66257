"""`autoglm up` serving the expert counts of real models at tiny width: GLM-4.5's 160 routed
experts (top-8, one group) and DeepSeek-V3's 256 (top-8 of 4 groups out of 8), imported from
a Hugging Face checkpoint and served as the repository holds them, with the machine's default
packing (no ``experts.perServer``). Every expert is on exactly one of at most 4 expert
servers; the gateway's logits are transformers' forward and its greedy completions (the
stock ``openai`` client) transformers' ``generate(do_sample=False)``. Prints how long
`autoglm up` took to serve, its Triton servers' RSS, and their number."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
import tritonclient.http as httpclient
import yaml

from autoglm.engine.text import Tokenizer
from autoglm.procs import group_rss_bytes
from autoglm.repository import import_checkpoint
from autoglm.testing.checkpoints import reference_model, write_checkpoint
from autoglm.testing.up import UpProcess as Up

pytestmark = [pytest.mark.e2e, pytest.mark.triton, pytest.mark.prometheus]
ROOT = Path(__file__).resolve().parents[1]
NAME = "real-moe"
SHAPES = ((1, 5), (2, 9))
PROMPTS = (4, 7)  # prompt lengths of the greedy completions
NEW_TOKENS = 8
MAX_SERVERS = 4

# The routed-expert shapes of the real models, at the tiny width of tiny_config (hidden 64,
# experts 32 wide) and 3 layers: the first dense, two MoE layers.
REAL: dict[str, tuple[str, dict[str, Any]]] = {
    "glm-4.5": ("Glm4MoeForCausalLM", {"n_routed_experts": 160, "num_experts_per_tok": 8,
                                       "n_group": 1, "topk_group": 1}),
    "deepseek-v3": ("DeepseekV3ForCausalLM", {"n_routed_experts": 256, "num_experts_per_tok": 8,
                                              "n_group": 8, "topk_group": 4}),
}
LAYERS = 3


@dataclass
class Model:
    experts: int
    vocab: int
    repo: Path
    reference: Any  # a transformers model: generate() is untyped
    tokenizer: Tokenizer


@pytest.fixture(scope="module", params=sorted(REAL), ids=str)
def model(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    """The checkpoint written offline (fp32), imported as version 1, and transformers' model."""
    arch, overrides = REAL[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    src = write_checkpoint(arch, tmp / "ckpt", seed=3, num_hidden_layers=LAYERS, **overrides)
    repo = tmp / "repo"
    cfg = import_checkpoint(src, repo, 1, NAME, progress=False).config
    assert cfg.num_experts == overrides["n_routed_experts"]
    yield Model(cfg.num_experts, cfg.vocab_size, repo, reference_model(src),
                Tokenizer.from_dir(repo / "router" / "1" / "hf"))


def resource(path: Path, repo: Path) -> Path:
    """The tiny example pointed at ``repo`` without numExperts/topK/layers (taken from the
    repository), without perServer (the machine's default), replicaBudget (its default holds
    minReplicas of every expert) or autoscaling; a short drain."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    doc["metadata"]["name"] = path.stem
    spec = doc["spec"]
    spec["model"] = {"name": NAME, "version": 1, "repository": str(repo)}
    for key in ("perServer", "replicaBudget"):
        spec["experts"].pop(key, None)
    spec.pop("autoscaling")
    spec["rollout"] = {"readyTimeoutSeconds": 300, "drainTimeoutSeconds": 1,
                       "keepPreviousSeconds": 60}
    path.write_text(yaml.safe_dump(doc))
    return path


def infer(port: int, ids: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    with httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120) as c:
        inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
        inp.set_data_from_numpy(ids)
        r = c.infer("router", [inp])
        assert int(r.as_numpy("MODEL_VERSION")[0]) == 1
        out: np.ndarray[Any, Any] = r.as_numpy("LOGITS")
        return out


def test_real_expert_counts_serve_packed_and_equal_transformers(model: Model,
                                                                tmp_path: Path) -> None:
    file = resource(tmp_path / "real.yaml", model.repo)
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, model.vocab, shape).astype(np.int64) for shape in SHAPES]
    prompts = [rng.integers(0, model.vocab, n).tolist() for n in PROMPTS]
    with torch.no_grad():
        want_logits = [model.reference(torch.from_numpy(ids)).logits.numpy() for ids in inputs]
    want_tokens = [model.reference.generate(
        torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
        max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)[0, len(p):].tolist()
        for p in prompts]

    started = time.monotonic()
    with Up.serving(file, tmp_path / "home") as up:
        served = next(t for t, line in up.lines if "serving " in line) - started
        assert up.said(f"served from {model.repo}"), "the repository as it is"
        status = json.loads((up.home / "run" / "real" / "status.json").read_text())
        slot = status["slots"]["a"]
        servers = slot["servers"]
        held = sorted(e for s in servers for e in s["experts"])
        assert 1 <= len(servers) <= MAX_SERVERS, servers
        assert held == list(range(model.experts)), "every expert on exactly one server"
        pids = [slot["router_pid"], *(s["pid"] for s in servers)]
        assert all(isinstance(p, int) for p in pids), pids
        rss = [group_rss_bytes(p) for p in pids]  # each server with its backend stubs
        print(f"\n{model.experts} experts: serving {served:.1f} s after `autoglm up` started; "
              f"{len(servers)} expert server(s) holding "
              f"{[len(s['experts']) for s in servers]} experts; Triton RSS "
              f"{sum(rss) / 2**20:.0f} MiB in all (router {rss[0] / 2**20:.0f} MiB, expert "
              f"servers {', '.join(f'{r / 2**20:.0f}' for r in rss[1:])} MiB)")

        for ids, want in zip(inputs, want_logits, strict=True):
            np.testing.assert_allclose(infer(up.port, ids), want, rtol=1e-4, atol=1e-4)

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{up.port}/v1", api_key="unused",
                               max_retries=0, timeout=120)
        for prompt, tokens in zip(prompts, want_tokens, strict=True):
            r = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW_TOKENS,
                                          temperature=0, extra_body={"ignore_eos": True})
            assert r.usage is not None and r.usage.completion_tokens == NEW_TOKENS
            # text: special tokens are left out, as vLLM does by default
            assert r.choices[0].text == model.tokenizer.decode(tokens,
                                                               skip_special_tokens=True)
