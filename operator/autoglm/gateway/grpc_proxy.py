"""The gateway's gRPC side: Triton's ``inference.GRPCInferenceService`` forwarded as raw
bytes to the active slot's router, so stock ``tritonclient.grpc`` works unchanged.

Messages are never decoded: each method is registered without (de)serializers, with its
arity taken from the service descriptor (ModelStreamInfer is the one stream-stream method).
As on the HTTP side, a call reads the active slot once and is served entirely by it, is
counted in flight for that slot (exact drain) and in the same metrics, its status as the
equivalent HTTP ``code`` (OK is 200, so ``code!~"2.."`` stays the error rate of both
protocols). A unary call that ends UNAVAILABLE (the router unreachable or its connection
lost; Triton also answers so when it served nothing) is tried once more, then fails
UNAVAILABLE naming the slot; a stream is not retried, its messages already went upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc  # type: ignore[import-untyped]
from tritonclient.grpc import service_pb2

if TYPE_CHECKING:
    from autoglm.gateway.app import Gateway, Target

SERVICE = "inference.GRPCInferenceService"
# Per-connection headers of HTTP/2 and gRPC's own: the channel sets them for each hop.
HOP_METADATA = {"user-agent", "te", "content-type", "host", "grpc-accept-encoding",
                "grpc-encoding", "grpc-timeout"}
# The usual gRPC -> HTTP status mapping (google.rpc.Code); anything else is 500.
HTTP_CODE = {"OK": 200, "CANCELLED": 499, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
             "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403,
             "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400, "ABORTED": 409,
             "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
             "UNAUTHENTICATED": 401}
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

Metadata = Sequence[tuple[str, str | bytes]]


def _passable(md: Metadata | None) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in (md or ()) if not k.startswith(":")
                 and not k.startswith("grpc-") and k not in HOP_METADATA)


def _identity(b: bytes) -> bytes:
    return b


class GrpcProxy:
    """A grpc.aio server forwarding every method of Triton's service to ``gateway``'s
    active target (``Target.grpc_url``). Runs on the gateway's event loop, which keeps the
    in-flight counts single-threaded."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._server: Any = None
        self._channels: dict[str, Any] = {}  # router address -> grpc.aio channel
        self._methods: dict[tuple[str, str], Any] = {}  # (address, path) -> multicallable
        self._calls: dict[str, int] = {}  # calls in flight per address

    async def start(self, host: str, port: int) -> None:
        self._server = grpc.aio.server(options=UNLIMITED)
        self._server.add_generic_rpc_handlers((self._handler(),))
        if self._server.add_insecure_port(f"{host}:{port}") == 0:
            raise OSError(f"gRPC: cannot listen on {host}:{port}")
        await self._server.start()

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._methods.clear()

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
            active = self.gateway.routing.active
            for old in [a for a in self._channels if not self._calls.get(a)
                        and (active is None or a != active.grpc_url)]:
                self._methods = {k: v for k, v in self._methods.items() if k[0] != old}
                await self._channels.pop(old).close()
            channel = grpc.aio.insecure_channel(address, options=UNLIMITED)
            self._channels[address] = channel
        make = channel.stream_stream if streaming else channel.unary_unary
        method = make(path, request_serializer=_identity, response_deserializer=_identity)
        self._methods[(address, path)] = method
        return method

    def _start(self, target: Target) -> float:
        self._calls[target.grpc_url] = self._calls.get(target.grpc_url, 0) + 1
        self.gateway.enter(target.slot)
        return time.perf_counter()

    def _end(self, target: Target, t0: float, code: Any) -> None:
        self._calls[target.grpc_url] -= 1
        self.gateway.leave(target, str(HTTP_CODE.get(code.name, 500)),
                           time.perf_counter() - t0)

    def _timeout(self, context: Any) -> float:
        remaining = context.time_remaining()
        limit = self.gateway.timeout.total or 60.0
        return limit if remaining is None else min(remaining, limit)

    def _unary_behavior(self, path: str) -> Callable[[bytes, Any], Any]:
        async def behavior(request: bytes, context: Any) -> bytes:
            target = self.gateway.routing.active  # one snapshot: this call stays here
            if target is None or not target.grpc_url:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "no active slot")
            assert target is not None
            metadata = _passable(context.invocation_metadata())
            t0, code = self._start(target), grpc.StatusCode.UNKNOWN
            try:
                for attempt in (1, 2):
                    method = await self._method(target.grpc_url, path)
                    call = method(request, metadata=metadata, timeout=self._timeout(context))
                    try:
                        response: bytes = await call
                    except asyncio.CancelledError:
                        code = grpc.StatusCode.CANCELLED  # the client went away
                        raise
                    except grpc.aio.AioRpcError as e:
                        code = e.code()
                        if code == grpc.StatusCode.UNAVAILABLE and attempt == 1:
                            self.gateway.retries.labels(target.slot).inc()
                            continue
                        details = e.details() or ""
                        if code == grpc.StatusCode.UNAVAILABLE:
                            details = (f"slot {target.slot} ({target.grpc_url}) unavailable, "
                                       f"tried twice: {details}")
                        await context.abort(code, details,
                                            _passable(e.trailing_metadata()))
                    code = grpc.StatusCode.OK
                    await _relay_metadata(call, context)
                    return response
                raise AssertionError("not reached")
            finally:
                self._end(target, t0, code)

        return behavior

    def _stream_behavior(self, path: str) -> Callable[[AsyncIterator[bytes], Any],
                                                       AsyncIterator[bytes]]:
        async def behavior(requests: AsyncIterator[bytes], context: Any,
                           ) -> AsyncIterator[bytes]:
            target = self.gateway.routing.active
            if target is None or not target.grpc_url:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "no active slot")
            assert target is not None
            t0, code = self._start(target), grpc.StatusCode.UNKNOWN
            try:
                method = await self._method(target.grpc_url, path, streaming=True)
                call = method(requests, metadata=_passable(context.invocation_metadata()),
                              timeout=context.time_remaining())
                try:
                    async for response in call:
                        yield response
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                    await context.abort(code, e.details() or "",
                                        _passable(e.trailing_metadata()))
                code = grpc.StatusCode.OK
                context.set_trailing_metadata(_passable(await call.trailing_metadata()))
            finally:
                self._end(target, t0, code)

        return behavior


async def _relay_metadata(call: Any, context: Any) -> None:
    initial = _passable(await call.initial_metadata())
    if initial:
        await context.send_initial_metadata(initial)
    context.set_trailing_metadata(_passable(await call.trailing_metadata()))
