"""Server-sent event streams, as both generation APIs send them (the OpenAI API's
``stream: true``, Triton's ``generate_stream``): :class:`EventStream`.

A stream's status and headers go out with its first event or its first heartbeat, whichever
comes first. A generation the router refuses (a saturated router's 429 with
``Retry-After``, a bad request's 400) is refused at admission, within milliseconds, so it is
still a plain HTTP error; one that waits (in the router's queue, for room in its KV cache)
gets its headers after ``heartbeat_seconds`` and then a heartbeat, the SSE comment
``: keep-alive``, every ``heartbeat_seconds`` without an event, so that proxies and clients
with read timeouts keep it (SSE clients ignore comments, the stock ``openai`` client
included). A refusal or failure after that is an error event, as one mid-stream is.

Every write is bounded by ``write_timeout``: a client that takes no data for that long (it
stopped reading) is cut, its connection aborted (:class:`ClientStalled`, a
``ConnectionError``: the handler's :class:`~autoglm.gateway.generation.Generation` cancels
the generation upstream and counts 499). Two layers, one timeout:

- the kernel's ``TCP_USER_TIMEOUT`` on the stream's connection (Linux; set when the stream
  opens, kept for the connection's later requests): the socket's send buffer alone takes
  megabytes of events (3 MB measured on loopback, autotuned) before a write would wait in
  the event loop, which a stalled reader of a short generation never fills; the kernel
  aborts a connection whose peer accepts nothing (zero window, or no acknowledgement) for
  that long, and the generation's disconnect watch sees it closed;
- each write in the event loop, with the transport drained after each one (aiohttp's
  ``write`` drains only past 64 KiB of its own count): once the kernel's buffer is full the
  transport's fills, and a write that cannot drain it within ``write_timeout`` aborts the
  connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from autoglm.gateway.routing import Limits

T = TypeVar("T")
HEARTBEAT = b": keep-alive\n\n"
HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
           "X-Accel-Buffering": "no"}


class Bounds(Protocol):
    """What a stream needs to know: :class:`~autoglm.gateway.routing.Limits`."""

    @property
    def heartbeat_seconds(self) -> float: ...

    @property
    def write_timeout(self) -> float: ...


class ClientStalled(ConnectionResetError):
    """The client took no data for the write timeout: its connection was aborted."""


def event(payload: Mapping[str, Any] | str) -> bytes:
    """One ``data:`` event: a JSON object, or a string as it is (``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


@dataclass(frozen=True)
class _Failed:
    error: Exception


_END = object()


class EventStream:
    """One response's server-sent events: ``async with EventStream(request) as events``,
    then :meth:`next` for each item of the generation (heartbeats while it waits),
    :meth:`send` for each event, :meth:`done` at the end. Any write may raise
    ``ConnectionError`` (:class:`ClientStalled` after the write timeout). Leaving the block
    stops reading the items (the generation's own exit then closes it upstream)."""

    def __init__(self, request: web.Request, limits: Bounds | None = None) -> None:
        self.request = request
        self.limits: Bounds = Limits.from_env() if limits is None else limits
        self.response = web.StreamResponse(headers=HEADERS)
        self._writer: AbstractStreamWriter | None = None
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()  # of the last write (or of the start)
        self._items: asyncio.Queue[Any] = asyncio.Queue(1)
        self._reader: asyncio.Task[None] | None = None

    @property
    def prepared(self) -> bool:
        """The status and headers are sent: an error can only be an event now."""
        return self._writer is not None

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop reading the items, and wait until the reader has let go of them (so that
        whoever closes them next finds them idle), even if this task is cancelled."""
        task, self._reader = self._reader, None
        if task is None:
            return
        task.cancel()
        cancelled = False
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    async def _read(self, items: AsyncIterator[Any]) -> None:
        try:
            async for item in items:
                await self._items.put(item)
        except Exception as e:  # to the handler, from next()
            await self._items.put(_Failed(e))
            return
        await self._items.put(_END)

    async def next(self, items: AsyncIterator[T]) -> T | None:
        """The next of ``items`` (None after the last; its exception, if it raises), with a
        heartbeat each ``heartbeat_seconds`` without a write while it is awaited; the first
        heartbeat sends the headers. Pass the same ``items`` every time."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(items))
        while True:
            if not self._items.empty():
                got = self._items.get_nowait()
                break
            wait = self._last + self.limits.heartbeat_seconds - self._loop.time()
            if wait <= 0:
                await self.heartbeat()
                continue
            try:
                async with asyncio.timeout(wait):
                    got = await self._items.get()  # a get cancelled takes nothing
                break
            except TimeoutError:
                continue
        if got is _END or isinstance(got, _Failed):
            self._items.put_nowait(got)  # the reader is done: the same at every later call
            if isinstance(got, _Failed):
                raise got.error
            return None
        item: T = got
        return item

    async def prepare(self) -> None:
        """Send the status and headers (with the first write: aiohttp holds them until
        then), and bound the connection's writes in the kernel."""
        if self._writer is not None:
            return
        self._writer = await self.response.prepare(self.request)
        _kernel_write_timeout(self.request, self.limits.write_timeout)

    async def send(self, payload: Mapping[str, Any] | str) -> None:
        """One ``data:`` event (a JSON object, or a string as it is: ``[DONE]``)."""
        await self._write(event(payload))

    async def heartbeat(self) -> None:
        """An SSE comment, which clients ignore: the stream is alive."""
        await self._write(HEARTBEAT)

    async def done(self) -> web.StreamResponse:
        """The end of the stream; the response, for the handler to return."""
        await self._bounded(self._eof())
        return self.response

    async def _eof(self) -> None:
        await self.prepare()
        await self.response.write_eof()

    async def _write(self, data: bytes) -> None:
        await self._bounded(self._write_drained(data))

    async def _write_drained(self, data: bytes) -> None:
        await self.prepare()
        await self.response.write(data)
        assert self._writer is not None
        await self._writer.drain()  # no wait unless the transport is past its high water

    async def _bounded(self, write: Awaitable[None]) -> None:
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await write
        except TimeoutError:
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            raise ClientStalled(f"the client took no data for "
                                f"{self.limits.write_timeout:g} s") from None
        self._last = self._loop.time()


def _kernel_write_timeout(request: web.Request, seconds: float) -> None:
    """``TCP_USER_TIMEOUT`` on the request's connection, where the platform has it: the
    kernel aborts it when sent data stays unaccepted that long."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock is None or option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):  # then the writes in the event loop still bound it
        sock.setsockopt(socket.IPPROTO_TCP, option, max(1, round(seconds * 1000)))
