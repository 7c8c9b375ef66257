"""The gateway: a stable KServe v2 / Triton HTTP endpoint in front of the active slot.

Every request reads the active slot once, through one pointer that is replaced whole, so
it is served entirely by one slot; a flip never splits a request and never breaks a
client's keep-alive connection (those end here). In-flight requests are counted per slot,
which makes draining exact. A request whose upstream connection failed before any response
is retried once. Metrics: ``autoglm_gateway_requests_total{slot,version,code}``, a latency
histogram and an in-flight gauge per slot. The gRPC side (``grpc_proxy``) shares the pointer,
the counts and the metrics, as does text generation: the OpenAI-compatible ``/v1`` API
(``openai``) and Triton's generate extension (``triton_generate``), streamed from the slot's
``generate`` model over gRPC (``generation``), one generation counted until its last token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from autoglm.gateway.generation import GenerateClient
from autoglm.gateway.grpc_proxy import GrpcProxy
from autoglm.gateway.openai import OpenAIRoutes
from autoglm.gateway.triton_generate import GenerateRoutes

# Headers that describe one hop's connection or body, not the request (RFC 9110 §7.6.1).
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length",
               "upgrade", "te", "trailer", "proxy-connection"}
RETRYABLE = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError)


@dataclass(frozen=True)
class Target:
    """A slot's router: where requests go while the slot is active."""

    slot: str
    version: int
    url: str  # http://host:port of the router's Triton HTTP endpoint
    grpc_url: str = ""  # host:port of its Triton gRPC endpoint ("": no gRPC)
    model: str = ""  # the served model's name (spec.model.name): the OpenAI model id


class Routing:
    """The active-slot pointer. Assignment of one attribute is atomic for the event loop
    and for threads alike; readers take one snapshot per request."""

    def __init__(self, target: Target | None = None) -> None:
        self.active = target
        self.changed = threading.Event()

    def flip(self, target: Target) -> None:
        self.active = target
        self.changed.set()


class Gateway:
    def __init__(self, routing: Routing, upstream_timeout: float = 60.0) -> None:
        self.routing = routing
        self.timeout = aiohttp.ClientTimeout(total=upstream_timeout)
        self.registry = CollectorRegistry()
        self.requests = Counter("autoglm_gateway_requests_total",
                                "Requests by slot, model version and HTTP status",
                                ["slot", "version", "code"], registry=self.registry)
        self.latency = Histogram("autoglm_gateway_request_seconds",
                                 "Request latency through the gateway", ["slot", "version"],
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.inflight_gauge = Gauge("autoglm_gateway_inflight",
                                    "Requests in flight per slot", ["slot"],
                                    registry=self.registry)
        self.inflight: dict[str, int] = {}
        self.retries = Counter("autoglm_gateway_retries_total",
                               "Requests retried after the upstream connection failed",
                               ["slot"], registry=self.registry)
        self._session: aiohttp.ClientSession | None = None
        self.generate = GenerateClient(routing)  # gRPC streams to the routers' `generate`

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 2**20)
        app.router.add_get("/v2/health/live", self._live)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/routing", self._routing)
        # generation before the catch-all, which keeps forwarding everything else as it is
        OpenAIRoutes(self).add_to(app.router)
        GenerateRoutes(self).add_to(app.router)
        app.router.add_route("*", "/v2{tail:.*}", self._forward)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            timeout=self.timeout, connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False)

    async def _close(self, _: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
        await self.generate.close()

    async def _live(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def _routing(self, _: web.Request) -> web.Response:
        t = self.routing.active
        body = {"slot": t.slot, "version": t.version, "url": t.url} if t else None
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def forward(self, request: web.Request) -> web.Response:
        """The request as it is to the active slot's router (KServe v2 / Triton HTTP)."""
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.Response:
        target = self.routing.active  # one snapshot: this request stays on this slot
        if target is None:
            return _error(503, "no active slot")
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        # Ask the router for exactly the encoding the client asked for (aiohttp would
        # otherwise request gzip and hand a client that cannot read it a compressed body).
        headers.setdefault("Accept-Encoding", "identity")
        self.enter(target.slot)
        status, t0 = 502, time.perf_counter()
        try:
            response = await self._upstream(target, request, body, headers)
            status = response.status
            return response
        finally:
            self.leave(target, str(status), time.perf_counter() - t0)

    def enter(self, slot: str) -> None:
        """A request (HTTP or gRPC) starts on ``slot``; only ever on the event loop."""
        self.inflight[slot] = self.inflight.get(slot, 0) + 1
        self.inflight_gauge.labels(slot).set(self.inflight[slot])

    def leave(self, target: Target, code: str, seconds: float) -> None:
        slot, version = target.slot, str(target.version)
        self.inflight[slot] -= 1
        self.inflight_gauge.labels(slot).set(self.inflight[slot])
        self.latency.labels(slot, version).observe(seconds)
        self.requests.labels(slot, version, code).inc()

    async def _upstream(self, target: Target, request: web.Request, body: bytes,
                        headers: dict[str, str]) -> web.Response:
        assert self._session is not None
        url = target.url + request.rel_url.path_qs
        for attempt in (1, 2):
            try:
                async with self._session.request(request.method, url, data=body,
                                                 headers=headers) as up:
                    payload = await up.read()
                    out = {k: v for k, v in up.headers.items()
                           if k.lower() not in HOP_HEADERS}
                    return web.Response(status=up.status, body=payload, headers=out)
            except RETRYABLE as e:
                # nothing came back: the router never answered, so trying again is safe
                if attempt == 2:
                    return _error(502, f"slot {target.slot} unreachable: {e}")
                self.retries.labels(target.slot).inc()
            except TimeoutError:
                return _error(504, f"slot {target.slot} did not answer in time")
        raise AssertionError("unreachable")


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": message}),
                        content_type="application/json")


class GatewayServer:
    """The gateway on its own event loop in a thread; metrics also on ``metrics_port``,
    Triton's gRPC protocol on ``grpc_port``."""

    def __init__(self, routing: Routing, port: int, host: str = "127.0.0.1",
                 metrics_port: int | None = None, grpc_port: int | None = None) -> None:
        self.gateway = Gateway(routing)
        self.host, self.port, self.metrics_port = host, port, metrics_port
        self.grpc_port = grpc_port
        self.grpc = GrpcProxy(self.gateway)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="gateway")
        self._runner: web.AppRunner | None = None

    def _run(self, coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
        asyncio.run_coroutine_threadsafe(coro(), self._loop).result(timeout=30)

    def start(self) -> GatewayServer:
        self._thread.start()

        async def up() -> None:
            self._runner = web.AppRunner(self.gateway.app(), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, self.host, self.port).start()
            if self.metrics_port:
                await web.TCPSite(self._runner, self.host, self.metrics_port).start()
            if self.grpc_port:
                await self.grpc.start(self.host, self.grpc_port)

        try:
            self._run(up)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._runner is not None:
            runner = self._runner

            async def down() -> None:
                await self.grpc.stop()
                await runner.cleanup()

            with contextlib.suppress(Exception):
                self._run(down)
            self._runner = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()
