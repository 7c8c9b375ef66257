"""Server-sent event streams through the gateway on real tritonserver processes: a streamed
generation that waits (the router's KV cache is full of another) gets ``: keep-alive``
comments before its first event, which the stock ``openai`` client ignores; a client that
stops reading is cut after the write timeout, its sequence freed upstream and counted as 499.
The gateway reads both settings from its environment at each stream. Without Triton: each
of the write timeout's two bounds (the kernel's, the event loop's) alone cuts a stalled
reader of an :class:`EventStream`."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from aiohttp import web
from test_gateway_generate import (
    GREEDY,
    MODEL,
    Served,
    events,
    sample,
    scrape,
    second_router,
    served,
)

from autoglm.gateway import sse
from autoglm.gateway.routing import Limits
from autoglm.gateway.sse import HEARTBEAT, ClientStalled, EventStream
from autoglm.testing import eventually
from autoglm.triton import TritonServer

__all__ = ["served"]  # the module's fixture, shared with test_gateway_generate

HEARTBEAT_ENV, WRITE_TIMEOUT_ENV = (Limits.ENV[k] for k in ("heartbeat_seconds",
                                                                    "write_timeout"))
# A router whose KV cache holds one generation (128 tokens, the tiny model's context
# window): a second one waits until the first ends.
ONE_AT_A_TIME = {"AUTOGLM_KV_CAPACITY_TOKENS": "128"}
HOLDING_TOKENS = 120  # the first one's, "Once" and these: 122 tokens
WAITING_TOKENS = 24  # the second's: with its prompt, more than the 6 left


class Recording(httpx2.HTTPTransport):
    """An HTTP transport that keeps every response body's bytes as they arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = bytearray()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = super().handle_request(request)
        stream = response.stream
        assert isinstance(stream, httpx2.SyncByteStream)
        inner, raw = stream, self.raw

        class Tee(httpx2.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for chunk in inner:
                    raw.extend(chunk)
                    yield chunk

            def close(self) -> None:
                inner.close()

        response.stream = Tee()
        return response


def before_first_event(raw: bytes) -> list[str]:
    """The blocks of a server-sent event stream before its first ``data:`` event."""
    out: list[str] = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            return out
        out.append(block)
    raise AssertionError(f"no event in {raw!r}")


def hold_the_engine(base: str) -> http.client.HTTPConnection:
    """A streamed generation of ``HOLDING_TOKENS`` on ``base``, running once this returns
    (its first event read); the caller closes it."""
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "Once", "max_tokens": HOLDING_TOKENS, "stream": True,
         "temperature": 0, "ignore_eos": True}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    while True:  # heartbeats, while the last one ends
        line = r.readline()
        assert line, "the holding stream ended before its first event"
        if line.startswith(b"data: "):
            return conn


@pytest.mark.triton
def test_a_stream_that_waits_gets_heartbeats(served: Served, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """On a router busy with another generation, each streamed surface's request waits: its
    stream opens (200) with ``: keep-alive`` comments, one per heartbeat interval without an
    event, then carries the engine's tokens; the stock client reads it as usual."""
    monkeypatch.setenv(HEARTBEAT_ENV, "0.2")
    _, text, _ = served.expect(WAITING_TOKENS, text="Hello there")
    chat = [{"role": "user", "content": "Hi"}]
    _, chat_text, _ = served.expect(WAITING_TOKENS, messages=chat)
    with second_router(served, tmp_path, ONE_AT_A_TIME) as (base, _):
        # the stock client, completions then chat, every byte it read recorded
        for kind in ("completions", "chat"):
            recording = Recording()
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                                   http_client=httpx2.Client(transport=recording))
            holder = hold_the_engine(base)
            try:
                if kind == "chat":
                    chunks: Any = client.chat.completions.create(
                        model=MODEL, messages=chat,  # type: ignore[arg-type]
                        max_tokens=WAITING_TOKENS, stream=True, **GREEDY)
                    assert "".join(c.choices[0].delta.content or "" for c in chunks
                                   if c.choices) == chat_text
                else:
                    chunks = client.completions.create(
                        model=MODEL, prompt="Hello there", max_tokens=WAITING_TOKENS,
                        stream=True, **GREEDY)
                    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
            finally:
                holder.close()
                client.close()
            head = before_first_event(bytes(recording.raw))
            assert head and all(b == HEARTBEAT.decode().strip() for b in head), (kind, head)
            assert events(bytes(recording.raw))[-1] == "[DONE]"
        # Triton's generate_stream
        holder = hold_the_engine(base)
        try:
            conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
            conn.request("POST", "/v2/models/generate/generate_stream", json.dumps(
                {"text_input": "Hello there", "parameters": {
                    "max_tokens": WAITING_TOKENS, "temperature": 0, "ignore_eos": True}}),
                {"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
            raw = r.read()
            conn.close()
        finally:
            holder.close()
        head = before_first_event(raw)
        assert head and all(b == HEARTBEAT.decode().strip() for b in head), head
        answers = events(raw)
        assert "".join(e["text_output"] for e in answers) == text
        assert answers[-1]["finish_reason"] == "length"


STALLED: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 120, "stream": True,
                         "temperature": 0, "ignore_eos": True}),
    ("/v2/models/generate/generate_stream", {"text_input": "Once", "parameters": {
        "max_tokens": 120, "temperature": 0, "ignore_eos": True}}),
]


@contextlib.contextmanager
def frozen(server: TritonServer) -> Iterator[None]:
    """The server's processes stopped (SIGSTOP) for the block: its generations pause."""
    assert server.popen is not None
    os.killpg(server.popen.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(server.popen.pid, signal.SIGCONT)


@pytest.mark.triton
@pytest.mark.parametrize(("path", "body"), STALLED, ids=["openai", "generate_stream"])
def test_a_reader_that_stops_reading_is_cut(served: Served, path: str, body: dict[str, Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends a streamed generation and never reads (its receive buffer the
    kernel's least, ~1 KB): once its buffer is full, it is cut after the write timeout while
    its generation still runs, its sequence freed before all its tokens are made, counted as
    499. (The router is paused once 20 events are written, so that the generation outlasts
    the timeout on any machine: 120 tokens take 1.5 s here.)"""
    monkeypatch.setenv(WRITE_TIMEOUT_ENV, "1")
    sent: list[int] = []
    send = EventStream.send

    async def counted(self: EventStream, payload: Mapping[str, Any] | str) -> None:
        await send(self, payload)
        sent.append(1)

    monkeypatch.setattr(EventStream, "send", counted)
    router = served.plane.router
    assert router is not None

    def router_metric(name: str) -> float:
        value = sample(scrape(router.metrics_url), name, version="1")
        assert value is not None, f"the router exports no {name}"
        return value

    def gone() -> float:
        text = scrape(f"{served.base}/metrics")
        return sample(text, "autoglm_gateway_requests_total", slot="a", code="499") or 0.0

    eventually(lambda: router_metric("autoglm_generate_running") == 0, "an idle router",
               timeout=30)
    generated, gone_before = router_metric("autoglm_generated_tokens_total"), gone()
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # before connecting
        sock.connect(("127.0.0.1", served.gateway.port))
        data = json.dumps(body).encode()
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
        # 20 events (~4 KB) fill its window: the rest waits at the gateway
        eventually(lambda: len(sent) >= 20, "20 events written", timeout=30, interval=0.01)
        with frozen(router):
            eventually(lambda: gone() == gone_before + 1,
                       "the gateway to cut the stalled reader (499)", timeout=60)
        eventually(lambda: router_metric("autoglm_generate_running") == 0,
                   "the sequence to be freed", timeout=30)
        assert router_metric("autoglm_generated_tokens_total") - generated < 120
    finally:
        sock.close()
    # the gateway and the router serve on
    r = served.client().completions.create(model=MODEL, prompt="ok", max_tokens=3, **GREEDY)
    assert r.usage is not None and r.usage.completion_tokens == 3


@pytest.mark.parametrize("kernel", [False, True], ids=["event-loop", "kernel"])
def test_a_write_that_cannot_drain_is_cut(monkeypatch: pytest.MonkeyPatch,
                                          kernel: bool) -> None:
    """Each of the two bounds alone cuts a stalled reader: the event loop's (the kernel's
    send buffer full, then the transport's, a write that cannot drain within the write
    timeout aborts the connection: :class:`ClientStalled`) and the kernel's
    (``TCP_USER_TIMEOUT``: the connection dies while the handler waits to write more)."""
    if not kernel:
        monkeypatch.setattr(sse, "_kernel_write_timeout", lambda *_: None)
    limits = Limits(heartbeat_seconds=3600, write_timeout=0.5)
    outcome: list[BaseException | str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        async with EventStream(request, limits) as events:
            try:
                # the kernel's: 16 KB, below the transport's high water (64 KiB), so no
                # write waits; the event loop's: 128 MB at most
                for _ in range(8) if kernel else range(2048):
                    await events.send({"pad": "x" * (2**11 if kernel else 2**16)})
                while kernel and request.transport is not None \
                        and not request.transport.is_closing():
                    await asyncio.sleep(0.05)
                outcome.append("closed" if kernel else "all written")
            except ConnectionError as e:
                outcome.append(e)
            return events.response

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"POST / HTTP/1.1\r\nHost: x\r\n"
                                          b"Content-Length: 0\r\n\r\n")
            async with asyncio.timeout(60):
                while not outcome:
                    await asyncio.sleep(0.05)
        finally:
            sock.close()
            await runner.cleanup()

    asyncio.run(main())
    if kernel:
        assert outcome == ["closed"]
    else:
        assert len(outcome) == 1 and isinstance(outcome[0], ClientStalled), outcome


def test_stream_limits_from_env() -> None:
    assert Limits.from_env({}) == Limits(heartbeat_seconds=5.0, write_timeout=30.0)
    assert Limits.from_env({HEARTBEAT_ENV: "0.2", WRITE_TIMEOUT_ENV: " 2 "}) == \
        Limits(heartbeat_seconds=0.2, write_timeout=2.0)
    with pytest.raises(ValueError, match=WRITE_TIMEOUT_ENV):
        Limits.from_env({WRITE_TIMEOUT_ENV: "soon"})
    with pytest.raises(ValueError, match="heartbeat_seconds must be positive"):
        Limits.from_env({HEARTBEAT_ENV: "0"})
