"""The gateway: a stable KServe v2 / Triton HTTP endpoint in front of the active slot.

Every request reads the active slot once, through one pointer that is replaced whole, so
it is served entirely by one slot; a flip never splits a request and never breaks a
client's keep-alive connection (those end here). In-flight requests are counted per slot,
which makes draining exact. Within the slot, requests are spread over its router replicas
(``balance``); a request whose upstream connection failed before any response is tried on
the next replica (on the only one: once more). Metrics:
``autoglm_gateway_requests_total{slot,version,code}``, a latency histogram and an in-flight
gauge per slot. The gRPC side (``grpc_proxy``) shares the pointer, the counts and the
metrics, as does text generation: the OpenAI-compatible ``/v1`` API
(``openai``) and Triton's generate extension (``triton_generate``), streamed from the slot's
``generate`` model over gRPC (``generation``), one generation counted until its last token.

Hostile clients are bounded (:class:`Limits`, each also an environment variable): a request
body over ``max_body_bytes`` is refused with 413 (on every route; on the gRPC side a message
over it is RESOURCE_EXHAUSTED); a connection that has not sent a whole request's headers
within ``idle_timeout`` of opening or of its last response is closed (keep-alive included),
and one whose body has not fully arrived within ``body_timeout`` gets 408 and is closed; at
most ``max_connections`` are open at once (past it a new one is answered 503 and closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from autoglm.gateway.balance import Load, engine_load
from autoglm.gateway.generation import GenerateClient
from autoglm.gateway.grpc_proxy import GrpcProxy
from autoglm.gateway.infer_check import HEADER_LENGTH, infer_refusal
from autoglm.gateway.openai import OpenAIRoutes
from autoglm.gateway.openai import error as openai_error
from autoglm.gateway.routing import Hub, Limits, Replica, Routing, Target
from autoglm.gateway.triton_generate import GenerateRoutes

__all__ = ["GatewayServer", "Limits", "Replica", "Routing", "Target"]

# Headers that describe one hop's connection or body, not the request (RFC 9110 §7.6.1).
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length",
               "upgrade", "te", "trailer", "proxy-connection"}
# ... and the body's encoding: aiohttp decodes a compressed request body as it reads it, so
# what goes upstream is the decoded body
NOT_FORWARDED = HOP_HEADERS | {"content-encoding"}
RETRYABLE = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError)
log = logging.getLogger("autoglm.gateway")
# Triton's answers (as 500) to a request whose JSON does not parse or has the wrong types
LOAD_POLL_SECONDS = 0.25  # the routers' gauges change at most every flush (0.5 s)
TRITON_PARSE_ERROR = re.compile(r"^(failed to parse the request JSON buffer|Unable to parse )")


class Gateway:
    def __init__(self, routing: Routing, upstream_timeout: float = 60.0,
                 limits: Limits | None = None) -> None:
        self.hub = Hub(routing, Limits.from_env() if limits is None else limits,
                       upstream_timeout)
        self.routing, self.limits, self.traffic = routing, self.hub.limits, self.hub.traffic
        self.registry = self.traffic.registry
        self.timeout = aiohttp.ClientTimeout(total=upstream_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self.generate = GenerateClient(self.hub)  # gRPC streams to the routers' `generate`

    @property
    def inflight(self) -> dict[str, int]:
        return self.traffic.inflight

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body_bytes,
                              middlewares=[self._bounded])
        app.router.add_get("/v2/health/live", self._live)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/routing", self._routing)
        # generation before the catch-all, which keeps forwarding everything else as it is
        OpenAIRoutes(self.generate).add_to(app.router)
        GenerateRoutes(self.generate, self.forward).add_to(app.router)
        app.router.add_route("*", "/v2{tail:.*}", self._forward)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            timeout=self.timeout, connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False)
        self._poller = asyncio.create_task(self._poll_loads())

    async def _close(self, _: web.Application) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._session is not None:
            await self._session.close()
        await self.generate.close()

    @web.middleware
    async def _bounded(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                       ) -> web.StreamResponse:
        """Every request's body read whole here, within the limits, before its handler."""
        limit = self.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            # refused before reading: the connection ends (after a bounded lingering read)
            return _refusal(request, 413, f"the request body is larger than {limit} bytes")
        if request.body_exists:
            try:
                async with asyncio.timeout(self.limits.body_timeout):
                    await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _refusal(request, 413, f"the request body is larger than {limit} bytes")
            except TimeoutError:
                return _refusal(request, 408, "the request body did not arrive within "
                                f"{self.limits.body_timeout:g} s")
            except ConnectionError:
                raise  # the client went away: nobody to answer
            except Exception as e:  # a malformed body (chunked or compressed encoding)
                return _refusal(request, 400, f"cannot read the request body: {e}")
        return await handler(request)

    async def _live(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def _routing(self, _: web.Request) -> web.Response:
        t = self.routing.active
        body = ({"slot": t.slot, "version": t.version, "url": t.url,
                 "replicas": [r.url for r in t.endpoints]} if t else None)
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
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in NOT_FORWARDED}
        # Ask the router for exactly the encoding the client asked for (aiohttp would
        # otherwise request gzip and hand a client that cannot read it a compressed body).
        headers.setdefault("Accept-Encoding", "identity")
        self.traffic.enter(target.slot)
        status, t0 = 502, time.perf_counter()
        try:
            refusal = (infer_refusal(body, request.headers.get(HEADER_LENGTH))
                       if request.method == "POST" and request.path.endswith("/infer")
                       else None)
            if refusal is not None:
                status = 400
                return _error(400, refusal)
            response = await self._upstream(target, request, body, headers)
            status = response.status
            return response
        finally:
            self.traffic.leave(target, str(status), time.perf_counter() - t0)

    async def _upstream(self, target: Target, request: web.Request, body: bytes,
                        headers: dict[str, str]) -> web.Response:
        assert self._session is not None
        failure = ""
        for replica in self.hub.tries(target):
            url = replica.url + request.rel_url.path_qs
            try:
                with self.hub.sending(target, replica):
                    async with self._session.request(request.method, url, data=body,
                                                     headers=headers) as up:
                        payload = await up.read()
                        out = {k: v for k, v in up.headers.items()
                               if k.lower() not in HOP_HEADERS}
                        return web.Response(status=_client_error(up.status, payload),
                                            body=payload, headers=out)
            except RETRYABLE as e:
                # nothing came back: the router never answered, so trying again is safe
                failure = str(e)
            except TimeoutError:
                return _error(504, f"slot {target.slot} did not answer in time")
            except aiohttp.ClientError as e:  # the connection broke mid-answer
                return _error(502, f"slot {target.slot} unavailable: its answer broke off: "
                                   f"{e!r}")
        return _error(502, f"slot {target.slot} unreachable: {failure}")

    async def _poll_loads(self) -> None:
        """Each active replica's own load (running + waiting sequences), read from its
        metrics every ``LOAD_POLL_SECONDS``: the balancer's view of other gateways' calls."""
        assert self._session is not None
        while True:
            target = self.routing.active
            replicas = target.replicas if target else ()
            self.hub.balancer.forget(replicas)
            if len(replicas) > 1:
                loads = await asyncio.gather(*(self._load(r) for r in replicas))
                for replica, load in zip(replicas, loads, strict=True):
                    self.hub.balancer.report(replica, load)
            await asyncio.sleep(LOAD_POLL_SECONDS)

    async def _load(self, replica: Replica) -> Load | None:
        if not replica.metrics_url:
            return None
        assert self._session is not None
        try:
            async with self._session.get(replica.metrics_url,
                                         timeout=aiohttp.ClientTimeout(total=1)) as r:
                text = (await r.read()).decode()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return None
        return engine_load(text)


def _client_error(status: int, payload: bytes) -> int:
    """``status``, but 400 for Triton's 500 that refuses a malformed request: its HTTP
    frontend answers 500 when a request's JSON does not parse or has the wrong types."""
    if status != 500 or len(payload) > 4096:
        return status
    try:
        message = json.loads(payload).get("error")
    except (ValueError, AttributeError):
        return status
    return 400 if isinstance(message, str) and TRITON_PARSE_ERROR.match(message) else status


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": message}),
                        content_type="application/json")


def _refusal(request: web.Request, status: int, message: str) -> web.Response:
    """A refusal of the request as a whole, in its API's error shape; the connection ends."""
    if request.path.startswith("/v1"):
        response = openai_error(status, message)
    else:
        response = _error(status, message)
    response.force_close()
    return response


class _Refuse(asyncio.Protocol):
    """A connection past ``max_connections``: 503 and closed at once."""

    BODY = json.dumps({"error": "too many connections"}).encode()
    ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nRetry-After: 1\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.ANSWER)
        transport.close()


class _BoundedSite(web.TCPSite):
    """A TCP site that serves at most ``max_connections`` connections of its runner at once."""

    def __init__(self, runner: web.AppRunner, host: str, port: int,
                 max_connections: int) -> None:
        super().__init__(runner, host, port)
        self.max_connections = max_connections
        self.refused = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None

        def connection() -> asyncio.BaseProtocol:
            if len(server.connections) >= self.max_connections:
                self.refused += 1
                return _Refuse()
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            connection, self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)


class GatewayServer:
    """The gateway on its own event loop in a thread; metrics also on ``metrics_port``,
    Triton's gRPC protocol on ``grpc_port``."""

    def __init__(self, routing: Routing, port: int, host: str = "127.0.0.1",
                 metrics_port: int | None = None, grpc_port: int | None = None,
                 limits: Limits | None = None) -> None:
        self.gateway = Gateway(routing, limits=limits)
        self.host, self.port, self.metrics_port = host, port, metrics_port
        self.grpc_port = grpc_port
        self.grpc = GrpcProxy(self.gateway.hub)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="gateway")
        self._runner: web.AppRunner | None = None

    def _run(self, coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
        asyncio.run_coroutine_threadsafe(coro(), self._loop).result(timeout=30)

    def start(self) -> GatewayServer:
        self._thread.start()

        async def up() -> None:
            limits = self.gateway.limits
            # keep-alive: the time to a request's whole headers, from the connection's start
            # or its last response (aiohttp closes the connection then if still waiting)
            self._runner = web.AppRunner(self.gateway.app(), access_log=None,
                                         keepalive_timeout=limits.idle_timeout)
            await self._runner.setup()
            for port in (self.port, self.metrics_port):
                if port:
                    await _BoundedSite(self._runner, self.host, port,
                                       limits.max_connections).start()
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
