"""Generation upstream: one gRPC ``ModelStreamInfer`` call per generation to the active slot's
``generate`` model (decoupled: one response per step's new text, or per
``spec.router.streamInterval`` tokens: a response may carry several tokens, and every use
here joins texts and counts from ``completion_tokens``, never from responses), shared by the
OpenAI API and Triton's generate extension.

gRPC, not Triton's HTTP generate endpoint, because only gRPC carries a client's cancellation
to the model: a generation whose client went away is cancelled upstream at once and the
engine frees its sequence at its next step. Each call asks for Triton's strict error mode
(``triton_grpc_error``), so a refused request ends the stream with its gRPC status
(INVALID_ARGUMENT for a bad request) instead of an untyped error message.

A router whose waiting queue is full refuses a generation at once (its error begins with
``SATURATED``): every HTTP surface answers that 429 with ``Retry-After``
(:attr:`UpstreamError.headers`) before any byte of a stream, as the refusal is the
generation's first response.

:class:`Generation` is one HTTP request's generation: it pins the slot snapshot taken when the
request arrived (every token from one slot and version), is counted in flight for that slot
from start to end (draining waits for it), and cancels the upstream call when the client
disconnects, even while no token is being written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc  # type: ignore[import-untyped]
import numpy as np
from aiohttp import web
from tritonclient.grpc import service_pb2

from autoglm.engine.errors import FAILED, RETRY_AFTER_SECONDS, SATURATED
from autoglm.gateway.routing import HTTP_CODE, UNLIMITED, Hub, Replica, Routing, Target
from autoglm.plan import generate_model

STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
# Not Triton's strict error mode (triton_grpc_error: the first error closes the stream with
# its status code): with it, tritonserver 2.51 crashed (SIGSEGV) within 600 refused
# generations from 4 clients at once (its gRPC error/cancellation races); without, none did.
# A refusal or failure comes as the stream's error_message instead (:func:`_output`).
DISCONNECT_POLL_SECONDS = 0.05  # aiohttp has no disconnect callback without cancelling
INT64 = (-(2**63), 2**63 - 1)

Param = str | int | float | bool


class BadRequest(Exception):
    """A request refused before it goes upstream; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class UpstreamError(Exception):
    """The router refused or failed a generation: ``status`` is the HTTP equivalent."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    @property
    def headers(self) -> dict[str, str]:
        """The response's extra headers: a 429 (saturated) says when to try again."""
        return {"Retry-After": str(RETRY_AFTER_SECONDS)} if self.status == 429 else {}


@dataclass(frozen=True)
class Prompt:
    """Exactly one of: a text, chat messages (JSON), token ids."""

    text: str | None = None
    messages: str | None = None
    ids: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        """What the balancer reads the prompt's prefix from."""
        if self.ids is not None:
            return ",".join(map(str, self.ids))
        return self.messages if self.messages is not None else self.text or ""


@dataclass(frozen=True)
class Output:
    """One response of ``generate``: the text that became final and its new tokens (one,
    or up to the router's stream interval); ``completion_tokens`` counts all so far."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "" until the last response: "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    model_version: int
    final: bool


def upstream_parameters(given: Mapping[str, Any]) -> dict[str, Param]:
    """Triton request parameters from JSON values (None: not given). The model checks the
    values; here only what Triton's parameters cannot carry is refused."""
    out: dict[str, Param] = {}
    for key, value in given.items():
        if value is None:
            continue
        if key == "stop" and isinstance(value, list):
            out[key] = json.dumps(value)  # the model reads a list as one JSON string
        elif key == "stop" and isinstance(value, str):
            # one that looks like a JSON list goes as a list, so it stays one string
            out[key] = json.dumps([value]) if value.startswith("[") else value
        elif isinstance(value, bool | str | float):
            out[key] = value
        elif isinstance(value, int):
            if not INT64[0] <= value <= INT64[1]:
                raise BadRequest(f"{key} is out of range, got {value}", key)
            out[key] = value
        else:
            raise BadRequest(f"{key} must be a number, string or boolean, got "
                             f"{type(value).__name__}", key)
    return out


def _bytes_input(request: Any, name: str, value: str) -> None:
    t = request.inputs.add()
    t.name, t.datatype = name, "BYTES"
    t.shape.append(1)
    data = value.encode()
    request.raw_input_contents.append(struct.pack("<I", len(data)) + data)


def infer_request(target: Target, prompt: Prompt, parameters: Mapping[str, Param],
                  ) -> Any:
    """The ``ModelInferRequest`` of one generation, pinned to the target's version."""
    r = service_pb2.ModelInferRequest(model_name=generate_model(),
                                      model_version=str(target.version))
    if prompt.text is not None:
        _bytes_input(r, "text_input", prompt.text)
    if prompt.messages is not None:
        _bytes_input(r, "messages", prompt.messages)
    if prompt.ids is not None:
        t = r.inputs.add()
        t.name, t.datatype = "input_ids", "INT64"
        t.shape.append(len(prompt.ids))
        r.raw_input_contents.append(np.asarray(prompt.ids, dtype="<i8").tobytes())
    for key, value in parameters.items():
        p = r.parameters[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = value
    # the model's last response (FINAL with data) is marked, as is a FINAL without data
    r.parameters["triton_enable_empty_final_response"].bool_param = True
    return r


def _output(message: Any) -> Output:
    if message.error_message:
        raise UpstreamError(_error_status(message.error_message), message.error_message)
    r = message.infer_response
    final = ("triton_final_response" in r.parameters
             and bool(r.parameters["triton_final_response"].bool_param))
    raw = {o.name: (o.datatype, c) for o, c in zip(r.outputs, r.raw_output_contents,
                                                    strict=False)}

    def text(name: str) -> str:
        if name not in raw:
            return ""
        data = raw[name][1]
        (n,) = struct.unpack_from("<I", data)
        return bytes(data[4:4 + n]).decode(errors="replace")

    def ints(name: str, dtype: str) -> list[int]:
        return np.frombuffer(raw[name][1], dtype=dtype).tolist() if name in raw else []

    finish = text("finish_reason")
    return Output(text("text_output"), tuple(ints("output_ids", "<i8")), finish,
                  (ints("prompt_tokens", "<i4") or [0])[0],
                  (ints("completion_tokens", "<i4") or [0])[0],
                  (ints("model_version", "<i8") or [0])[0], final or bool(finish))


def _error_status(message: str) -> int:
    """The model refuses a request (400), or refuses it for now (``SATURATED``: 429), or
    fails a running generation (``FAILED``: 503); Triton's own "unknown model" (the slot's
    router serves no such version) is 503 too."""
    if message.startswith(SATURATED):
        return 429
    if message.startswith(FAILED) or "unknown model" in message.lower():
        return 503
    return 400


def _status(e: Any, target: Target, replica: Replica) -> UpstreamError:
    code = e.code()
    details = e.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        return UpstreamError(503, f"slot {target.slot} ({replica.grpc_url}) unavailable: "
                                  f"{details}")
    if code == grpc.StatusCode.NOT_FOUND:  # the slot's router serves no `generate`
        return UpstreamError(503, f"slot {target.slot} serves no text generation: {details}")
    return UpstreamError(HTTP_CODE.get(code.name, 500), details)


class GenerateClient:
    """gRPC streams to the routers' ``generate`` models: a channel per router replica,
    reused by every generation on it and closed once no active slot's replica is there and
    no generation is left on it."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._channels: dict[str, Any] = {}  # router address -> grpc.aio channel
        self._methods: dict[str, Any] = {}  # router address -> ModelStreamInfer callable
        self._calls: dict[str, int] = {}  # generations in flight per address

    @property
    def routing(self) -> Routing:
        return self.hub.routing

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._methods.clear()

    async def _sweep(self) -> None:
        active = self.hub.routing.active
        wanted = {r.grpc_url for r in active.endpoints} if active else set()
        for old in [a for a in self._channels if not self._calls.get(a) and a not in wanted]:
            self._methods.pop(old, None)
            await self._channels.pop(old).close()

    def _method(self, address: str) -> Any:
        method = self._methods.get(address)
        if method is None:
            channel = grpc.aio.insecure_channel(address, options=UNLIMITED)
            self._channels[address] = channel
            method = channel.stream_stream(
                STREAM_INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
            self._methods[address] = method
        return method

    def generation(self, request: web.Request, target: Target, prompt: Prompt,
                   parameters: Mapping[str, Param]) -> Generation:
        """One HTTP request's generation (an async context manager)."""
        return Generation(self, request, target, prompt, parameters)

    async def stream(self, target: Target, prompt: Prompt,
                     parameters: Mapping[str, Param]) -> AsyncGenerator[Output, None]:
        """The responses of one generation on one of ``target``'s replicas;
        :class:`UpstreamError` if it is refused or fails. It goes on to the next replica
        only while nothing came back: when the replica was unreachable, or refused it as
        saturated and another replica is left to try (all saturated: the 429). Closing the
        iterator early cancels the upstream call."""
        if not target.grpc_url and not target.replicas:
            raise UpstreamError(503, f"slot {target.slot} has no gRPC endpoint")
        request = infer_request(target, prompt, parameters)
        await self._sweep()
        others = len(target.endpoints) - 1
        refusal = UpstreamError(503, f"slot {target.slot} unavailable")
        for n, replica in enumerate(self.hub.tries(target, prompt.key)):
            address = replica.grpc_url
            self._calls[address] = self._calls.get(address, 0) + 1
            call = self._method(address)()
            received = False
            try:
                with self.hub.sending(target, replica):
                    with contextlib.suppress(asyncio.InvalidStateError):  # already failed:
                        await call.write(request)  # its status comes out of the read below
                        await call.done_writing()
                    # Triton ends the stream right after the FINAL response (we half-closed)
                    async for message in call:
                        if not received and n < others and \
                                message.error_message.startswith(SATURATED):
                            refusal = UpstreamError(429, message.error_message)
                            break  # this replica is full: another may not be
                        received = True
                        yield _output(message)
                    else:
                        return
            except grpc.aio.AioRpcError as e:
                # nothing came back: the router never took it, so trying again is safe
                refusal = _status(e, target, replica)
                if e.code() != grpc.StatusCode.UNAVAILABLE or received:
                    raise refusal from None
            finally:
                if not call.done():
                    call.cancel()  # closed early: the client went away
                self._calls[address] -= 1
                await self._sweep()
        raise refusal


class Generation:
    """One HTTP request's generation, from the slot snapshot ``target`` to its end:

    counted in flight on its slot and in the gateway's metrics (``code``: 200, the refusal's
    status, or 499 for a client that went away), cancelled upstream as soon as the client
    disconnects (the handler's task is cancelled; checked every 50 ms)."""

    def __init__(self, client: GenerateClient, request: web.Request, target: Target,
                 prompt: Prompt, parameters: Mapping[str, Param]) -> None:
        self.traffic, self.request, self.target = client.hub.traffic, request, target
        self.code = 200
        self.disconnected = False
        self.complete = False  # the upstream stream ended: a disconnect now cancels nothing
        self._upstream = client.stream(target, prompt, parameters)
        self._outputs = self._until_complete()
        self._watcher: asyncio.Task[None] | None = None
        self._t0 = 0.0

    async def __aenter__(self) -> Generation:
        self.traffic.enter(self.target.slot)
        self._t0 = time.perf_counter()
        task = asyncio.current_task()
        assert task is not None
        self._watcher = asyncio.create_task(self._watch(task))
        return self

    async def _watch(self, handler: asyncio.Task[Any]) -> None:
        while True:
            transport = self.request.transport
            if transport is None or transport.is_closing():
                self.disconnected = True
                handler.cancel()
                return
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)

    async def _until_complete(self) -> AsyncGenerator[Output, None]:
        async for out in self._upstream:
            yield out
        # Done upstream: the watcher stops, so a client that closes its connection as soon
        # as it has read the last event is not taken for one that went away.
        self.complete = True
        if self._watcher is not None:
            self._watcher.cancel()

    def __aiter__(self) -> AsyncIterator[Output]:
        return self._outputs

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._watcher is not None
        self._watcher.cancel()
        if self.disconnected or isinstance(exc, ConnectionError):
            self.code = 499
        elif exc is not None and self.code == 200:
            self.code = 500
        try:
            await self._outputs.aclose()
            await self._upstream.aclose()  # cancels the upstream call if still open
        finally:
            self.traffic.leave(self.target, str(self.code), time.perf_counter() - self._t0)

    def client_gone(self) -> None:
        """A write to the client failed: it went away."""
        self.disconnected = True
