"""The OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions``, streamed as server-sent events with ``stream: true``, so the
stock ``openai`` client works unchanged.

The model id is the served model's name (``Target.model``). One choice per request (``n``
is 1); fields that would change the answer in ways the engine cannot honour (logprobs, echo,
best_of, penalties, tools, ...) are refused by name rather than ignored. ``top_k`` and
``ignore_eos`` are accepted as extensions (the client sends them via ``extra_body``). Errors
are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; the engine's own
refusals (a prompt beyond the context window, a parameter out of range) come back as 400
with its one-line message; a router too busy to queue one more (saturated) is 429 with
``Retry-After``, type ``requests`` and code ``rate_limit_exceeded`` as OpenAI's own rate
limits (the stock client raises ``RateLimitError``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from autoglm.gateway.generation import (
    BadRequest,
    GenerateClient,
    Output,
    Param,
    Prompt,
    UpstreamError,
    upstream_parameters,
)
from autoglm.gateway.routing import Target, parse_json, served_model
from autoglm.gateway.sse import EventStream

if TYPE_CHECKING:
    from aiohttp.web_urldispatcher import UrlDispatcher

# The engine's sampling parameters, as OpenAI names them (top_k, ignore_eos: extensions).
SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


def _unset(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == "" or v == [] or v == {}


# Fields whose use the engine cannot honour, and when a value counts as "used".
UNSUPPORTED_COMPLETIONS: dict[str, Callable[[Any], bool]] = {
    "logprobs": lambda v: v is not None, "echo": lambda v: bool(v),
    "best_of": lambda v: v not in (None, 1), "suffix": lambda v: not _unset(v),
    "logit_bias": lambda v: not _unset(v), "presence_penalty": lambda v: not _unset(v),
    "frequency_penalty": lambda v: not _unset(v),
}
UNSUPPORTED_CHAT: dict[str, Callable[[Any], bool]] = {
    "logprobs": lambda v: bool(v), "top_logprobs": lambda v: v is not None,
    "logit_bias": lambda v: not _unset(v), "presence_penalty": lambda v: not _unset(v),
    "frequency_penalty": lambda v: not _unset(v), "tools": lambda v: not _unset(v),
    "functions": lambda v: not _unset(v),
    "tool_choice": lambda v: v not in (None, "none"),
    "function_call": lambda v: v not in (None, "none"),
    "response_format": lambda v: v is not None and not (
        isinstance(v, dict) and v.get("type") == "text"),
    "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
    "prediction": lambda v: v is not None,
}
# "max_tokens must be ..." → param max_tokens
PARAM_IN_MESSAGE = re.compile(r"^(\w+) (must|is|are) ")


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    if status == 429:  # as OpenAI's request rate limit
        kind, code = "requests", code or "rate_limit_exceeded"
    else:
        kind = "invalid_request_error" if status < 500 else \
            ("service_unavailable" if status == 503 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error(status: int, message: str, param: str | None = None,
          code: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param, code), status=status)


def _upstream_error_body(e: UpstreamError, prompt_param: str) -> dict[str, Any]:
    if e.status >= 500 or e.status in (429, 499):
        return error_body(e.status, e.message)
    if "context window" in e.message:
        return error_body(e.status, e.message, prompt_param, "context_length_exceeded")
    m = PARAM_IN_MESSAGE.match(e.message)
    param = m.group(1) if m and m.group(1) in ("max_tokens", *SAMPLING) else None
    return error_body(e.status, e.message, param)


def _upstream_error(e: UpstreamError, prompt_param: str) -> web.Response:
    return web.json_response(_upstream_error_body(e, prompt_param), status=e.status,
                             headers=e.headers)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = parse_json(raw)
    except ValueError as e:  # UnicodeDecodeError included
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("the request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _usage(last: Output | None) -> dict[str, int]:
    prompt = last.prompt_tokens if last else 0
    completion = last.completion_tokens if last else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finish(last: Output | None) -> str:
    # a final response without a reason only follows a cancellation; "stop" is the closest
    return (last.finish_reason if last else "") or "stop"


async def _events(events: EventStream, outputs: AsyncIterator[Output], reply: _Reply,
                  ) -> web.StreamResponse:
    """A generation's chunks as server-sent events, then ``[DONE]``. Nothing is sent before
    the first response (a refusal is a plain 4xx) unless it takes longer than a heartbeat."""
    out = await events.next(outputs)
    reply.version(out)
    if reply.chat:
        await events.send(reply.chunk({"role": "assistant", "content": ""}))
    last = out
    while out is not None:
        reply.version(out)
        if out.text:
            await events.send(reply.chunk({"content": out.text} if reply.chat else out.text))
        last, out = out, await events.next(outputs)
    await events.send(reply.chunk({} if reply.chat else "", _finish(last)))
    if reply.usage_in_chunks:
        await events.send(reply.usage_chunk(last))
    await events.send("[DONE]")
    return await events.done()


class OpenAIRoutes:
    def __init__(self, client: GenerateClient) -> None:
        self.client = client
        self.created = int(time.time())

    def add_to(self, router: UrlDispatcher) -> None:
        router.add_get("/v1/models", self.models)
        router.add_get("/v1/models/{model}", self.model)
        router.add_post("/v1/completions", self.completions)
        router.add_post("/v1/chat/completions", self.chat)
        router.add_route("*", "/v1{tail:.*}", self.unknown)

    # -- models --------------------------------------------------------------------------

    def _card(self, target: Target) -> dict[str, Any]:
        return {"id": served_model(target), "object": "model", "created": self.created,
                "owned_by": "autoglm"}

    async def models(self, _: web.Request) -> web.Response:
        target = self.client.routing.active
        return web.json_response({"object": "list",
                                  "data": [self._card(target)] if target else []})

    async def model(self, request: web.Request) -> web.Response:
        target = self.client.routing.active
        name = request.match_info["model"]
        if target is None or name != served_model(target):
            return error(404, f"The model `{name}` does not exist.", "model",
                         "model_not_found")
        return web.json_response(self._card(target))

    async def unknown(self, request: web.Request) -> web.Response:
        return error(404, f"Unknown request URL: {request.method} {request.path}.", None,
                     "unknown_url")

    # -- generation ----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        target = self.client.routing.active  # one snapshot: this generation stays here
        if target is None:
            return error(503, "no model is being served (no active slot)")
        prompt_param = "messages" if chat else "prompt"
        try:
            body = await _json_body(request)
            self._check_model(body, target)
            prompt = _chat_prompt(body) if chat else _completion_prompt(body)
            params = _parameters(body, chat)
            stream = _flag(body, "stream")
            options = body.get("stream_options")
            if options is not None and not isinstance(options, dict):
                raise BadRequest("stream_options must be an object", "stream_options")
            usage_chunk = stream and _flag(options or {}, "include_usage")
        except BadRequest as e:
            code = "model_not_found" if e.status == 404 else None
            return error(e.status, e.message, e.param, code)
        reply = _Reply(served_model(target), chat, usage_chunk)
        async with self.client.generation(request, target, prompt, params) as gen:
            outputs = aiter(gen)
            if stream:
                async with EventStream(request, self.client.hub.limits) as events:
                    try:
                        try:
                            return await _events(events, outputs, reply)
                        except UpstreamError as e:
                            gen.code = e.status
                            if not events.prepared:  # nothing sent yet: a plain 4xx
                                return _upstream_error(e, prompt_param)
                            # the status is sent already (mid-stream, or a heartbeat)
                            await events.send(_upstream_error_body(e, prompt_param))
                            await events.send("[DONE]")
                            return await events.done()
                    except ConnectionError:  # the client went away, or stalled (cut):
                        gen.client_gone()  # leaving cancels upstream
                        return events.response
            try:
                out = await anext(outputs, None)
                texts, last = [], out
                while out is not None:
                    texts.append(out.text)
                    last, out = out, await anext(outputs, None)
                return web.json_response(reply.whole("".join(texts), last))
            except UpstreamError as e:
                gen.code = e.status
                return _upstream_error(e, prompt_param)

    def _check_model(self, body: Mapping[str, Any], target: Target) -> None:
        name = body.get("model")
        if name is None:
            return  # as vLLM: the one model served
        if not isinstance(name, str):
            raise BadRequest("model must be a string", "model")
        if name != served_model(target):
            raise BadRequest(f"The model `{name}` does not exist.", "model", status=404)


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{key} must be a boolean, got {value!r}", key)
    return bool(value)


def _unsupported(body: Mapping[str, Any], rules: Mapping[str, Callable[[Any], bool]]) -> None:
    used = [k for k, used in rules.items() if k in body and used(body[k])]
    if used:
        raise BadRequest(f"not supported: {', '.join(used)}", used[0])


def _parameters(body: Mapping[str, Any], chat: bool) -> dict[str, Param]:
    _unsupported(body, UNSUPPORTED_CHAT if chat else UNSUPPORTED_COMPLETIONS)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise BadRequest(f"n must be 1 (one choice per request), got {n!r}", "n")
    given = {k: body.get(k) for k in SAMPLING}
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    given["max_tokens"] = max_tokens
    return upstream_parameters(given)


def _token_ids(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        return tuple(value)
    return None


def _completion_prompt(body: Mapping[str, Any]) -> Prompt:
    if "prompt" not in body or body["prompt"] is None:
        raise BadRequest("Missing required parameter: 'prompt'.", "prompt")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return Prompt(text=p)
    ids = _token_ids(p)
    if ids is not None:
        return Prompt(ids=ids)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, str | list) for x in p):
        raise BadRequest("a batch of prompts is not supported: send one prompt per request",
                         "prompt")
    raise BadRequest("prompt must be a string or a non-empty list of token ids", "prompt")


def _content(content: Any, i: int) -> str | None:
    """A message's content as text: a string, or text parts (joined)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                 f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts",
                     f"messages[{i}].content")


def _chat_prompt(body: Mapping[str, Any]) -> Prompt:
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("Missing required parameter: 'messages'.", "messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string role",
                             f"messages[{i}]")
        out.append({**m, "content": _content(m.get("content"), i)})
    return Prompt(messages=json.dumps(out))


class _Reply:
    """OpenAI's response and chunk shapes for one generation."""

    def __init__(self, model: str, chat: bool, usage_chunk: bool) -> None:
        self.model, self.chat, self.usage_in_chunks = model, chat, usage_chunk
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.fingerprint: str | None = None

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def version(self, out: Output | None) -> None:
        if out is not None and out.model_version:
            self.fingerprint = f"v{out.model_version}"  # the version that served it

    def whole(self, text: str, last: Output | None) -> dict[str, Any]:
        self.version(last)
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                      "message": {"role": "assistant", "content": text},
                                      "finish_reason": _finish(last)}
            return {**self._head("chat.completion"), "choices": [choice],
                    "usage": _usage(last)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(last)}
        return {**self._head("text_completion"), "choices": [choice], "usage": _usage(last)}

    def chunk(self, delta: dict[str, Any] | str, finish: str | None = None,
              ) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            out = {**self._head("text_completion"),
                   "choices": [{"index": 0, "text": delta, "logprobs": None,
                                "finish_reason": finish}]}
        if self.usage_in_chunks:
            out["usage"] = None  # as OpenAI: null on every chunk but the last
        return out

    def usage_chunk(self, last: Output | None) -> dict[str, Any]:
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return {**head, "choices": [], "usage": _usage(last)}
