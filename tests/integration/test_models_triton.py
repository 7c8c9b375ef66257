"""Each architecture imported from a Hugging Face checkpoint and served disaggregated on real
tritonserver — a router server and expert servers over gRPC, with 1 and then 2 replicas per
expert — equals transformers' forward of the same checkpoint, and routes the same tokens to
the same experts. Its greedy generations, through the gateway by every API (the stock
``openai`` client streamed and not, Triton's generate extension, a gRPC stream), 8 of
different lengths at once, are transformers' ``generate(do_sample=False)``; seeded sampling
repeats itself."""

from __future__ import annotations

import functools
import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
import tritonclient.http as httpclient

from autoglm import canary
from autoglm.engine.text import Tokenizer
from autoglm.gateway.app import GatewayServer, Routing, Target
from autoglm.plan import SERVER_EXPERTS_ENV, experts_model, format_server_experts, router_model
from autoglm.procs import free_port
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
EXPERTS = 4
FLUSH = 1.5  # an expert server hands its summed counters to Triton every 0.5 s
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


def same_routing(router: TritonServer, before: dict[int, int], want: dict[int, int]) -> bool:
    """Whether the tokens routed since ``before`` are ``want`` (expert → tokens)."""
    after = routed(router)
    return {e: n - before.get(e, 0) for e, n in after.items() if n > before.get(e, 0)} == want


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
    """Expert servers (each holding the experts it is given) and a router."""

    def __init__(self, repo: Path, workdir: Path) -> None:
        self.repo, self.workdir = repo, workdir
        self.endpoints = workdir / "endpoints.json"
        self.replicas: list[TritonServer] = []
        self.router: TritonServer | None = None

    def add_server(self, experts: list[int] | None = None) -> TritonServer:
        """A server holding ``experts`` (None: every expert)."""
        n = len(self.replicas)
        env = {} if experts is None else {SERVER_EXPERTS_ENV: format_server_experts(experts)}
        server = TritonServer(self.repo, {experts_model(): 1}, env=env,
                              log_path=self.workdir / f"experts-{n}.log")
        self.replicas.append(server)
        server.start()
        tmp = self.endpoints.with_suffix(".tmp")
        tmp.write_text(json.dumps([s.grpc_url for s in self.replicas]))
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
def test_served_model_equals_transformers_on_one_and_two_servers(arch: str, served: Served,
                                                                tmp_path: Path) -> None:
    """One server holding every expert; then a second server holding the even experts, so
    that the router splits a layer's experts between two servers (the odd ones only where
    they are) and the even ones have a replica on each."""
    src = write_checkpoint(arch, tmp_path / "ckpt", seed=11, **EXPERT_FIELD[arch])
    vocab = import_checkpoint(src, served.repo, 1, "m", router_instances=1,
                              progress=False).config.vocab_size
    theirs: Any = reference_model(src)  # a transformers model: generate() is untyped
    served.add_server()
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
            want_routing = reference_routing(theirs, torch.from_numpy(ids))

            # counters reach Triton within a flush period
            eventually(functools.partial(same_routing, router, before, want_routing),
                       f"the same routing: {want_routing}", timeout=10)

    check_all_shapes()
    ok, detail = canary.check(f"http://{router.http_url}", 1)
    assert ok is True, detail
    evens = list(range(0, EXPERTS, 2))
    second = served.add_server(evens)
    eventually(lambda: all(metric(router.metrics_url, "autoglm_expert_replicas", e)
                           == (2.0 if e in evens else 1.0) for e in range(EXPERTS)),
               "the router to see what the second server holds", timeout=30)
    check_all_shapes()
    check_all_shapes()
    time.sleep(FLUSH)  # the second server's counters reach Triton
    by_second = {e: metric(second.metrics_url, "autoglm_expert_served_tokens_total", e)
                 for e in range(EXPERTS)}
    assert sum(by_second.values()) > 0, "the second server got no traffic"
    assert all(by_second[e] == 0 for e in range(EXPERTS) if e not in evens), \
        f"the second server computed experts it does not hold: {by_second}"

    # generation: the decoupled ``generate`` model streams transformers' greedy tokens,
    # for two prompts of different lengths generating at once on one gRPC stream
    prompts = [rng.integers(0, vocab, n).tolist() for n in (3, 9)]
    got = generate_stream(router.grpc_url, prompts, max_tokens=24)
    for prompt, tokens in zip(prompts, got, strict=True):
        x = torch.tensor([prompt])
        want = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24,
                               do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
        assert tokens == want

    gateway_generations(router, theirs, Tokenizer.from_dir(served.repo / "router" / "1" / "hf"),
                        [rng.integers(0, vocab, 3 + 2 * i).tolist() for i in range(8)])


def gateway_generations(router: TritonServer, theirs: Any, tok: Tokenizer,
                        prompts: list[list[int]]) -> None:
    """8 greedy generations at once through the gateway, two by each API, equal
    transformers'; then seeded sampling twice, the same both times."""
    new = 24
    want = [theirs.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p)),
                            max_new_tokens=new, do_sample=False,
                            eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    server = GatewayServer(Routing(Target("a", 1, f"http://{router.http_url}",
                                          router.grpc_url, "m")),
                           free_port(), grpc_port=free_port()).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                           max_retries=0)
    greedy: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}

    def openai_text(prompt: list[int], stream: bool, **kw: Any) -> str:
        args = {**greedy, **kw}
        if not stream:
            r = client.completions.create(model="m", prompt=prompt, max_tokens=new, **args)
            assert r.usage is not None and r.usage.completion_tokens == new
            text: str = r.choices[0].text
            return text
        chunks = client.completions.create(model="m", prompt=prompt, max_tokens=new,
                                           stream=True, **args)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    def extension(prompt: list[int], **params: Any) -> list[int]:
        body = json.dumps({"input_ids": prompt, "max_tokens": new, "temperature": 0,
                           "ignore_eos": True, **params}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/v2/models/generate/generate_stream", body,
            {"Content-Type": "application/json"})
        ids: list[int] = []
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: "):
                    ids += json.loads(line[6:])["output_ids"]
        return ids

    def one(i: int) -> None:
        p, w = prompts[i], want[i]
        match i % 4:
            case 0 | 1:  # text: special tokens are left out, as vLLM does by default
                text = tok.decode(w, skip_special_tokens=True)
                assert openai_text(p, stream=i % 4 == 1) == text, f"openai {i}"
            case 2:
                assert extension(p) == w, f"generate extension {i}"
            case 3:
                assert generate_stream(f"127.0.0.1:{server.grpc_port}", [p], new) == [w]

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(8)))
        seeded = {"temperature": 0.9, "top_p": 0.9, "seed": 1234}
        assert len({openai_text(prompts[0], stream=s, **seeded) for s in (False, True)}) == 1
        assert extension(prompts[1], **seeded) == extension(prompts[1], **seeded)
    finally:
        server.stop()


def generate_stream(url: str, prompts: list[list[int]],
                    max_tokens: int) -> list[list[int]]:
    """Greedy generations over one Triton gRPC stream (stock tritonclient), token ids."""
    import queue

    import tritonclient.grpc as grpcclient

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    with grpcclient.InferenceServerClient(url) as client:
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
