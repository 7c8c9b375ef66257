"""Text in, text out: the engine with the checkpoint's tokenizer, chat template and stop rules.

What the Triton ``generate`` model and the tests drive: :meth:`TextEngine.submit` takes a
prompt (text, chat messages or token ids) and the request's parameters, :meth:`step` runs one
engine iteration and returns, per request, the text that became final with its new tokens.
A stop string ends a generation at once (its cache is freed), as does the tokenizer's EOS
unless ``ignore_eos``. No Triton import: unit tests drive it directly.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autoglm.engine.errors import RequestError
from autoglm.engine.sampler import SamplingParams
from autoglm.engine.scheduler import Engine, Request, StepError
from autoglm.engine.text import Detokenizer, Tokenizer, TokenizerError

# OpenAI's defaults: a completion makes 16 tokens, a chat reply runs to the end of the window
DEFAULT_MAX_TOKENS = 16
# request parameters a client may set, and their types
PARAMETERS: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,), "temperature": (int, float), "top_p": (int, float),
    "top_k": (int,), "seed": (int,), "stop": (str, list), "ignore_eos": (bool,),
}


@dataclass(frozen=True)
class Chunk:
    """What one step made for request ``id``: text now final and the new token ids; the
    last chunk of a generation has ``finish_reason`` ("stop" or "length")."""

    id: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def merge(chunks: Sequence[Chunk]) -> Chunk:
    """Consecutive chunks of one request as one (a response carrying several tokens, as a
    stream interval sends them): their text and token ids joined in order, the last one's
    finish reason and counts (``completion_tokens`` counts every token so far)."""
    if not chunks:
        raise ValueError("nothing to merge")
    last = chunks[-1]
    if len(chunks) == 1:
        return last
    if any(c.id != last.id for c in chunks):
        raise ValueError("chunks of different requests")
    return Chunk(last.id, "".join(c.text for c in chunks),
                 tuple(t for c in chunks for t in c.token_ids), last.finish_reason,
                 last.prompt_tokens, last.completion_tokens)


@dataclass
class _Live:
    detok: Detokenizer
    prompt_tokens: int
    completion_tokens: int = 0


def parse_parameters(given: Mapping[str, Any], chat: bool = False,
                     ) -> tuple[SamplingParams, list[str], bool]:
    """(sampling, stop strings, ignore_eos) from a request's parameters; RequestError names
    the parameter that is wrong. Unknown keys are ignored (transports add their own)."""
    p: dict[str, Any] = {}
    for key, types in PARAMETERS.items():
        if key not in given or given[key] is None:
            continue
        value = given[key]
        if key == "stop" and isinstance(value, str) and value.startswith("["):
            with contextlib.suppress(ValueError):
                value = json.loads(value)  # a list passed as one string parameter
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise RequestError(f"{key} must be {' or '.join(t.__name__ for t in types)}, "
                               f"got {value!r}")
        p[key] = value
    stop = p.pop("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of at most 16 of them")
    ignore_eos = bool(p.pop("ignore_eos", False))
    params = SamplingParams(max_tokens=p.pop("max_tokens", None if chat else DEFAULT_MAX_TOKENS),
                            temperature=float(p.pop("temperature", 1.0)),
                            top_p=float(p.pop("top_p", 1.0)), top_k=p.pop("top_k", 0),
                            seed=p.pop("seed", None))
    params.validate()
    return params, stop, ignore_eos


class TextEngine:
    def __init__(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._live: dict[int, _Live] = {}

    def prompt_ids(self, text: str | None = None,
                   messages: Sequence[Mapping[str, Any]] | None = None,
                   ids: Sequence[int] | None = None) -> list[int]:
        given = [x for x in (text, messages, ids) if x is not None]
        if len(given) != 1:
            raise RequestError("give exactly one of a prompt text, chat messages or token ids")
        try:
            if text is not None:
                return self.tokenizer.encode(text)
            if messages is not None:
                return self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except TokenizerError as e:
            raise RequestError(str(e)) from None
        return [int(t) for t in ids or ()]

    def submit(self, params: Mapping[str, Any], text: str | None = None,
               messages: Sequence[Mapping[str, Any]] | None = None,
               ids: Sequence[int] | None = None) -> int:
        """Queue a generation; :class:`RequestError` (one line) if it cannot be served."""
        sampling, stop, ignore_eos = parse_parameters(params, chat=messages is not None)
        prompt = self.prompt_ids(text, messages, ids)
        eos = () if ignore_eos else self.tokenizer.stop_token_ids
        try:
            detok = Detokenizer(self.tokenizer, stop=stop, stop_token_ids=eos,
                                context_ids=prompt)
        except TokenizerError as e:
            raise RequestError(str(e)) from None
        rid = self.engine.add(Request(prompt, sampling, eos_ids=eos))
        self._live[rid] = _Live(detok, len(prompt))
        return rid

    def abort(self, rid: int) -> None:
        """Stop request ``rid`` now (a client went away): its cache is freed at once."""
        self.engine.abort(rid)
        self._live.pop(rid, None)

    @property
    def active(self) -> int:
        return len(self._live)

    def step(self) -> list[Chunk]:
        """One iteration; a :class:`StepError` (an expert down) ends its requests."""
        out: list[Chunk] = []
        try:
            events = self.engine.step()
        except StepError as e:
            for rid in e.ids:
                self._live.pop(rid, None)
            raise
        for ev in events:
            live = self._live.get(ev.id)
            if live is None:  # aborted meanwhile
                continue
            live.completion_tokens += 1
            text = live.detok.push(ev.token)
            finish = ev.finish
            if live.detok.stopped:
                finish = "stop"
                if ev.finish is None:
                    self.engine.abort(ev.id)  # a stop string: end it now
            if finish is not None:
                text += live.detok.finish()
                del self._live[ev.id]
            out.append(Chunk(ev.id, text, (ev.token,), finish, live.prompt_tokens,
                             live.completion_tokens))
        return out
