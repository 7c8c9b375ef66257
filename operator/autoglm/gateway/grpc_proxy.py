"""The gateway's gRPC side: Triton's ``inference.GRPCInferenceService`` forwarded as raw
bytes to the active slot's router, so stock ``tritonclient.grpc`` works unchanged.

Messages are not decoded on the way: each method is registered without (de)serializers,
with its arity taken from the service descriptor (ModelStreamInfer is the one stream-stream
method). Only a stream's requests are parsed, to refuse one that is not a
``ModelInferRequest`` (INVALID_ARGUMENT) before it goes upstream: tritonserver 2.51 fails the
whole stream INTERNAL on one (measured).
As on the HTTP side, a unary call reads the active slot once and is served entirely by it, is
counted in flight for that slot (exact drain) and in the same metrics, its status as the
equivalent HTTP ``code`` (OK is 200, so ``code!~"2.."`` stays the error rate of both
protocols). A unary call goes to the least busy of the slot's router replicas; one that
ends UNAVAILABLE (the router unreachable or its connection lost; Triton also answers so when
it served nothing) is tried on the next replica (on the only one: once more), then fails
UNAVAILABLE naming the slot. A stream's leg picks its replica when it opens.

A ``ModelStreamInfer`` stream carries independent requests, so each request goes to the slot
active when it arrives: the stream is served by one sub-stream ("leg") per slot, opened with
the first request for it, and the responses of all legs are merged into the client's stream.
When the active slot changes (at the next request, or within ``FLIP_POLL_SECONDS`` for an
idle stream), the old slot's leg is half-closed: Triton answers every request it already has,
a decoupled one (many responses, e.g. ``generate``) to its last response, then ends the leg,
so a request finishes on the slot it started on. Each leg counts as one call in flight on its
slot from its first request to its end, so draining the old slot waits exactly for its
outstanding responses and no longer than that for an open client stream. The client
half-closing half-closes every leg and ends OK once all have ended; a client that goes away
cancels them. A leg that fails fails the stream with its status (UNAVAILABLE naming the
slot); a stream is not retried, its messages already went upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from autoglm.gateway.routing import HTTP_CODE, UNLIMITED, Hub, Replica, Target

SERVICE = "inference.GRPCInferenceService"
# Per-connection headers of HTTP/2 and gRPC's own: the channel sets them for each hop.
HOP_METADATA = {"user-agent", "te", "content-type", "host", "grpc-accept-encoding",
                "grpc-encoding", "grpc-timeout"}
FLIP_POLL_SECONDS = 0.1  # how soon an idle client stream lets go of a slot no longer active
EVENT_BUFFER = 64  # a stream's messages on their way through the gateway, both directions

Metadata = Sequence[tuple[str, str | bytes]]


def _passable(md: Metadata | None) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in (md or ()) if not k.startswith(":")
                 and not k.startswith("grpc-") and k not in HOP_METADATA)


def _client_code(code: Any, details: str) -> Any:
    """``code``, but INVALID_ARGUMENT for a request that does not parse: gRPC's C++ server
    (Triton's) answers INTERNAL "Unable to parse request" to a malformed message."""
    if code == grpc.StatusCode.INTERNAL and details.startswith("Unable to parse request"):
        return grpc.StatusCode.INVALID_ARGUMENT
    return code


def _identity(b: bytes) -> bytes:
    return b


class GrpcProxy:
    """A grpc.aio server forwarding every method of Triton's service to ``gateway``'s
    active target (``Target.grpc_url``). Runs on the gateway's event loop, which keeps the
    in-flight counts single-threaded."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._server: Any = None
        self._channels: dict[str, Any] = {}  # router address -> grpc.aio channel
        self._methods: dict[tuple[str, str], Any] = {}  # (address, path) -> multicallable
        self._calls: dict[str, int] = {}  # calls and stream legs in flight per address
        self._streams: set[_Stream] = set()  # client streams open
        self._watcher: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> None:
        # a message over the gateway's body limit is refused (RESOURCE_EXHAUSTED) unread
        self._server = grpc.aio.server(options=[
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", self.hub.limits.max_body_bytes)])
        self._server.add_generic_rpc_handlers((self._handler(),))
        if self._server.add_insecure_port(f"{host}:{port}") == 0:
            raise OSError(f"gRPC: cannot listen on {host}:{port}")
        await self._server.start()
        self._watcher = asyncio.create_task(self._watch_flips())

    async def stop(self, grace: float = 1.0) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._methods.clear()

    async def _watch_flips(self) -> None:
        """Lets go of every stream's leg to a slot no longer active, so an idle client stream
        holds no old slot's drain longer than ``FLIP_POLL_SECONDS`` after a flip."""
        while True:
            await asyncio.sleep(FLIP_POLL_SECONDS)
            active = self.hub.routing.active
            for stream in self._streams:
                stream.let_go_unless(active)

    def _handler(self) -> Any:
        service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        handlers = {}
        for m in service.methods:
            path = f"/{SERVICE}/{m.name}"
            if m.client_streaming or m.server_streaming:
                handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                    self._stream_behavior(path))
            else:
                handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary_behavior(path))
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    async def _method(self, address: str, path: str, streaming: bool = False) -> Any:
        """The raw-bytes callable of ``path`` on the router at ``address``."""
        method = self._methods.get((address, path))
        if method is not None:
            return method
        channel = self._channels.get(address)
        if channel is None:
            # Channels to routers that serve nothing any more and have no call left go
            # (a slot comes back on new ports, so they are not wanted again).
            active = self.hub.routing.active
            wanted = {r.grpc_url for r in active.endpoints} if active else set()
            for old in [a for a in self._channels
                        if not self._calls.get(a) and a not in wanted]:
                self._methods = {k: v for k, v in self._methods.items() if k[0] != old}
                await self._channels.pop(old).close()
            channel = grpc.aio.insecure_channel(address, options=UNLIMITED)
            self._channels[address] = channel
        make = channel.stream_stream if streaming else channel.unary_unary
        method = make(path, request_serializer=_identity, response_deserializer=_identity)
        self._methods[(address, path)] = method
        return method

    def _start(self, target: Target) -> float:
        self.hub.traffic.enter(target.slot)
        return time.perf_counter()

    def _end(self, target: Target, t0: float, code: Any) -> None:
        self.hub.traffic.leave(target, str(HTTP_CODE.get(code.name, 500)),
                               time.perf_counter() - t0)

    def _hold(self, target: Target, replica: Replica) -> None:
        """A call or stream leg on ``replica`` starts (its channel is kept until it ends)."""
        self._calls[replica.grpc_url] = self._calls.get(replica.grpc_url, 0) + 1
        self.hub.balancer.started(replica)
        self.hub.traffic.replica_requests.labels(target.slot, replica.url).inc()

    def _release(self, replica: Replica) -> None:
        self._calls[replica.grpc_url] -= 1
        self.hub.balancer.ended(replica)

    def _timeout(self, context: Any) -> float:
        remaining = context.time_remaining()
        limit = self.hub.upstream_timeout
        return limit if remaining is None else min(remaining, limit)

    def _unary_behavior(self, path: str) -> Callable[[bytes, Any], Any]:
        async def behavior(request: bytes, context: Any) -> bytes:
            target = self.hub.routing.active  # one snapshot: this call stays here
            if target is None or not target.grpc_url:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "no active slot")
            assert target is not None
            metadata = _passable(context.invocation_metadata())
            t0, code, details = self._start(target), grpc.StatusCode.UNKNOWN, ""
            try:
                for replica in self.hub.tries(target):
                    self._hold(target, replica)
                    try:
                        method = await self._method(replica.grpc_url, path)
                        call = method(request, metadata=metadata,
                                      timeout=self._timeout(context))
                        response: bytes = await call
                    except asyncio.CancelledError:
                        code = grpc.StatusCode.CANCELLED  # the client went away
                        raise
                    except grpc.aio.AioRpcError as e:
                        code, details = e.code(), e.details() or ""
                        if code == grpc.StatusCode.UNAVAILABLE:
                            continue  # unserved: the next try
                        await context.abort(_client_code(code, details), details,
                                            _passable(e.trailing_metadata()))
                    finally:
                        self._release(replica)
                    code = grpc.StatusCode.OK
                    await _relay_metadata(call, context)
                    return response
                where, tried = ((target.endpoints[0].grpc_url, "twice")
                                if len(target.endpoints) == 1
                                else ("each replica", "each"))
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"slot {target.slot} ({where}) unavailable, tried {tried}: "
                                    f"{details}")
                raise AssertionError("not reached")
            finally:
                self._end(target, t0, code)

        return behavior

    def _stream_behavior(self, path: str) -> Callable[[AsyncIterator[bytes], Any],
                                                       AsyncIterator[bytes]]:
        async def behavior(requests: AsyncIterator[bytes], context: Any,
                           ) -> AsyncIterator[bytes]:
            # an async generator function itself: grpc.aio runs any other in a thread
            stream = _Stream(self, path, requests, context)
            try:
                while (response := await stream.next()) is not None:
                    yield response
            finally:
                stream.close()

        return behavior


@dataclass(eq=False)
class _Leg:
    """A client stream's sub-stream to one slot's router: the requests that arrived while
    that slot was active, and their responses."""

    target: Target
    replica: Replica
    t0: float  # counted in flight on its slot since
    requests: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    call: Any = None
    pump: asyncio.Task[None] | None = None


# (kind, leg, payload): "request" (a client message), "eof" (the client half-closed),
# "response" (a leg's message), "end" (a leg ended: None, or its AioRpcError)
_Event = tuple[str, _Leg | None, Any]


async def _until_none(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    """A leg's request iterator: its end half-closes the leg."""
    while (message := await queue.get()) is not None:
        yield message


class _Stream:
    """One client's ``ModelStreamInfer``, its requests spread over legs (:class:`_Leg`).

    One loop (:meth:`next`) owns the state; the client's reader and each leg's pump only
    post events to it, in order per source. The proxy's flip watcher only lets go of the
    current leg (:meth:`let_go_unless`), which is safe at any await of the loop."""

    def __init__(self, proxy: GrpcProxy, path: str, requests: AsyncIterator[bytes],
                 context: Any) -> None:
        self.proxy, self.path, self.context = proxy, path, context
        self.metadata = _passable(context.invocation_metadata())
        self.events: asyncio.Queue[_Event] = asyncio.Queue(EVENT_BUFFER)
        self.legs: list[_Leg] = []  # open, in the order they opened
        self.current: _Leg | None = None  # the one new requests go to while its slot is active
        self.client_done = False  # the client half-closed
        self.trailing: Metadata = ()
        self.reader = asyncio.create_task(self._read(requests))
        proxy._streams.add(self)

    async def next(self) -> bytes | None:
        """The next response for the client; None once the client half-closed and every leg
        ended (the stream then ends OK, with the trailing metadata of the last leg)."""
        while not self.client_done or self.legs:
            kind, leg, payload = await self.events.get()
            if kind == "response":
                return bytes(payload)
            if kind == "request":
                await self._route(payload)
            elif kind == "end":
                assert leg is not None
                await self._ended(leg, payload)
            elif kind == "eof":
                if payload is not None:
                    raise payload
                self.client_done = True
                self._let_go()
        self.context.set_trailing_metadata(_passable(self.trailing))
        return None

    def close(self) -> None:
        """Stops reading the client; a leg still open (the client went away, or the stream
        failed) is cancelled upstream and counted CANCELLED."""
        self.proxy._streams.discard(self)
        self.reader.cancel()
        for leg in self.legs:
            if leg.call is not None:
                leg.call.cancel()
            if leg.pump is not None:
                leg.pump.cancel()
            self.proxy._release(leg.replica)
            self.proxy._end(leg.target, leg.t0, grpc.StatusCode.CANCELLED)
        self.legs.clear()
        self.current = None

    async def _read(self, requests: AsyncIterator[bytes]) -> None:
        try:
            async for message in requests:
                await self.events.put(("request", None, message))
        except Exception as e:  # reading the client failed: so does the stream
            await self.events.put(("eof", None, e))
        else:
            await self.events.put(("eof", None, None))

    async def _pump(self, leg: _Leg) -> None:
        try:
            async for message in leg.call:
                await self.events.put(("response", leg, message))
        except Exception as e:  # an AioRpcError: the leg's status
            await self.events.put(("end", leg, e))
        else:
            await self.events.put(("end", leg, None))

    async def _route(self, message: bytes) -> None:
        """``message`` to the leg of the slot active now, opened if need be."""
        try:
            service_pb2.ModelInferRequest.FromString(message)
        except DecodeError as e:
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"Unable to parse request: not a ModelInferRequest ({e})")
        target = self.proxy.hub.routing.active
        if target is None or not target.grpc_url:
            await self.context.abort(grpc.StatusCode.UNAVAILABLE, "no active slot")
        assert target is not None
        if self.current is None or self.current.target != target:
            self._let_go()
            replica = next(self.proxy.hub.tries(target))  # a stream is never retried
            method = await self.proxy._method(replica.grpc_url, self.path, streaming=True)
            self.proxy._hold(target, replica)
            leg = _Leg(target, replica, self.proxy._start(target))
            self.legs.append(leg)
            leg.call = method(_until_none(leg.requests), metadata=self.metadata,
                              timeout=self.context.time_remaining())
            leg.pump = asyncio.create_task(self._pump(leg))
            self.current = leg
        self.current.requests.put_nowait(message)

    def let_go_unless(self, active: Target | None) -> None:
        """Half-close the current leg unless its slot is ``active``."""
        if self.current is not None and self.current.target != active:
            self._let_go()

    def _let_go(self) -> None:
        """Half-close the current leg: its router answers what it has, then ends it."""
        if self.current is not None:
            self.current.requests.put_nowait(None)
            self.current = None

    async def _ended(self, leg: _Leg, error: BaseException | None) -> None:
        self.legs.remove(leg)
        self.proxy._release(leg.replica)
        if leg is self.current:  # ended by its router on its own: the next request reopens
            self.current = None
        if error is None:
            self.trailing = await leg.call.trailing_metadata()
            self.proxy._end(leg.target, leg.t0, grpc.StatusCode.OK)
            return
        if not isinstance(error, grpc.aio.AioRpcError):
            self.proxy._end(leg.target, leg.t0, grpc.StatusCode.UNKNOWN)
            raise error
        code = error.code()
        self.proxy._end(leg.target, leg.t0, code)
        details = error.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            details = (f"slot {leg.target.slot} ({leg.replica.grpc_url}) unavailable: "
                       f"{details}")
        await self.context.abort(_client_code(code, details),
                                 details, _passable(error.trailing_metadata()))


async def _relay_metadata(call: Any, context: Any) -> None:
    initial = _passable(await call.initial_metadata())
    if initial:
        await context.send_initial_metadata(initial)
    context.set_trailing_metadata(_passable(await call.trailing_metadata()))
