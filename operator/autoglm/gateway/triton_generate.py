"""Triton's generate extension at the gateway: ``POST /v2/models/<model>/generate`` (one JSON
answer, the responses joined) and ``/generate_stream`` (``data: {...}`` per response), for
``<model>`` = ``generate`` or the served model's name. Served over the same gRPC stream as the
OpenAI API, so it follows the same slot rules and a disconnect cancels the generation. Any
other model's ``generate`` goes to the router as it is (the ``/v2`` forward).

Body, as Triton's: the inputs by name (``text_input``; or ``messages``, a JSON string or a
list; or ``input_ids``), ``parameters`` {...}; the request parameters are also accepted at
the top level (``max_tokens`` …, as TensorRT-LLM's models take them). Errors are Triton's
shape, ``{"error": "..."}``; a saturated router's refusal is 429 with ``Retry-After``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from autoglm.gateway.generation import (
    BadRequest,
    GenerateClient,
    Output,
    Prompt,
    UpstreamError,
    upstream_parameters,
)
from autoglm.gateway.routing import parse_json, served_model
from autoglm.gateway.sse import EventStream
from autoglm.plan import generate_model

if TYPE_CHECKING:
    from aiohttp.web_urldispatcher import UrlDispatcher

INPUTS = ("text_input", "messages", "input_ids")
PARAMETERS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


def _error(status: int, message: str, headers: dict[str, str] | None = None,
           ) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _request(body: Any) -> tuple[Prompt, dict[str, Any], str | None]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    extra = [k for k in body if k not in (*INPUTS, *PARAMETERS, "parameters", "id")]
    if extra:
        raise BadRequest(f"unexpected input {extra[0]!r} for model '{generate_model()}'")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("parameters must be an object")
    # only the engine's parameters go upstream: the rest would be Triton's or the model's
    # own (as a Triton model ignores parameters it does not know, so does this)
    params = {k: v for k, v in {**{k: body[k] for k in PARAMETERS if k in body},
                                **params}.items() if k in PARAMETERS}
    rid = body.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("id must be a string")

    def one_string(name: str) -> str | None:
        v = body.get(name)
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            v = v[0]  # a tensor of one element, as Triton's JSON allows
        if v is None or isinstance(v, str):
            return v
        if name == "messages" and isinstance(v, list):
            return json.dumps(v)  # the messages themselves rather than their JSON
        raise BadRequest(f"{name} must be a string")

    ids = body.get("input_ids")
    if ids is not None and not (isinstance(ids, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise BadRequest("input_ids must be a list of integers")
    prompt = Prompt(text=one_string("text_input"), messages=one_string("messages"),
                    ids=tuple(ids) if ids is not None else None)
    return prompt, params, rid


class GenerateRoutes:
    def __init__(self, client: GenerateClient,
                 forward: Callable[[web.Request], Awaitable[web.Response]]) -> None:
        self.client, self.forward = client, forward

    def add_to(self, router: UrlDispatcher) -> None:
        router.add_post("/v2/models/{model}/generate", self.generate)
        router.add_post("/v2/models/{model}/generate_stream", self.generate_stream)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=False)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=True)

    def _answer(self, name: str, version: int, rid: str | None, out: Output | None,
                text: str, ids: list[int]) -> dict[str, Any]:
        answer: dict[str, Any] = {"model_name": name, "model_version": str(version)}
        if rid:
            answer["id"] = rid
        return {**answer, "text_output": text, "output_ids": ids,
                "finish_reason": out.finish_reason if out else "",
                "prompt_tokens": out.prompt_tokens if out else 0,
                "completion_tokens": out.completion_tokens if out else 0}

    async def _serve(self, request: web.Request, stream: bool) -> web.StreamResponse:
        target = self.client.routing.active  # one snapshot: this generation stays here
        name = request.match_info["model"]
        if target is None or name not in (generate_model(), served_model(target)):
            return await self.forward(request)  # the router's own, as before
        try:
            try:
                body = parse_json(await request.read())
            except ValueError as e:
                raise BadRequest(f"the request body is not valid JSON: {e}") from None
            except RecursionError:
                raise BadRequest("the request body is not valid JSON: nested too deeply",
                                 ) from None
            prompt, given, rid = _request(body)
            params = upstream_parameters(given)
        except BadRequest as e:
            return _error(e.status, e.message)
        async with self.client.generation(request, target, prompt, params) as gen:
            outputs = aiter(gen)
            version = target.version
            if stream:
                async with EventStream(request, self.client.hub.limits) as events:
                    try:
                        try:
                            await self._events(events, outputs, name, version, rid)
                        except UpstreamError as e:
                            gen.code = e.status
                            if not events.prepared:  # nothing sent yet: 429 with Retry-After
                                return _error(e.status, e.message, e.headers)
                            # the status is sent already (mid-stream, or a heartbeat)
                            await events.send({"error": e.message})
                        return await events.done()
                    except ConnectionError:  # the client went away, or stalled (cut):
                        gen.client_gone()  # leaving cancels upstream
                        return events.response
            try:
                out = await anext(outputs, None)
                texts: list[str] = []
                ids: list[int] = []
                last = out
                while out is not None:
                    texts.append(out.text)
                    ids.extend(out.token_ids)
                    version = out.model_version or version
                    last, out = out, await anext(outputs, None)
                return web.json_response(
                    self._answer(name, version, rid, last, "".join(texts), ids))
            except UpstreamError as e:
                gen.code = e.status
                return _error(e.status, e.message, e.headers)  # 429: with Retry-After

    async def _events(self, events: EventStream, outputs: AsyncIterator[Output], name: str,
                      version: int, rid: str | None) -> None:
        """A generation's responses as server-sent events, one a response. Nothing is sent
        before the first (a refusal is a plain 4xx) unless it takes longer than a
        heartbeat."""
        out = await events.next(outputs)
        while out is not None:
            if out.token_ids or out.text or out.finish_reason:
                await events.send(self._answer(name, out.model_version or version, rid, out,
                                               out.text, list(out.token_ids)))
            out = await events.next(outputs)
