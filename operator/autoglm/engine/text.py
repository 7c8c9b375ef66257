"""Text in and out of the engine: tokenizer, chat template and streaming detokenizer.

Everything is read from a checkpoint's Hugging Face files (``<repo>/router/<V>/hf/``) and
behaves as transformers 5.23's ``AutoTokenizer`` (a ``tokenizers``-backed tokenizer) does:
the same ids from ``encode``, the same text from ``decode`` and the same prompt from
``apply_chat_template``, with no transformers import at serving time. Deliberate differences:

* ``add_bos_token``/``add_eos_token`` in tokenizer_config.json are honoured when tokenizer.json
  has no post-processor (transformers 5.23 drops them whenever tokenizer.json exists, although
  the model expects the token); a tokenizer.json post-processor always wins, as there.
* Text-only content parts (``[{"type": "text", "text": ...}]``) reach the template as one string,
  the parts joined by newlines (as vLLM does): many templates render only string content.
* A ``chat_template.json`` (the processors' legacy file, which ``AutoTokenizer`` ignores) is
  read when neither chat_template.jinja nor tokenizer_config.json has a template.
* Tools must be JSON schemas (no Python callables).
* tokenizer.json is followed as it is. transformers 5.23 rebuilds some tokenizers by
  ``tokenizer_class`` from the file's vocab and merges with a pipeline of its own:
  ``LlamaTokenizer`` (Llama 2, Mistral, Mixtral) swaps the file's Prepend/Replace normalizer for a
  Metaspace pre-tokenizer, so a text that begins with a space gets one "▁" fewer there.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _Backend

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named tokens chat templates see as variables.
NAMED_SPECIAL_TOKENS: tuple[str, ...] = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
# transformers' "no limit" sentinel is int(1e30); configs store it as a float or a long int.
_NO_LIMIT = 10**29
# Tokens of context the detokenizer decodes with the first generated token, so that decoders
# which treat the first token specially (a leading "▁" stripped) see it in mid-text.
_CONTEXT_TOKENS = 6
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

StopReason = Literal["stop_token", "stop_string"]


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message says why in one line."""


class ChatError(TokenizerError):
    """Messages the chat template refuses or that are malformed: the client's error (HTTP 400)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path, *, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path.name} is missing from {path.parent}")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(
            f"{path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} cannot be read: {_one_line(str(e))}") from None


def _read_object(path: Path, *, required: bool) -> dict[str, Any]:
    data = _read_json(path, required=required)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _token(value: Any, where: str) -> AddedToken | None:
    """A special token as tokenizer_config.json or special_tokens_map.json writes it: a string or
    an AddedToken dict (``{"__type": "AddedToken", "content": ...}`` or without ``__type``)."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        fields = {k: v for k, v in value.items() if k != "__type"}
        try:
            return AddedToken(**fields)
        except TypeError as e:
            raise TokenizerError(f"{where}: not a valid AddedToken: {_one_line(str(e))}") from None
    raise TokenizerError(f"{where}: a special token must be a string or an AddedToken dict")


def _as_special(token: AddedToken) -> AddedToken:
    """``token`` flagged special (named special tokens always are, whatever the file says)."""
    if token.special:
        return token
    return AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip,
                      rstrip=token.rstrip, normalized=token.normalized, special=True)


def _stop_ids(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{where}: eos_token_id must be an integer or a list of integers")
    return tuple(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------------
# Chat templates, compiled as transformers' ``_cached_compile_jinja_template`` does


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}`` block, which marks assistant text for training masks;
    templates that use it fail to parse without it. Rendered as its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_generation_support")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _generation_support(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # transformers' name: templates may pass format=
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` in templates, without the attributes that lead out of the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace`` in templates; underscore names would reach CPython internals."""

    def __init__(self, /, *args: Any, **kwargs: Any) -> None:
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                "Chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"but got {name!r}. Please rename the attribute.")


def compile_chat_template(source: str, name: str = "default") -> jinja2.Template:
    """``source`` compiled in transformers' environment; TokenizerError when it is not Jinja."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        which = "chat template" if name == "default" else f"chat template {name!r}"
        raise TokenizerError(
            f"{which} is not valid Jinja: {_one_line(e.message or '')} (line {e.lineno})"
        ) from None


def _plain(value: Any) -> Any:
    """transformers' ``_plain_template_data``: what templates see is rebuilt from plain JSON
    types, so no caller object's methods reach the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """Older names of a message's reasoning filled in under the standard one (and ``thinking``,
    which gpt-oss templates read), as transformers does."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatError(f"{where}.content must be a string or a list of text parts, "
                        f"not {type(content).__name__}")
    texts: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatError(f"{where}.content[{j}] must be a text part "
                            f'{{"type": "text", "text": ...}}, not {kind!r}')
        if not isinstance(part.get("text"), str):
            raise ChatError(f"{where}.content[{j}].text must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def _validated(messages: Any) -> list[dict[str, Any]]:
    """Messages as the template gets them: checked, text parts joined, None-valued keys dropped
    (OpenAI clients send ``content: null`` next to tool calls; templates expect no key)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ChatError("messages must be a list of {role, content} objects")
    if not messages:
        raise ChatError("messages must not be empty")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ChatError(f"{where} must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatError(f"{where}.role must be a non-empty string")
        clean = {k: v for k, v in message.items() if v is not None}
        if "content" in clean:
            clean["content"] = _content_text(clean["content"], where)
        elif not clean.get("tool_calls"):
            raise ChatError(f"{where}.content is missing")
        out.append(clean)
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer


@dataclasses.dataclass(frozen=True)
class _Specials:
    named: dict[str, AddedToken]  # bos_token, ..., and model-specific *_token names
    extra: list[AddedToken]  # extra_special_tokens / additional_special_tokens


def _specials(config: dict[str, Any], special_map: dict[str, Any]) -> _Specials:
    """The named and extra special tokens, merged from tokenizer_config.json and (when the config
    predates ``added_tokens_decoder``, as transformers reads it) special_tokens_map.json."""
    cfg = dict(config)
    if "added_tokens_decoder" not in cfg:
        for key, value in special_map.items():
            if key in ("additional_special_tokens", "extra_special_tokens") \
                    and isinstance(value, list):
                have = list(cfg.get("extra_special_tokens") or
                            cfg.get("additional_special_tokens") or [])
                cfg["extra_special_tokens"] = have + [v for v in value if v not in have]
            else:
                cfg[key] = value
    extra_raw = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
    named: dict[str, AddedToken] = {}
    # Model-specific names (``image_token``, ...) are special tokens and template variables too.
    if isinstance(extra_raw, dict):
        candidates: dict[str, Any] = {**cfg, **extra_raw}
        extra_raw = []
    else:
        candidates = cfg
    for key, value in candidates.items():
        if key in NAMED_SPECIAL_TOKENS or (key.endswith("_token") and (
                isinstance(value, str) or (isinstance(value, dict) and "content" in value))):
            token = _token(value, f"tokenizer_config.json {key}")
            if token is not None:
                named[key] = _as_special(token)
    if not isinstance(extra_raw, list):
        raise TokenizerError("tokenizer_config.json extra_special_tokens must be a list or a dict")
    extra = [_as_special(t) for i, v in enumerate(extra_raw)
             if (t := _token(v, f"tokenizer_config.json extra_special_tokens[{i}]")) is not None]
    ordered = {k: named[k] for k in NAMED_SPECIAL_TOKENS if k in named}
    ordered.update(named)
    return _Specials(ordered, extra)


class Tokenizer:
    """A checkpoint's tokenizer, chat template and stop tokens (see the module docstring)."""

    def __init__(self, backend: _Backend, *, special_tokens: Mapping[str, str],
                 stop_token_ids: Sequence[int], chat_templates: Mapping[str, str] | None = None,
                 model_max_length: int | None = None, clean_up_tokenization_spaces: bool = False,
                 generation_config: Mapping[str, Any] | None = None,
                 fallback_byte_ids: Iterable[int] = ()) -> None:
        self.backend = backend
        # Decoding and encoding one text never pads or truncates (transformers' defaults).
        self.backend.no_padding()
        self.backend.no_truncation()
        self.special_tokens_map: dict[str, str] = dict(special_tokens)
        self.stop_token_ids: tuple[int, ...] = tuple(stop_token_ids)
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self._compiled = {name: compile_chat_template(src, name)
                          for name, src in self.chat_templates.items()}
        self.model_max_length = model_max_length
        self.generation_config: dict[str, Any] = dict(generation_config or {})
        # transformers skips the clean-up for BPE models: it would eat spaces before punctuation.
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        self._special_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._fallback_bytes = frozenset(fallback_byte_ids)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a checkpoint's tokenizer files (tokenizer.json is required)."""
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"tokenizer directory {root} does not exist")
        tokenizer_json = root / "tokenizer.json"
        # Read first: a JSON error reads better than the backend's; the decoder is needed below.
        spec = _read_json(tokenizer_json, required=True)
        try:
            backend = _Backend.from_file(str(tokenizer_json))
        except Exception as e:  # the backend raises plain Exception for a malformed file
            raise TokenizerError(
                f"{tokenizer_json} is not a tokenizers file: {_one_line(str(e))}") from None
        config = _read_object(root / "tokenizer_config.json", required=False)
        special_map = _read_object(root / "special_tokens_map.json", required=False)
        specials = _specials(config, special_map)
        cls._add_missing_tokens(backend, config, specials)
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        cls._bos_eos(backend, config, specials)

        generation = _read_object(root / "generation_config.json", required=False)
        model_config = _read_object(root / "config.json", required=False)
        stops = (_stop_ids(generation.get("eos_token_id"), "generation_config.json")
                 or _stop_ids(model_config.get("eos_token_id"), "config.json"))
        if stops is None:
            eos = specials.named.get("eos_token")
            eos_id = backend.token_to_id(eos.content) if eos is not None else None
            stops = (eos_id,) if eos_id is not None else ()

        max_len = config.get("model_max_length")
        if isinstance(max_len, bool) or not isinstance(max_len, int | float | None):
            raise TokenizerError("tokenizer_config.json model_max_length must be a number")
        return cls(
            backend,
            special_tokens={k: t.content for k, t in specials.named.items()},
            stop_token_ids=stops,
            chat_templates=cls._chat_templates(root, config),
            model_max_length=int(max_len) if max_len is not None and max_len < _NO_LIMIT else None,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            generation_config=generation,
            fallback_byte_ids=_fallback_byte_ids(backend, spec),
        )

    @staticmethod
    def _add_missing_tokens(backend: _Backend, config: dict[str, Any], specials: _Specials,
                            ) -> None:
        """As transformers' tokenizer __init__: tokens of ``added_tokens_decoder`` the backend
        lacks, then special tokens that are not added tokens yet (even when in the base vocab:
        they then match whole, and decode is told they are special)."""
        have = {repr(t) for t in backend.get_added_tokens_decoder().values()}
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise TokenizerError("tokenizer_config.json added_tokens_decoder must be an object")
        to_add: list[AddedToken] = []
        try:
            entries = sorted(decoder.items(), key=lambda kv: int(kv[0]))
        except ValueError:
            raise TokenizerError("tokenizer_config.json added_tokens_decoder keys must be ids"
                                 ) from None
        for key, value in entries:
            token = _token(value, f"tokenizer_config.json added_tokens_decoder[{key}]")
            if token is not None and repr(token) not in have:
                to_add.append(token)
        contents = {t.content for t in backend.get_added_tokens_decoder().values()}
        contents.update(t.content for t in to_add)
        for token in [*specials.named.values(), *specials.extra]:
            if token.content not in contents:
                to_add.append(token)
                contents.add(token.content)
        if to_add:
            backend.add_tokens(to_add)

    @staticmethod
    def _bos_eos(backend: _Backend, config: dict[str, Any], specials: _Specials) -> None:
        """``add_bos_token``/``add_eos_token`` for a tokenizer.json without a post-processor
        (single texts only: the engine never encodes pairs)."""
        if backend.post_processor is not None:
            return
        parts = ["$A:0"]
        tokens: list[tuple[str, int]] = []
        for flag, name in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
            token = specials.named.get(name)
            token_id = backend.token_to_id(token.content) if token is not None else None
            if config.get(flag) is True and token is not None and token_id is not None:
                at = 0 if name == "bos_token" else len(parts)
                parts.insert(at, f"{token.content}:0")
                tokens.append((token.content, token_id))
        if tokens:
            backend.post_processor = processors.TemplateProcessing(
                single=" ".join(parts), special_tokens=tokens)

    @staticmethod
    def _chat_templates(root: Path, config: dict[str, Any]) -> dict[str, str]:
        """Named templates; a single one is ``default``. transformers' order: chat_template.jinja
        over tokenizer_config.json; then our fallback, chat_template.json."""
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                return {"default": jinja_file.read_text(encoding="utf-8")}
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{jinja_file} cannot be read: {_one_line(str(e))}") from None
        where = "tokenizer_config.json"
        value = config.get("chat_template")
        if value is None:
            where = "chat_template.json"
            value = _read_object(root / where, required=False).get("chat_template")
        if value is None:
            return {}
        if isinstance(value, str):
            return {"default": value}
        if isinstance(value, list) and all(
                isinstance(t, dict) and isinstance(t.get("name"), str)
                and isinstance(t.get("template"), str) for t in value):
            return {t["name"]: t["template"] for t in value}
        raise TokenizerError(f"{where} chat_template must be a string or a list of "
                             '{"name", "template"} objects')

    # -- vocabulary ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """The vocabulary size with added tokens (transformers' ``len(tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return self.backend.token_to_id(token) if token is not None else None

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    def is_fallback_byte(self, token_id: int) -> bool:
        """Whether ``token_id`` is a ``<0xNN>`` token of a ByteFallback decoder, whose text
        depends on the byte tokens after it."""
        return token_id in self._fallback_bytes

    def is_special(self, token_id: int) -> bool:
        """Whether ``decode(..., skip_special_tokens=True)`` drops ``token_id``."""
        return token_id in self._special_ids

    # -- text ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the post-processor adds (a
        BOS, say), as transformers' ``encode`` does by default. Chat prompts already hold
        theirs: encode them with ``add_special_tokens=False``."""
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a string, not {type(text).__name__}")
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (ids outside the vocabulary are skipped, as transformers does)."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    # -- chat ---------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default template's source."""
        return self.chat_templates.get("default")

    def _template(self, tools: object) -> jinja2.Template:
        # transformers: "tool_use" when tools are given and the checkpoint names one.
        if tools is not None and "tool_use" in self._compiled:
            return self._compiled["tool_use"]
        if "default" in self._compiled:
            return self._compiled["default"]
        if self._compiled:
            raise TokenizerError("the checkpoint has several chat templates and no default: "
                                 + ", ".join(sorted(self._compiled)))
        raise TokenizerError("the checkpoint has no chat template")

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            **kwargs: Any) -> str:
        """The prompt for ``messages``, rendered as transformers'
        ``apply_chat_template(..., tokenize=False)``; ``kwargs`` are template variables
        (``enable_thinking``, ...) and override the special tokens' names.
        ChatError when the messages are malformed or the template refuses them."""
        template = self._template(tools)
        chat = [_alias_reasoning(_plain(m)) for m in _validated(messages)]
        if tools is not None and (isinstance(tools, str | bytes | Mapping) or
                                  not all(isinstance(t, Mapping) for t in tools)):
            raise ChatError("tools must be a list of JSON schema objects")
        if documents is not None and (isinstance(documents, str | bytes | Mapping) or
                                      not all(isinstance(d, Mapping) for d in documents)):
            raise ChatError("documents must be a list of objects")
        variables = _plain({**self.special_tokens_map, **kwargs})
        try:
            return template.render(
                messages=chat, tools=_plain(list(tools) if tools is not None else None),
                documents=_plain(list(documents) if documents is not None else None),
                add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatError(f"chat template: {_one_line(str(e.message or e))}") from None
        except Exception as e:  # the template is the checkpoint's code: whatever it raises
            raise ChatError(f"chat template failed: {type(e).__name__}: {_one_line(str(e))}"
                            ) from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any,
                    ) -> list[int]:
        """The prompt's ids; the template writes its own special tokens, so none are added
        (transformers' ``apply_chat_template(tokenize=True)``)."""
        prompt = self.apply_chat_template(messages, add_generation_prompt, tools, **kwargs)
        return self.encode(prompt, add_special_tokens=False)


def _decoder_types(decoder: Any) -> Iterator[str]:
    if isinstance(decoder, dict):
        if isinstance(decoder.get("type"), str):
            yield decoder["type"]
        for inner in decoder.get("decoders") or ():
            yield from _decoder_types(inner)


def _fallback_byte_ids(backend: _Backend, spec: Any) -> frozenset[int]:
    """The ``<0xNN>`` tokens when the decoder has a ByteFallback step (sentencepiece-style
    vocabularies: Llama 2, Mistral/Mixtral), else none."""
    decoder = spec.get("decoder") if isinstance(spec, dict) else None
    if "ByteFallback" not in set(_decoder_types(decoder)):
        return frozenset()
    byte = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    return frozenset(i for t, i in backend.get_vocab(with_added_tokens=False).items()
                     if byte.fullmatch(t))


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (WordPiece-era spacing before punctuation)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


# ---------------------------------------------------------------------------------------------
# Streaming


class Detokenizer:
    """Incremental decoding of one generation, with stop tokens and stop strings.

    ``push(token_id)`` returns the text that became final with that token, ``finish()`` the
    rest; together they are ``tokenizer.decode(ids, skip_special_tokens)`` of the ids pushed,
    cut before the first stop string (OpenAI semantics: the stop string is not returned). Held
    back meanwhile: an incomplete UTF-8 character (the decoded window ends in U+FFFD) and a tail
    that may be the start of a stop string. A stop token (``stop_token_ids``, by default the
    checkpoint's EOS ids) ends the generation without text of its own.

    Each push decodes a short window (the tokens last released, then the new ones), so a step
    costs the same however long the generation is. ``context_ids``: the tokens before the
    generation (the prompt), decoded as its left context (so "▁Paris" after the prompt gives
    " Paris", not "Paris"), never returned.

    Not tokenizers' ``DecodeStream`` (0.23.3): on a ByteFallback vocabulary (Llama 2,
    Mistral, Mixtral) a run of byte tokens that is not valid UTF-8 decodes to U+FFFDs, ASCII
    bytes included, and the next token makes it raise "Invalid prefix encountered while
    decoding stream" (e.g. ``<0x3F>``, ``<0xBA>``, ``▁world,``: it had released "?"), which
    would fail the request; ``_in_byte_run`` holds such a run instead.
    """

    def __init__(self, tokenizer: Tokenizer, *, stop: Sequence[str] = (),
                 stop_token_ids: Iterable[int] | None = None, skip_special_tokens: bool = True,
                 context_ids: Sequence[int] = ()) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if not all(isinstance(s, str) and s for s in stop):
            raise TokenizerError("stop strings must be non-empty strings")
        self._tokenizer = tokenizer
        self._stop = tuple(dict.fromkeys(stop))
        self._stop_ids = frozenset(tokenizer.stop_token_ids if stop_token_ids is None
                                   else stop_token_ids)
        self._skip = skip_special_tokens
        # The window: ids[prefix:read] was released already, ids[read:] not yet.
        self._ids: list[int] = list(context_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._pending = ""  # decoded text held back for the stop strings
        self._text: list[str] = []
        self._finished = False
        self.stopped = False
        self.stop_reason: StopReason | None = None
        self.stop_match: int | str | None = None  # the stop token id or the stop string

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._text)

    @property
    def finish_reason(self) -> Literal["stop"] | None:
        """OpenAI's ``finish_reason`` when a stop ended the generation ("length" is the
        caller's, who counts tokens)."""
        return "stop" if self.stopped else None

    def push(self, token_id: int) -> str:
        """Text final with ``token_id`` ("" once stopped or finished: the generation is over)."""
        if self.stopped or self._finished:
            return ""
        if token_id in self._stop_ids:
            self._stop_as("stop_token", token_id)
            return self._release(self._flush_window(), final=True)
        self._ids.append(token_id)
        return self._release(self._step_window(), final=False)

    def finish(self) -> str:
        """The text still held back, at the end of the generation (not a stop: no reason)."""
        if self.stopped or self._finished:
            return ""
        self._finished = True
        return self._release(self._flush_window(), final=True)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _step_window(self) -> str:
        # Released text decoded again as the left context of the new tokens: decoders treat the
        # first token specially, and byte-level tokens only make characters together.
        if self._in_byte_run():
            return ""
        before = self._decode(self._prefix, self._read)
        now = self._decode(self._prefix)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        # The next base starts where this release started: a character boundary, and it holds
        # text, so the decoder's first-token treatment falls on released text only.
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before):]

    def _in_byte_run(self) -> bool:
        """Whether the text ends in a run of ByteFallback byte tokens: the decoder turns a whole
        run into U+FFFDs when it is not valid UTF-8 (its ASCII bytes too), so the run's text is
        final only when another token ends it. Skipped special tokens do not end a run: the
        decoder never sees them."""
        for token_id in reversed(self._ids):
            if not (self._skip and self._tokenizer.is_special(token_id)):
                return self._tokenizer.is_fallback_byte(token_id)
        return False

    def _flush_window(self) -> str:
        if self._read >= len(self._ids):
            return ""
        before = self._decode(self._prefix, self._read)
        now = self._decode(self._prefix)
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before):]

    def _stop_as(self, reason: StopReason, match: int | str) -> None:
        self.stopped, self.stop_reason, self.stop_match = True, reason, match

    def _release(self, chunk: str, *, final: bool) -> str:
        pending = self._pending + chunk
        hits = [(i, s) for s in self._stop if (i := pending.find(s)) >= 0]
        if hits:
            at, match = min(hits, key=lambda h: h[0])
            out, pending = pending[:at], ""
            if not self.stopped:
                self._stop_as("stop_string", match)
        elif final or not self._stop:
            out, pending = pending, ""
        else:
            keep = self._partial_stop(pending)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self._pending = pending
        self._text.append(out)
        return out

    def _partial_stop(self, text: str) -> int:
        """The length of the longest tail of ``text`` that begins some stop string."""
        longest = min(len(text), max(len(s) for s in self._stop) - 1)
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
