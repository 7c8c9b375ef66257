"""Text generation through the gateway on real tritonserver processes: the stock ``openai``
client (chat and completions, streamed and not) and Triton's generate extension get the
in-process engine's greedy tokens, alone and 8 at once; refusals are OpenAI-style 4xx; a
client that disconnects mid-stream frees its sequence at once; a generation stays on the slot
it started on and is counted in flight until it ends; a router with a stream interval sends
the same tokens, several a response."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from autoglm.engine.scheduler import Engine
from autoglm.engine.service import TextEngine
from autoglm.engine.text import Tokenizer
from autoglm.gateway.app import GatewayServer, Replica, Routing, Target
from autoglm.local.dataplane import DataPlane
from autoglm.models.tiny import PRESETS
from autoglm.plan import STREAM_INTERVAL_ENV
from autoglm.procs import free_port
from autoglm.repository import build, load_reference
from autoglm.testing import eventually

pytestmark = pytest.mark.triton
MODEL = "tiny-moe"
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@dataclass
class Served:
    plane: DataPlane
    gateway: GatewayServer
    reference: TextEngine

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0,
                             **kw)

    def expect(self, max_tokens: int, **prompt: Any) -> tuple[list[int], str, int]:
        """The in-process engine's greedy (ids, text, prompt tokens), EOS ignored."""
        te = self.reference
        rid = te.submit({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
                        **prompt)
        ids: list[int] = []
        text, n = "", 0
        while te.engine.has_work():
            for c in te.step():
                if c.id == rid:
                    ids += c.token_ids
                    text += c.text
                    n = c.prompt_tokens
        return ids, text, n


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = tmp_path_factory.mktemp("repo")
    build(repo, MODEL, 1, PRESETS["tiny"])
    model = load_reference(repo, 1)
    engine = Engine(model.router, model.local_fanout, kv_capacity_tokens=1024,
                    max_batch_tokens=64, prefill_chunk=32)
    reference = TextEngine(engine, Tokenizer.from_dir(repo / "router" / "1" / "hf"))
    plane = DataPlane(repo, 1, tmp_path_factory.mktemp("v1"), capacity=2)
    plane.start(1)  # 4 experts on 2 servers
    try:
        router = plane.router
        assert router is not None
        gateway = GatewayServer(Routing(Target("a", 1, f"http://{router.http_url}",
                                               router.grpc_url, model=MODEL)),
                                free_port()).start()
        try:
            yield Served(plane, gateway, reference)
        finally:
            gateway.stop()
    finally:
        plane.stop()


def post(url: str, body: bytes | dict[str, Any]) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, bytes(r.read())
    except urllib.error.HTTPError as e:
        return e.code, bytes(e.read())


def events(payload: bytes) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream."""
    out = []
    for block in payload.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            return float(m.group(2))
    return None


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def test_models_lists_the_served_model(served: Served) -> None:
    assert [m.id for m in served.client().models.list()] == [MODEL]
    assert served.client().models.retrieve(MODEL).id == MODEL


def test_completions_greedy_equal_the_engine(served: Served) -> None:
    client = served.client()
    for prompt in ("Hello there", "def f(x):"):
        ids, text, n = served.expect(24, text=prompt)
        assert len(ids) == 24
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, **GREEDY)
        assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
        assert r.usage is not None
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
            (n, 24, n + 24)
        assert r.system_fingerprint == "v1"
        chunks = list(client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, stream=True,
            stream_options={"include_usage": True}, **GREEDY))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == n
    # a prompt of token ids
    ids, text, n = served.expect(24, ids=[5, 17, 42, 99])
    r = client.completions.create(model=MODEL, prompt=[5, 17, 42, 99], max_tokens=24, **GREEDY)
    assert r.choices[0].text == text and r.usage is not None and r.usage.prompt_tokens == 4


def test_chat_greedy_equals_the_engine(served: Served) -> None:
    client = served.client()
    messages: list[Any] = [{"role": "system", "content": "You are terse."},
                           {"role": "user", "content": "Hi! What is 2+2?"}]
    _, text, n = served.expect(24, messages=messages)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                       **GREEDY)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (n, 24)
    # max_completion_tokens, streamed, with the usage chunk
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=24, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens,
                                  usage.total_tokens) == (n, 24, n + 24)
    # without include_usage: no usage chunk; text parts are joined
    parts: Any = [{"role": "user", "content": [{"type": "text", "text": "Hi! "},
                                          {"type": "text", "text": "What is 2+2?"}]}]
    _, text2, _ = served.expect(8, messages=[{"role": "user", "content": "Hi! What is 2+2?"}])
    chunks = list(client.chat.completions.create(model=MODEL, messages=parts, max_tokens=8,
                                                 stream=True, **GREEDY))
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text2


def test_eight_concurrent_streams_each_get_their_own_tokens(served: Served) -> None:
    prompts = [("Once upon a time" * (1 + i % 3), 6 + 5 * i) for i in range(8)]
    want = [served.expect(m, text=p)[1] for p, m in prompts]
    client = served.client()
    start = threading.Barrier(8)

    def one(i: int) -> str:
        p, m = prompts[i]
        start.wait()
        stream = client.completions.create(model=MODEL, prompt=p, max_tokens=m, stream=True,
                                           **GREEDY)
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    assert got == want


def test_latency_histograms_count_every_token(served: Served) -> None:
    """Time to first token and queue time once per generation, inter-token latency once per
    later token, labelled with the version (Prometheus adds the slot from the scrape target);
    a generation's queue time is part of its time to first token (one arrival for both)."""
    router = served.plane.router
    assert router is not None
    names = ("time_to_first_token", "inter_token_latency", "queue")

    def counts() -> tuple[float, ...]:
        text = scrape(router.metrics_url)
        return tuple(sample(text, f"autoglm_{name}_seconds_count", version="1") or 0.0
                     for name in names)

    def sums() -> dict[str, float]:
        text = scrape(router.metrics_url)
        return {name: sample(text, f"autoglm_{name}_seconds_sum", version="1") or 0.0
                for name in names}

    ttft, itl, queue = counts()
    before = sums()
    client = served.client()
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt="Tick", max_tokens=7, stream=stream,
                                      **GREEDY)
        if stream:
            list(r)
    eventually(lambda: counts() == (ttft + 2, itl + 12, queue + 2),
               "2 first tokens, 12 later ones and 2 admissions observed", timeout=30)
    after = sums()
    assert 0 <= after["queue"] - before["queue"] \
        <= after["time_to_first_token"] - before["time_to_first_token"]
    text = scrape(router.metrics_url)
    for name in names:
        buckets = [line for line in text.splitlines()
                   if line.startswith(f"autoglm_{name}_seconds_bucket")]
        assert any('le="+Inf"' in b for b in buckets) and len(buckets) > 2, name


def test_expert_calls_per_engine_step(served: Served) -> None:
    """A step makes at most one call per expert server per MoE layer, whatever the batch."""
    router = served.plane.router
    assert router is not None
    cfg = PRESETS["tiny"]

    def totals() -> tuple[float, float]:
        text = scrape(router.metrics_url)
        calls = sample(text, "autoglm_expert_server_calls_total") or 0.0
        return calls, sample(text, "autoglm_generate_steps_total", version="1") or 0.0

    client = served.client()
    r = client.completions.create(model=MODEL, prompt="Tock", max_tokens=9, **GREEDY)
    assert r.usage is not None and r.usage.completion_tokens == 9
    last: list[tuple[float, float]] = []

    def settled() -> tuple[float, float] | None:
        """Both counters, once flushed and no longer moving (read 0.5 s apart)."""
        now = totals()
        done = bool(last) and now == last[-1] and now[0] > 0 and now[1] >= 9
        last.append(now)
        return now if done else None

    calls, steps = eventually(settled, "the calls and steps counted", interval=0.5)
    per_step = calls / steps
    servers = len(served.plane.expert_servers)
    print(f"expert server calls per engine step: {per_step:.2f} (at most "
          f"{cfg.layers} MoE layers x {servers} servers)")
    assert servers == 2
    assert 0 < per_step <= cfg.layers * servers  # every layer of the tiny is MoE


def test_generate_extension(served: Served) -> None:
    ids, text, n = served.expect(24, text="Hello there")
    body = {"text_input": "Hello there",
            "parameters": {"max_tokens": 24, "temperature": 0, "ignore_eos": True}}
    for name in ("generate", MODEL):
        status, raw = post(f"{served.base}/v2/models/{name}/generate", body)
        assert status == 200, raw
        answer = json.loads(raw)
        assert answer["model_name"] == name and answer["model_version"] == "1"
        assert answer["text_output"] == text and answer["output_ids"] == ids
        assert answer["finish_reason"] == "length"
        assert (answer["prompt_tokens"], answer["completion_tokens"]) == (n, 24)
    status, raw = post(f"{served.base}/v2/models/generate/generate_stream", body)
    assert status == 200
    got = events(raw)
    assert "".join(e["text_output"] for e in got) == text
    assert [t for e in got for t in e["output_ids"]] == ids
    assert got[-1]["finish_reason"] == "length" and got[-1]["completion_tokens"] == 24
    assert all(e["finish_reason"] == "" for e in got[:-1])
    # top-level parameters (as TensorRT-LLM's models take them), chat messages
    messages = [{"role": "user", "content": "Hi"}]
    _, chat_text, _ = served.expect(5, messages=messages)
    status, raw = post(f"{served.base}/v2/models/generate/generate",
                       {"messages": json.dumps(messages), "max_tokens": 5,
                        "temperature": 0, "ignore_eos": True})
    assert status == 200 and json.loads(raw)["text_output"] == chat_text
    # Triton's error shape
    status, raw = post(f"{served.base}/v2/models/generate/generate",
                       {"text_input": "x", "parameters": {"max_tokens": 0}})
    assert status == 400 and "max_tokens must be an integer >= 1" in json.loads(raw)["error"]


BAD: list[tuple[str, dict[str, Any] | bytes, int, str, str | None]] = [
    ("chat/completions", b'{"model": "tiny-moe", "messages": [', 400, "not valid JSON", None),
    ("chat/completions", {"model": MODEL}, 400, "Missing required parameter: 'messages'",
     "messages"),
    ("completions", {"model": MODEL}, 400, "Missing required parameter: 'prompt'", "prompt"),
    ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
     404, "The model `gpt-4` does not exist", "model"),
    ("completions", {"model": MODEL, "prompt": "hello " * 200}, 400,
     "exceeds the context window", "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400,
     "max_tokens must be an integer >= 1", "max_tokens"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                          "max_completion_tokens": 100000}, 400, "exceeds the context window",
     "messages"),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400,
     "temperature must be in [0, 100]", "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_p": 0, "stream": True}, 400,
     "top_p must be in (0, 1]", "top_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n must be 1", "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "logprobs": 2, "echo": True}, 400,
     "not supported: logprobs, echo", "logprobs"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "batch of prompts", "prompt"),
]


@pytest.mark.parametrize(("path", "body", "status", "message", "param"), BAD,
                         ids=[f"{i}-{b[3][:24]}" for i, b in enumerate(BAD)])
def test_refusals_are_openai_errors(served: Served, path: str, body: dict[str, Any] | bytes,
                                    status: int, message: str, param: str | None) -> None:
    got, raw = post(f"{served.base}/v1/{path}", body)
    assert got == status, raw
    error = json.loads(raw)["error"]
    assert message in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    # nothing serving is disturbed
    r = served.client().completions.create(model=MODEL, prompt="ok", max_tokens=3, **GREEDY)
    assert r.usage is not None and r.usage.completion_tokens == 3


def test_stock_client_raises_on_refusals(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       temperature=-1, stream=True)


def test_upstream_unreachable_is_503(served: Served) -> None:
    gone = Target("b", 2, f"http://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                  model=MODEL)
    gateway = GatewayServer(Routing(gone), free_port()).start()
    try:
        status, raw = post(f"http://127.0.0.1:{gateway.port}/v1/completions",
                           {"model": MODEL, "prompt": "hi"})
        assert status == 503
        error = json.loads(raw)["error"]
        assert "slot b" in error["message"] and error["type"] == "service_unavailable"
        status, raw = post(f"http://127.0.0.1:{gateway.port}/v2/models/generate/generate",
                           {"text_input": "hi"})
        assert status == 503 and "slot b" in json.loads(raw)["error"]
    finally:
        gateway.stop()


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "waiting"])
def test_a_client_that_goes_away_frees_its_sequence(served: Served, stream: bool) -> None:
    """Mid-stream, or waiting for a whole answer: the generation is cancelled at once."""
    router = served.plane.router
    assert router is not None

    def router_metric(name: str) -> float:
        value = sample(scrape(router.metrics_url), name, version="1")
        assert value is not None, f"the router exports no {name}"
        return value

    def gone() -> float:
        text = scrape(f"{served.base}/metrics")
        return sample(text, "autoglm_gateway_requests_total", slot="a", code="499") or 0.0

    assert router_metric("autoglm_kv_cache_used_tokens") == 0
    generated, gone_before = router_metric("autoglm_generated_tokens_total"), gone()
    gw = served.gateway.gateway
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 120, "stream": stream,
            "temperature": 0, "ignore_eos": True}
    conn = http.client.HTTPConnection("127.0.0.1", served.gateway.port, timeout=30)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        if stream:
            r = conn.getresponse()
            assert r.status == 200
            assert r.readline().startswith(b"data: ")
        eventually(lambda: router_metric("autoglm_kv_cache_used_tokens") > 0,
                   "the generation to start", timeout=30, interval=0.02)
        assert gw.inflight.get("a") == 1  # counted in flight while it runs
    finally:
        conn.close()
    # the client went away after a few tokens: its sequence is aborted, so its cache is
    # freed and the 120 tokens it asked for are never all made
    eventually(lambda: router_metric("autoglm_kv_cache_used_tokens") == 0,
               "the sequence's KV cache to be freed", timeout=30, interval=0.05)
    eventually(lambda: gw.inflight.get("a") == 0 and gone() == gone_before + 1,
               "the gateway to count the client as gone", timeout=30)
    assert router_metric("autoglm_generated_tokens_total") - generated < 120


def test_a_generation_finishes_on_the_slot_it_started_on(served: Served) -> None:
    """A flip mid-stream moves new requests only; the open stream ends on its slot, and the
    slot counts it in flight until its last token."""
    gw = served.gateway.gateway
    before = gw.routing.active
    assert before is not None
    _, text, _ = served.expect(100, text="Swap")
    elsewhere = Target("b", 2, f"http://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                       model=MODEL)
    client = served.client()
    try:
        stream = client.completions.create(model=MODEL, prompt="Swap", max_tokens=100,
                                           stream=True, **GREEDY)
        chunks = iter(stream)
        got = next(chunks).choices[0].text
        gw.routing.flip(elsewhere)
        assert gw.inflight.get("a") == 1
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model=MODEL, prompt="new", max_tokens=2)
        assert err.value.status_code == 503
        got += "".join(c.choices[0].text for c in chunks if c.choices)
        assert got == text
        # it leaves right after its last write ([DONE]), which the client may see first
        eventually(lambda: gw.inflight.get("a") == 0, "the finished generation to leave",
                   timeout=30, interval=0.01)
    finally:
        gw.routing.flip(before)


def test_unknown_v1_path_and_other_models_generate(served: Served) -> None:
    status, raw = post(f"{served.base}/v1/embeddings", {"input": "x"})
    assert status == 404 and json.loads(raw)["error"]["code"] == "unknown_url"
    # any other model's generate is the router's own answer, forwarded as before
    router = served.plane.router
    assert router is not None
    status, raw = post(f"{served.base}/v2/models/router/generate", {})
    want_status, want = post(f"http://{router.http_url}/v2/models/router/generate", {})
    assert status == want_status and json.loads(raw).keys() == json.loads(want).keys()
    assert json.loads(raw).get("model_name") == "router"



def test_a_stream_interval_sends_the_same_tokens_four_a_response(
        served: Served, tmp_path: Path) -> None:
    """A second router on the same expert servers with ``spec.router.streamInterval`` 4: the
    same greedy tokens and text as the first (interval 1), the first token alone, then 4 a
    response, the rest with the last; every API's text, usage and stop strings as before;
    the latency histograms still count every token."""
    with second_router(served, tmp_path, {STREAM_INTERVAL_ENV: "4"}) as (base, metrics_url):
        check_interval_four(served, base, metrics_url)


@contextlib.contextmanager
def second_router(served: Served, tmp_path: Path,
                  env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """A router with ``env`` on the served expert servers, behind a gateway of its own: the
    gateway's base URL and the router's metrics URL."""
    (tmp_path / "endpoints.json").symlink_to(served.plane.endpoints_file)  # its servers
    plane = DataPlane(served.plane.repository, 1, tmp_path, router_env=env)
    router = plane.start_router()
    try:
        gateway = GatewayServer(Routing(Target("a", 1, f"http://{router.http_url}",
                                               router.grpc_url, model=MODEL)),
                                free_port()).start()
        try:
            yield f"http://127.0.0.1:{gateway.port}", router.metrics_url
        finally:
            gateway.stop()
    finally:
        plane.stop()


def check_interval_four(served: Served, base: str, metrics_url: str) -> None:
    def counts() -> tuple[float, float]:
        text = scrape(metrics_url)
        first, later = (sample(text, f"autoglm_{name}_seconds_count", version="1") or 0.0
                        for name in ("time_to_first_token", "inter_token_latency"))
        return first, later

    ids, text, _ = served.expect(24, text="Hello there")
    body: dict[str, Any] = {"text_input": "Hello there",
            "parameters": {"max_tokens": 24, "temperature": 0, "ignore_eos": True}}
    status, raw = post(f"{served.base}/v2/models/generate/generate_stream", body)
    assert status == 200
    one = events(raw)  # interval 1: a token a response
    assert [len(e["output_ids"]) for e in one] == [1] * 24
    assert [t for e in one for t in e["output_ids"]] == ids
    before = counts()
    status, raw = post(f"{base}/v2/models/generate/generate_stream", body)
    assert status == 200
    four = events(raw)
    assert [len(e["output_ids"]) for e in four] == [1, 4, 4, 4, 4, 4, 3]
    assert [e["completion_tokens"] for e in four] == [1, 5, 9, 13, 17, 21, 24]
    assert [t for e in four for t in e["output_ids"]] == ids
    assert "".join(e["text_output"] for e in four) == "".join(e["text_output"] for e in one) \
        == text
    assert [e["finish_reason"] for e in four] == [""] * 6 + ["length"]
    # the histograms time tokens as they are made, not responses
    eventually(lambda: counts() == (before[0] + 1, before[1] + 23),
               "1 first token and 23 later ones observed", timeout=30)
    status, raw = post(f"{base}/v2/models/generate/generate", body)
    assert status == 200 and json.loads(raw)["output_ids"] == ids

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    chunks = list(client.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=24, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=24, **GREEDY)
    assert r.choices[0].text == text and r.usage is not None \
        and r.usage.completion_tokens == 24
    # a stop string inside a burst: the text ends before it, as with one token a response
    stop = next(text[i:i + 3] for i in range(6, len(text) - 3) if text[i:i + 3].strip())
    by: dict[str, tuple[str, str | None]] = {}
    for name, url in (("one", served.base), ("four", base)):
        parts = list(openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                     .completions.create(model=MODEL, prompt="Hello there", max_tokens=24,
                                         stop=[stop], stream=True, **GREEDY))
        by[name] = ("".join(c.choices[0].text for c in parts if c.choices),
                    [c.choices[0].finish_reason for c in parts if c.choices][-1])
    assert by["four"] == by["one"] == (text[:text.index(stop)], "stop")
    # a client that goes away with tokens held back: its sequence ends all the same
    kv = "autoglm_kv_cache_used_tokens"
    port = int(base.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v2/models/generate/generate_stream", json.dumps(
            {**body, "parameters": {**body["parameters"], "max_tokens": 120}}),
            {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
    finally:
        conn.close()
    eventually(lambda: sample(scrape(metrics_url), kv, version="1") == 0,
               "the sequence's KV cache to be freed", timeout=30, interval=0.05)
    r2 = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=24, **GREEDY)
    assert r2.choices[0].text == text, "the router serves on"


# A router that runs one generation at a time (its KV cache holds one: 128 tokens, as the
# tiny model's context window) with one more waiting: a third at once is refused.
SATURATING = {"AUTOGLM_MAX_WAITING": "1", "AUTOGLM_KV_CAPACITY_TOKENS": "128"}
SATURATING_TOKENS = 80
CHAT: list[dict[str, str]] = [{"role": "user", "content": "Hi"}]
# Every HTTP surface that starts a generation: (path, body, streamed, OpenAI's shape).
SURFACES: list[tuple[str, dict[str, Any], bool, bool]] = [
    (f"/v1/{path}", {"model": MODEL, **prompt, "max_tokens": SATURATING_TOKENS,
                     "temperature": 0, "ignore_eos": True, "stream": stream}, stream, True)
    for path, prompt in (("completions", {"prompt": "Once"}), ("chat/completions",
                                                                {"messages": CHAT}))
    for stream in (False, True)] + [
    (f"/v2/models/generate/{path}", {"text_input": "Once", "parameters": {
        "max_tokens": SATURATING_TOKENS, "temperature": 0, "ignore_eos": True}},
     path.endswith("stream"), False) for path in ("generate", "generate_stream")]


def test_saturation_is_429_with_retry_after_then_served_on_retry(
        served: Served, tmp_path: Path) -> None:
    """A router on the same expert servers with ``AUTOGLM_MAX_WAITING=1`` and room for one
    running generation: a burst on each surface gets 200s and 429s only; each 429 (a
    stream's too, before any event) carries ``Retry-After`` and the surface's error shape,
    the stock client raises ``RateLimitError``, the gateway counts code 429, and every
    refused request gets the engine's tokens when retried."""
    with second_router(served, tmp_path, SATURATING) as (base, _):
        check_saturation(served, base)


def request(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a POST."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), bytes(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), bytes(e.read())


def check_saturation(served: Served, base: str) -> None:
    def refused_total() -> float:
        return sample(scrape(f"{base}/metrics"), "autoglm_gateway_requests_total", slot="a",
                      code="429") or 0.0

    _, text, _ = served.expect(SATURATING_TOKENS, text="Once")
    _, chat_text, _ = served.expect(SATURATING_TOKENS, messages=CHAT)

    def check_served(path: str, stream: bool, openai_shape: bool, raw: bytes) -> None:
        """A 200: the whole of the engine's greedy text."""
        want = chat_text if "chat" in path else text
        if not stream:
            answer = json.loads(raw)
            got = answer["text_output"] if not openai_shape else (
                answer["choices"][0]["message"]["content"] if "chat" in path
                else answer["choices"][0]["text"])
        else:
            got_events = events(raw)
            assert not any("error" in e for e in got_events if isinstance(e, dict)), raw
            if openai_shape:
                assert got_events[-1] == "[DONE]"
                got = "".join((c["choices"][0]["delta"].get("content") or "")
                              if "chat" in path else c["choices"][0]["text"]
                              for c in got_events[:-1])
            else:
                got = "".join(e["text_output"] for e in got_events)
        assert got == want, (path, stream)

    refused_before, refused = refused_total(), 0
    for path, body, stream, openai_shape in SURFACES:
        n = 4
        burst = threading.Barrier(n)

        def one(_: int, path: str = path, body: dict[str, Any] = body,
                burst: threading.Barrier = burst) -> tuple[int, dict[str, str], bytes]:
            burst.wait()
            return request(f"{base}{path}", body)

        with ThreadPoolExecutor(n) as pool:
            got = list(pool.map(one, range(n)))
        statuses = sorted(status for status, _, _ in got)
        # one runs, one waits, the rest arrive while they do: nothing else fails
        assert set(statuses) <= {200, 429}, (path, stream, got)
        assert statuses.count(429) >= 1 and statuses.count(200) >= 1, (path, stream, got)
        for status, headers, raw in got:
            if status == 200:
                check_served(path, stream, openai_shape, raw)
                continue
            refused += 1
            assert headers["Retry-After"] == "1"
            assert headers["Content-Type"].startswith("application/json")  # no SSE at all
            if openai_shape:
                error = json.loads(raw)["error"]
                assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
                assert error["param"] is None
                message = error["message"]
            else:
                message = json.loads(raw)["error"]
            assert message.startswith("saturated: ") and "retry in 1 s" in message, message
            # the others have finished: the retry is served
            status, _, raw = request(f"{base}{path}", body)
            assert status == 200, (path, stream, raw)
            check_served(path, stream, openai_shape, raw)
    eventually(lambda: refused_total() == refused_before + refused,
               f"the gateway to count {refused} refusals as 429", timeout=10)

    # the stock client: RateLimitError, then the same call succeeds
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    stock_start = threading.Barrier(4)

    def stock(i: int) -> str:
        stock_start.wait()
        try:
            return stock_call(client, i)
        except openai.RateLimitError as e:
            assert e.status_code == 429 and e.response.headers["Retry-After"] == "1"
            assert e.code == "rate_limit_exceeded" and e.type == "requests"
            return "refused"

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(stock, range(4)))
    assert "refused" in answers and any(a != "refused" for a in answers), answers
    for i, a in enumerate(answers):
        want = chat_text if i % 2 else text
        assert a in ("refused", want), (i, a)
        if a == "refused":
            assert stock_call(client, i) == want


def stock_call(client: openai.OpenAI, i: int) -> str:
    """A streamed chat (odd ``i``) or a whole completion (even), greedy."""
    if i % 2:
        chunks: Any = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=SATURATING_TOKENS,  # type: ignore[arg-type]
            stream=True, **GREEDY)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=SATURATING_TOKENS,
                                  **GREEDY)
    return str(r.choices[0].text)


def test_generations_spread_over_router_replicas_and_follow_their_prefix(
        served: Served, tmp_path: Path) -> None:
    """A second router replica on the same expert servers, one gateway over both (as the
    local runtime and the EndpointSlices give it): a tenant's chats go back to the replica
    that holds its system prompt (that router counts prefix-cache hits), concurrent streams
    spread over both, and a replica taken out of the target gets no new request while its
    streams finish; every answer is the engine's."""
    (tmp_path / "endpoints.json").symlink_to(served.plane.endpoints_file)
    plane = DataPlane(served.plane.repository, 1, tmp_path)
    second = plane.start_router()
    first = served.plane.router
    assert first is not None
    both = tuple(Replica(f"http://{r.http_url}", r.grpc_url, r.metrics_url)
                 for r in (first, second))
    routing = Routing(Target("a", 1, both[0].url, both[0].grpc_url, MODEL, both))
    gateway = GatewayServer(routing, free_port()).start()
    base = f"http://127.0.0.1:{gateway.port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

    def hits() -> list[float]:
        return [sample(scrape(r.metrics_url), "autoglm_prefix_cache_hit_tokens_total",
                       version="1") or 0.0 for r in (first, second)]

    def sent() -> list[float]:
        text = scrape(f"{base}/metrics")
        return [sample(text, "autoglm_gateway_replica_requests_total", slot="a",
                       replica=r.url) or 0.0 for r in both]

    try:
        # two tenants, each with its system prompt (2 blocks of the gateway's index)
        tenants = [f"You answer for tenant {t}; be brief and exact. " * 2 for t in "AB"]
        before_hits, before_sent = hits(), sent()
        for n in range(4):
            for system in tenants:
                messages = [{"role": "system", "content": system},
                            {"role": "user", "content": f"Question {n}"}]
                _, text, _ = served.expect(4, messages=messages)
                r = client.chat.completions.create(
                    model=MODEL, messages=messages,  # type: ignore[arg-type]
                    max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
                assert r.choices[0].message.content == text
        picks = gateway.gateway.hub.balancer.picks
        assert picks["prefix"] == 6, picks  # each tenant's first chat picked by load only
        # the replicas' own caches say so: each tenant's later chats hit there
        gained = [a - b for a, b in zip(hits(), before_hits, strict=True)]
        assert sum(gained) > 0 and all(g >= 0 for g in gained), gained
        print(f"prefix-cache hit tokens per replica: {gained}; "
              f"requests per replica: {[a - b for a, b in zip(sent(), before_sent, strict=True)]}")

        # eight concurrent streams spread over both replicas
        before_sent = sent()
        prompts = [f"Story {i}:" for i in range(8)]
        want = [served.expect(24, text=p)[1] for p in prompts]

        def stream(prompt: str) -> str:
            chunks = client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in chunks)

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(stream, prompts)) == want
        spread = [a - b for a, b in zip(sent(), before_sent, strict=True)]
        assert sum(spread) == 8 and min(spread) >= 2, spread

        # the second replica leaves the target (a scale-down): its streams finish there,
        # new requests go to the first only
        only = {r: Target("a", 1, r.url, r.grpc_url, MODEL, (r,)) for r in both}
        routing.flip(only[both[1]])
        before_sent = sent()
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(stream, p) for p in prompts[:2]]
            eventually(lambda: sent()[1] - before_sent[1] == 2, "two streams on replica 2")
            routing.flip(only[both[0]])
            draining = gateway.gateway.hub.balancer.inflight.get(both[1], 0)
            assert stream(prompts[5]) == want[5]
            assert [f.result() for f in running] == want[:2]
        after = [a - b for a, b in zip(sent(), before_sent, strict=True)]
        assert after == [1, 2], after
        assert gateway.gateway.hub.balancer.inflight.get(both[1], 0) == 0
        print(f"streams still running on the replica taken out: {draining} of 2")
    finally:
        gateway.stop()
        plane.stop()


def test_a_full_replica_passes_its_generations_to_another(served: Served,
                                                          tmp_path: Path) -> None:
    """Two router replicas, one of them with room for one generation and one waiting: a
    burst of streams gets no 429 (what the full replica refuses goes to the other, counted
    as retries), and every answer is the engine's; a 429 needs every replica full (the
    saturation test above, on one)."""
    (tmp_path / "endpoints.json").symlink_to(served.plane.endpoints_file)
    plane = DataPlane(served.plane.repository, 1, tmp_path, router_env=SATURATING)
    full = plane.start_router()
    first = served.plane.router
    assert first is not None
    both = tuple(Replica(f"http://{r.http_url}", r.grpc_url, r.metrics_url)
                 for r in (full, first))
    gateway = GatewayServer(Routing(Target("a", 1, both[0].url, both[0].grpc_url, MODEL,
                                           both)), free_port()).start()
    base = f"http://127.0.0.1:{gateway.port}"
    try:
        _, want, _ = served.expect(SATURATING_TOKENS, text="Once")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

        def one(_: int) -> str:
            chunks = client.completions.create(
                model=MODEL, prompt="Once", max_tokens=SATURATING_TOKENS, temperature=0,
                stream=True, extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in chunks)

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(one, range(6))) == [want] * 6  # no RateLimitError
        text = scrape(f"{base}/metrics")
        assert (sample(text, "autoglm_gateway_requests_total", slot="a", version="1",
                       code="429") or 0.0) == 0
        retried = sample(text, "autoglm_gateway_retries_total", slot="a") or 0.0
        assert retried >= 1, text  # the full replica refused some
        print(f"6 streams on a full replica and a free one: 0 refused, {retried:g} retried")
    finally:
        gateway.stop()
        plane.stop()
