"""Each architecture imported from a Hugging Face checkpoint and served disaggregated on real
tritonserver — a router server and expert servers over gRPC, with 1 and then 2 replicas per
expert — equals transformers' forward of the same checkpoint, and routes the same tokens to
the same experts."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from autoglm import canary
from autoglm.plan import expert_model, router_model
from autoglm.repository import import_checkpoint, router_server_models
from autoglm.testing import eventually
from autoglm.testing.checkpoints import (
    ARCHITECTURES,
    reference_model,
    reference_routing,
    write_checkpoint,
)
from autoglm.triton import TritonServer

pytestmark = pytest.mark.triton
EXPERTS = 4  # fewer than the unit tests' 8: every expert model is a stub process to start
# the config field that counts routed experts, per architecture
EXPERT_FIELD: dict[str, dict[str, Any]] = {"MixtralForCausalLM": {"num_local_experts": EXPERTS},
                "Qwen2MoeForCausalLM": {"num_experts": EXPERTS},
                "Qwen3MoeForCausalLM": {"num_experts": EXPERTS},
                "Glm4MoeForCausalLM": {"n_routed_experts": EXPERTS, "n_group": 2},
                "DeepseekV3ForCausalLM": {"n_routed_experts": EXPERTS, "n_group": 2,
                                          "topk_group": 1}}
SHAPES = ((1, 6), (2, 11), (3, 4))


def metric(url: str, name: str, expert: int) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    m = re.search(rf'^{name}{{expert="{expert}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def routed(router: TritonServer) -> dict[int, int]:
    counts = {e: int(metric(router.metrics_url, "autoglm_expert_tokens_total", e))
              for e in range(EXPERTS)}
    return {e: n for e, n in counts.items() if n}


def infer(router: TritonServer, ids: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    with httpclient.InferenceServerClient(router.http_url) as c:
        inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
        inp.set_data_from_numpy(ids)
        res = c.infer(router_model(), [inp])
        assert int(res.as_numpy("MODEL_VERSION")[0]) == 1
        out: np.ndarray[Any, Any] = res.as_numpy("LOGITS")
        return out


class Served:
    """Expert servers (each holding every expert: one replica set) and a router."""

    def __init__(self, repo: Path, workdir: Path) -> None:
        self.repo, self.workdir = repo, workdir
        self.endpoints = workdir / "endpoints.json"
        self.replicas: list[TritonServer] = []
        self.router: TritonServer | None = None

    def add_replica_set(self) -> TritonServer:
        n = len(self.replicas)
        server = TritonServer(self.repo, {expert_model(e): 1 for e in range(EXPERTS)},
                              log_path=self.workdir / f"experts-{n}.log")
        self.replicas.append(server)
        server.start()
        tmp = self.endpoints.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(e): [s.grpc_url for s in self.replicas]
                                   for e in range(EXPERTS)}))
        os.replace(tmp, self.endpoints)
        return server

    def start_router(self) -> TritonServer:
        self.router = TritonServer(
            self.repo, router_server_models(self.repo, 1),
            env={"AUTOGLM_EXPERT_ENDPOINTS_FILE": str(self.endpoints),
                 "AUTOGLM_RESOLVE_SECONDS": "0.3"},
            log_path=self.workdir / "router.log")
        return self.router.start()

    def stop(self) -> None:
        for s in [*self.replicas, *([self.router] if self.router else [])]:
            s.stop()
            assert not s.shm_regions(), "shared memory left behind"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "repo", tmp_path)
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_served_model_equals_transformers_with_1_and_2_replicas(arch: str, served: Served,
                                                               tmp_path: Path) -> None:
    src = write_checkpoint(arch, tmp_path / "ckpt", seed=11, **EXPERT_FIELD[arch])
    vocab = import_checkpoint(src, served.repo, 1, "m", router_instances=1,
                              progress=False).config.vocab_size
    theirs: Any = reference_model(src)  # a transformers model: generate() is untyped
    served.add_replica_set()
    router = served.start_router()
    rng = np.random.default_rng(0)

    def check_all_shapes() -> None:
        for b, s in SHAPES:
            ids = rng.integers(0, vocab, (b, s)).astype(np.int64)
            before = routed(router)
            got = infer(router, ids)
            with torch.no_grad():
                want = theirs(torch.from_numpy(ids)).logits.numpy()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            after = routed(router)
            assert {e: n - before.get(e, 0) for e, n in after.items() if n > before.get(e, 0)} \
                == reference_routing(theirs, torch.from_numpy(ids)), "the same routing"

    check_all_shapes()
    ok, detail = canary.check(f"http://{router.http_url}", 1)
    assert ok is True, detail
    second = served.add_replica_set()
    eventually(lambda: all(metric(router.metrics_url, "autoglm_expert_replicas", e) == 2.0
                           for e in range(EXPERTS)), "the router to see 2 replicas", timeout=30)
    check_all_shapes()
    check_all_shapes()
    served_by_second = sum(metric(second.metrics_url, "autoglm_expert_served_tokens_total", e)
                           for e in range(EXPERTS))
    assert served_by_second > 0, "the second replica set got no traffic"

    # generation: the decoupled ``generate`` model streams transformers' greedy tokens,
    # for two prompts of different lengths generating at once on one gRPC stream
    prompts = [rng.integers(0, vocab, n).tolist() for n in (3, 9)]
    got = generate_stream(router, prompts, max_tokens=24)
    for prompt, tokens in zip(prompts, got, strict=True):
        x = torch.tensor([prompt])
        want = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24,
                               do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
        assert tokens == want


def generate_stream(router: TritonServer, prompts: list[list[int]],
                    max_tokens: int) -> list[list[int]]:
    """Greedy generations over one Triton gRPC stream (stock tritonclient), token ids."""
    import queue

    import tritonclient.grpc as grpcclient

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    with grpcclient.InferenceServerClient(router.grpc_url) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i, prompt in enumerate(prompts):
            ids = grpcclient.InferInput("input_ids", [len(prompt)], "INT64")
            ids.set_data_from_numpy(np.array(prompt, dtype=np.int64))
            client.async_stream_infer(
                "generate", [ids], request_id=str(i),
                parameters={"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
        done = 0
        while done < len(prompts):
            result, error = answers.get(timeout=60)
            assert error is None, error
            rid = result.get_response().id
            tokens[rid] += result.as_numpy("output_ids").tolist()
            assert int(result.as_numpy("model_version")[0]) == 1
            done += result.as_numpy("finish_reason")[0] != b""
        client.stop_stream()
    return [tokens[str(i)] for i in range(len(prompts))]
