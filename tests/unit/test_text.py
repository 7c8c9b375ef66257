"""Tokenizer, chat template and streaming detokenizer, against transformers' AutoTokenizer.

Three tokenizers: the tiny models' (printable ASCII + merges, ChatML, no BOS); a Llama-3-style
byte-level BPE trained here on a few sentences (BOS added by its post-processor, named
templates, system prompt logic, a legacy special_tokens_map.json, a model-specific token), so
multi-byte characters are split across tokens; and a Mistral/Mixtral-style sentencepiece BPE
("▁" for spaces, <0xNN> byte fallback, a decoder that strips the first space, [INST] template).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Tokenizer as Backend
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from autoglm.engine.text import ChatError, Detokenizer, Tokenizer, TokenizerError
from autoglm.models.vocab import EOS_ID, write_tokenizer

LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>")
PAD = "<|finetune_right_pad_id|>"  # only in special_tokens_map.json: added when loading
IMAGE = "<|image|>"  # a model-specific named token, in tokenizer_config.json only
LLAMA_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = (
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "The assistant answers the user; the system prompt says what to do.",
    "Café crème brûlée — naïve façade, déjà vu.",
    "日本語のテキストです。東京は日本の首都です。",
    "Emoji 🎉🚀 and check marks ✓✓ in text.",
)
# Llama 3.1's shape: BOS, a system turn always (a default system prompt), tools as JSON in the
# system turn, roles checked; plus what transformers' environment adds (namespace, loop
# controls, the generation tag, strftime_now) and blocks without "-" (trim/lstrip_blocks).
LLAMA_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%Y") %}
{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are a helpful assistant." %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
<|start_header_id|>system<|end_header_id|>

{% if tools is not none %}
Environment: ipython
    {% for tool in tools %}
{{ tool | tojson(indent=4) }}
    {% endfor %}
{% endif %}
Year: {{ date_string }}

{{ system_message }}<|eot_id|>
{% for message in messages %}
    {% if message.role not in ['user', 'assistant'] %}
        {{ raise_exception('Conversation roles must be user or assistant after system') }}
    {% endif %}
    {% if message.content == '' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|start_header_id|>{{ message.role }}<|end_header_id|>

{% if message.role == 'assistant' %}{% generation %}{{ message.content | trim }}\
{% endgeneration %}{% else %}{{ message.content | trim }}{% endif %}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""
LLAMA_TOOL_TEMPLATE = LLAMA_TEMPLATE + (
    "{{ dict(turns=ns.turns, note=\"<é & 'x'>\") | tojson }}"
    "{{ dict.fromkeys(['a', 'b'], 0) | tojson(separators=(',', ':')) }}")

# Mistral's v1 shape: the system prompt joins the first user turn, roles must alternate.
MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- endif %}
{%- endfor %}
"""
SPM_SPECIALS = ("<unk>", "<s>", "</s>")

TEXTS = (
    "", "Hello world", " leading and trailing  ", "line\nbreak\ttab\r\n", "a" * 70,
    "The quick brown fox jumps over the lazy dog.", "Café crème 日本語 🎉✓ naïve",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "<|begin_of_text|>x<|eot_id|>y",
    f"{IMAGE} and {PAD}", "<|im_start", "don't stop ' , . ! ?",
)
SYSTEM = {"role": "system", "content": "  Be brief; answer in English.  "}
CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris. Café? 🎉"},
    {"role": "user", "content": "And of Japan?\n日本"},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather <b>now</b> & 'here' — für Sie",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def llama_backend() -> Backend:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=list(LLAMA_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(CORPUS) * 3, trainer)
    bos = LLAMA_SPECIALS[0]
    bos_id = tok.token_to_id(bos)
    assert bos_id is not None
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)])
    return tok


def write_llama(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    backend = llama_backend()
    backend.save(str(dest / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": LLAMA_SPECIALS[0], "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False,
                      "special": True},
        "eos_token": "<|eot_id|>",
        "image_token": IMAGE,
        "add_bos_token": True,  # the post-processor adds it already: no second BOS
        "clean_up_tokenization_spaces": True,  # BPE: not applied, by transformers nor us
        "model_max_length": 131072,
        "chat_template": [{"name": "default", "template": LLAMA_TEMPLATE},
                          {"name": "tool_use", "template": LLAMA_TOOL_TEMPLATE}],
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (dest / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": LLAMA_SPECIALS[0],
        "pad_token": {"content": PAD, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False}}))
    eot, eot_text = (backend.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>"))
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, eot_text]}))
    (dest / "config.json").write_text(json.dumps({"eos_token_id": 12345}))
    return dest


def spm_backend() -> Backend:
    """Trained with a plain BPE, then rebuilt as sentencepiece vocabularies are laid out:
    specials, the 256 byte tokens, then the learnt pieces."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Backend(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trained.train_from_iterator(list(CORPUS) * 3, trainers.BpeTrainer(
        vocab_size=260, special_tokens=list(SPM_SPECIALS), show_progress=False))
    learnt = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate([*SPM_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))])}
    for piece in sorted(learnt["vocab"], key=learnt["vocab"].__getitem__):
        vocab.setdefault(piece, len(vocab))
    merges = [(a, b) for a, b in (m.split(" ") if isinstance(m, str) else m
                                  for m in learnt["merges"])]
    tok = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                             fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPM_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def write_spm(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    spm_backend().save(str(dest / "tokenizer.json"))
    # PreTrainedTokenizerFast: transformers 5.23's LlamaTokenizer would swap the normalizer
    # for a Metaspace pre-tokenizer (" a" then loses a "▁" that tokenizer.json gives).
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "legacy": True, "model_max_length": 1000000000000000019884624838656,
        "chat_template": MISTRAL_TEMPLATE}))
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return dest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("tiny")
    write_tokenizer(dest, 300)
    return dest


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("llama"))


@cache
def hf(path: Path) -> PreTrainedTokenizerBase:
    tok: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
    return tok


@cache
def ours(path: Path) -> Tokenizer:
    return Tokenizer.from_dir(path)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(params=["tiny", "llama", "spm"])
def tok_dir(request: pytest.FixtureRequest, tiny_dir: Path, llama_dir: Path,
            spm_dir: Path) -> Path:
    return {"tiny": tiny_dir, "llama": llama_dir, "spm": spm_dir}[request.param]


def hf_render(path: Path, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    out = hf(path).apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(out, str)
    return out


def random_texts(seed: int, n: int) -> Iterator[str]:
    rng = random.Random(seed)
    pool = (list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:'\"!?()<>|_-\n\t")
            + list("éèçñüß日本語東京🎉🚀✓—") + ["<|im_end|>", "<|eot_id|>", " the", "ing"])
    for _ in range(n):
        yield "".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))


def random_ids(tok: Tokenizer, seed: int, n: int, max_len: int = 40) -> Iterator[list[int]]:
    rng = random.Random(seed)
    for _ in range(n):
        yield [rng.randrange(len(tok)) for _ in range(rng.randint(1, max_len))]


def stream(det: Detokenizer, ids: Sequence[int]) -> list[str]:
    return [det.push(i) for i in ids] + [det.finish()]


# ---------------------------------------------------------------------------------------------
# Against transformers


def test_loads_what_transformers_loads(tok_dir: Path) -> None:
    tok, ref = ours(tok_dir), hf(tok_dir)
    assert len(tok) == len(ref)
    assert tok.special_tokens_map == ref.special_tokens_map
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert {i for i in range(len(tok)) if tok.is_special(i)} == set(ref.all_special_ids) | {
        i for i, t in ref.added_tokens_decoder.items() if t.special}


def test_encode_matches_transformers(tok_dir: Path) -> None:
    tok, ref = ours(tok_dir), hf(tok_dir)
    for text in (*TEXTS, *random_texts(1, 200)):
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == ref.encode(
                text, add_special_tokens=special), (text, special)


def test_decode_matches_transformers(tok_dir: Path) -> None:
    tok, ref = ours(tok_dir), hf(tok_dir)
    cases = [tok.encode(t) for t in TEXTS] + list(random_ids(tok, 2, 200))
    cases.append([0, len(tok) + 5, 1])  # ids outside the vocabulary are skipped
    for ids in cases:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip), (ids, skip)


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok_dir: Path, system: bool,
                                            add_generation_prompt: bool) -> None:
    tok = ours(tok_dir)
    for turns in (1, 2, 3):
        messages = ([SYSTEM] if system else []) + CHAT[:turns]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert prompt == hf_render(tok_dir, messages, add_generation_prompt=add_generation_prompt)
        assert tok.encode_chat(messages, add_generation_prompt) == hf(tok_dir).apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, return_dict=False)


def test_chat_template_of_the_tiny_model(tiny_dir: Path) -> None:
    assert ours(tiny_dir).apply_chat_template([SYSTEM, CHAT[0]]) == (
        f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n"
        f"<|im_start|>user\n{CHAT[0]['content']}<|im_end|>\n<|im_start|>assistant\n")


def test_llama_template_with_tools_and_variables(llama_dir: Path) -> None:
    tok = ours(llama_dir)
    messages = [SYSTEM, *CHAT]
    with_tools = tok.apply_chat_template(messages, tools=TOOLS)
    assert with_tools == hf_render(llama_dir, messages, tools=TOOLS, add_generation_prompt=True)
    assert "Environment: ipython" in with_tools and '"turns": 3' in with_tools  # tool_use
    assert "<b>now</b> & 'here' — für Sie" in with_tools  # tojson: no HTML escapes, no \\u
    assert tok.apply_chat_template(CHAT, date_string="1 Jan 2000") == hf_render(
        llama_dir, CHAT, date_string="1 Jan 2000", add_generation_prompt=True)
    assert f"Year: {datetime.now():%Y}" in tok.apply_chat_template(CHAT)


def test_message_forms(llama_dir: Path) -> None:
    tok = ours(llama_dir)
    # Text parts reach the template as one string (transformers passes the list through).
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"},
                                          {"type": "text", "text": "two"}]}]
    assert tok.apply_chat_template(parts) == hf_render(
        llama_dir, [{"role": "user", "content": "one\ntwo"}], add_generation_prompt=True)
    # content None next to tool calls, extra keys: as transformers (None-valued keys dropped).
    calls: list[dict[str, Any]] = [CHAT[0], {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}, CHAT[2]]
    assert tok.apply_chat_template(calls) == hf_render(llama_dir, calls,
                                                       add_generation_prompt=True)


FEATURES = {
    "tojson": "{{ messages | tojson }}|{{ tools | tojson(indent=2) }}|"
              "{{ {'b': 1, 'a': '<é>'} | tojson(sort_keys=true) }}|"
              "{{ [1, 2] | tojson(separators=(',', ':')) }}|"
              "{{ 'x\"é' | tojson(ensure_ascii=true) }}",
    "loopcontrols": "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
                    "{% if loop.index0 > 2 %}{% break %}{% endif %}{{ m.role }},{% endfor %}",
    "namespace_dict": "{% set ns = namespace(n=0, self=1) %}{% for m in messages %}"
                      "{% set ns.n = ns.n + m.content | length %}{% endfor %}{{ ns.n }} "
                      "{{ dict(a=1, b=ns.n) | tojson }} {{ dict.fromkeys(['x'], 0) | tojson }}",
    "whitespace": "  {% if true %}\n    x\n  {% endif %}\n{% for m in messages %}\n"
                  "  [{{ m.role }}]\n  {%- if loop.last %} end{% endif %}\n{% endfor %}\n",
    "generation": "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}"
                  "{% endfor %}",
    "reasoning": "{% for m in messages %}{{ m.reasoning_content }}|{{ m.thinking }}|"
                 "{{ m.content }};{% endfor %}",
    "variables": "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ custom }}|"
                 "{{ enable_thinking }}|{{ documents }}|{{ tools }}|{{ add_generation_prompt }}",
    "strings": "{{ messages[0].content.upper() }}{{ messages[0].content.split(' ') | join('+') }}"
               "{{ messages | map(attribute='role') | list | tojson }}",
    "strftime": "{{ strftime_now('%Y') }}",
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_template_features_match_transformers(tmp_path: Path, feature: str) -> None:
    write_tokenizer(tmp_path, 300)
    (tmp_path / "chat_template.jinja").write_text(FEATURES[feature])
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Sys <b>é</b>"},
        {"role": "user", "content": "hi there", "reasoning": "old name"},
        {"role": "assistant", "content": "yo", "reasoning_content": "thought", "name": None},
        {"role": "user", "content": "last"},
    ]
    kwargs: dict[str, Any] = {"custom": {"k": [1, "v"]}, "enable_thinking": False,
                              "eos_token": "OVERRIDE"}
    tools = TOOLS if feature in ("tojson", "variables") else None
    got = Tokenizer.from_dir(tmp_path).apply_chat_template(messages, tools=tools, **kwargs)
    assert got == hf_render(tmp_path, messages, tools=tools, add_generation_prompt=True,
                            **kwargs)


def test_chat_template_sources(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 300)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "config:{{ messages[0].content }}"
    config_path.write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("jinja:{{ messages[0].content }}")
    msg = [{"role": "user", "content": "x"}]
    # chat_template.jinja wins over tokenizer_config.json, as in transformers.
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(msg) == "jinja:x" == hf_render(
        tmp_path, msg)
    (tmp_path / "chat_template.jinja").unlink()
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(msg) == "config:x"
    # chat_template.json (the processors' file) when neither has one.
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ 1 }}"}))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(msg) == "json:1"
    # Named templates without a default: refused when used, not when loaded.
    (tmp_path / "chat_template.json").unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "t"}]
    config_path.write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template(msg, tools=[]) == "t"
    with pytest.raises(TokenizerError, match="several chat templates and no default"):
        tok.apply_chat_template(msg)


def test_stop_ids_limits_and_bos(tmp_path: Path, tiny_dir: Path, llama_dir: Path) -> None:
    llama = ours(llama_dir)
    assert llama.stop_token_ids == tuple(
        llama.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>"))
    assert llama.model_max_length == 131072
    assert llama.encode("x")[0] == llama.bos_token_id  # once: add_bos_token changes nothing
    assert llama.encode("x")[1:] == llama.encode("x", add_special_tokens=False)
    tiny = ours(tiny_dir)
    assert (tiny.stop_token_ids, tiny.model_max_length, tiny.bos_token_id) == ((EOS_ID,), 256,
                                                                               None)
    # generation_config.json's int form, then config.json's, then the EOS token.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert Tokenizer.from_dir(tmp_path).stop_token_ids == (2, 0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert Tokenizer.from_dir(tmp_path).stop_token_ids == (1,)
    # add_bos_token without a post-processor in tokenizer.json: honoured (transformers 5.23
    # drops it), and a huge model_max_length means no limit.
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(bos_token="<|im_start|>", add_bos_token=True, model_max_length=1e30)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("hi") == [1, *tok.encode("hi", add_special_tokens=False)]
    assert tok.model_max_length is None


# ---------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_decode(tok_dir: Path, skip: bool) -> None:
    tok = ours(tok_dir)
    for ids in random_ids(tok, 3, 300):
        det = Detokenizer(tok, stop_token_ids=(), skip_special_tokens=skip)
        pieces = stream(det, ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip) == det.text, ids
        assert not det.stopped and det.finish_reason is None


def test_stream_holds_split_characters(llama_dir: Path) -> None:
    tok = ours(llama_dir)
    for text in ("Café 日本語 🎉🚀 ✓ naïve façade", "東京🎉x", "🚀"):
        ids = tok.encode(text, add_special_tokens=False)
        assert any("\ufffd" in tok.decode([i]) for i in ids)  # some character spans tokens
        pieces = stream(Detokenizer(tok), ids)
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)
    # One token per byte: nothing comes out until a character is complete.
    ids = [_byte_token(tok, b) for b in "a🎉b".encode()]
    assert stream(Detokenizer(tok), ids) == ["a", "", "", "", "🎉", "b", ""]


def _byte_token(tok: Tokenizer, byte: int) -> int:
    # The byte-level alphabet's character for a byte ≥ 0x80 (GPT-2's table).
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in visible]
    char = chr(byte) if byte in visible else chr(256 + extra.index(byte))
    token_id = tok.token_to_id(char)
    assert token_id is not None
    return token_id


def test_stream_with_prompt_context(llama_dir: Path, spm_dir: Path) -> None:
    tok = ours(llama_dir)
    prompt = tok.encode("The capital of France is")
    for text in (" Paris.", " 日本🎉", "!"):
        ids = tok.encode(text, add_special_tokens=False)
        det = Detokenizer(tok, context_ids=prompt)
        assert "".join(stream(det, ids)) == text
    # Sentencepiece: "▁Paris" alone decodes to "Paris" (the first space is stripped); after
    # the prompt it is " Paris".
    spm = ours(spm_dir)
    prompt = spm.encode("The capital of France is")
    ids = spm.encode("Paris 🎉", add_special_tokens=False)
    assert spm.decode(ids) == "Paris 🎉"
    assert "".join(stream(Detokenizer(spm, context_ids=prompt), ids)) == " Paris 🎉"
    full = spm.decode(prompt + ids, skip_special_tokens=True)
    assert full.endswith(" Paris 🎉")


def char_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per character (the tiny vocabulary has every printable character)."""
    ids = [tok.token_to_id(c) for c in text]
    assert None not in ids
    return [i for i in ids if i is not None]


def test_stop_string_across_tokens(tiny_dir: Path) -> None:
    tok = ours(tiny_dir)
    det = Detokenizer(tok, stop=["END"])
    assert stream(det, char_ids(tok, "abcEN")) == ["a", "b", "c", "", "", "EN"]
    assert not det.stopped  # finish() is not a stop: held text is released
    det = Detokenizer(tok, stop=["END"])
    assert [det.push(i) for i in char_ids(tok, "abENxEND")] == [
        "a", "b", "", "", "ENx", "", "", ""]
    assert (det.stopped, det.stop_reason, det.stop_match, det.finish_reason) == (
        True, "stop_string", "END", "stop")
    assert det.push(char_ids(tok, "z")[0]) == "" and det.finish() == "" and det.text == "abENx"


def test_stop_string_inside_a_token_and_earliest_first(tiny_dir: Path) -> None:
    tok = ours(tiny_dir)
    ids = tok.encode(" the", add_special_tokens=False)
    assert len(ids) == 1
    det = Detokenizer(tok, stop=["he"])
    assert det.push(ids[0]) == " t" and det.stopped
    det = Detokenizer(tok, stop=["yz", "xyz", "q"])
    assert "".join(stream(det, char_ids(tok, "axyzq"))) == "a" and det.stop_match == "xyz"


def test_stop_string_split_inside_a_character(llama_dir: Path) -> None:
    tok = ours(llama_dir)
    ids = tok.encode("ok 🎉 more 🎉", add_special_tokens=False)
    stopped_at = next(k for k in range(len(ids)) if "🎉" in tok.decode(ids[:k + 1]))
    assert "\ufffd" in tok.decode(ids[:stopped_at])  # the emoji's bytes span tokens
    det = Detokenizer(tok, stop=["🎉"])
    for k, token_id in enumerate(ids):
        det.push(token_id)
        assert det.stopped == (k >= stopped_at)
    assert (det.text, det.stop_match) == ("ok ", "🎉")


def test_stop_token(tiny_dir: Path, llama_dir: Path) -> None:
    tok = ours(tiny_dir)
    det = Detokenizer(tok, stop=["abc"])
    assert [det.push(i) for i in [*char_ids(tok, "xab"), EOS_ID]] == ["x", "", "", "ab"]
    assert (det.stop_reason, det.stop_match, det.text) == ("stop_token", EOS_ID, "xab")
    llama = ours(llama_dir)
    det = Detokenizer(llama, skip_special_tokens=False)
    eot = llama.token_to_id("<|eot_id|>")
    assert eot is not None
    ids = llama.encode("日本", add_special_tokens=False)
    # An incomplete character before the stop token is released as decode gives it.
    assert "".join(det.push(i) for i in [ids[0], eot]) == llama.decode(ids[:1])
    assert det.stop_match == eot and "<|eot_id|>" not in det.text


def settled(tok: Tokenizer, ids: Sequence[int]) -> bool:
    """Whether later tokens can no longer change the decoded text of ``ids``: it does not end
    in an incomplete character nor in a run of byte-fallback tokens."""
    last = next((i for i in reversed(ids) if not tok.is_special(i)), None)
    return not (tok.decode(ids, skip_special_tokens=True).endswith("\ufffd")
                or (last is not None and tok.is_fallback_byte(last)))


def test_stop_strings_property(tok_dir: Path) -> None:
    """Random generations and stop strings: the text ends before the first stop string, and
    generation stops at the token that completes it (once that text is final), not earlier."""
    tok = ours(tok_dir)
    rng = random.Random(4)
    hits = 0
    for ids in random_ids(tok, 5, 300):
        full = tok.decode(ids, skip_special_tokens=True)
        stops = ["\x00never"]
        if full:
            a = rng.randrange(len(full))
            stops.append(full[a:a + rng.randint(1, 4)])
        if "\ufffd" in "".join(stops):
            continue  # a replacement character may still turn into a real one
        det = Detokenizer(tok, stop=stops, stop_token_ids=())
        first = min((i for s in stops if (i := full.find(s)) >= 0), default=None)
        pieces = []
        for k, token_id in enumerate(ids):
            pieces.append(det.push(token_id))
            seen = tok.decode(ids[:k + 1], skip_special_tokens=True)
            hit = any(s in seen for s in stops)
            assert hit or not det.stopped, (ids, stops, k)
            if settled(tok, ids[:k + 1]):
                assert det.stopped == hit, (ids, stops, k)
        pieces.append(det.finish())
        assert "".join(pieces) == (full if first is None else full[:first]), (ids, stops)
        hits += det.stopped
    assert hits > 100


# ---------------------------------------------------------------------------------------------
# Errors: one line each, ValueError subclasses


def one_line(error: pytest.ExceptionInfo[ValueError]) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


Setup = Callable[[Path], None]


def _write(name: str, text: str) -> Setup:
    def setup(d: Path) -> None:
        (d / name).write_text(text)
    return setup


def _remove(name: str) -> Setup:
    def setup(d: Path) -> None:
        (d / name).unlink()
    return setup


def _both(first: Setup, second: Setup) -> Setup:
    def setup(d: Path) -> None:
        first(d)
        second(d)
    return setup


@pytest.mark.parametrize(("setup", "expected"), [
    (_remove("tokenizer.json"), "tokenizer.json is missing from"),
    (_write("tokenizer.json", "{not json"), "tokenizer.json is not valid JSON"),
    (_write("tokenizer.json", '{"model": 1}'), "is not a tokenizers file"),
    (_write("tokenizer_config.json", '{"a": 1,}'), "tokenizer_config.json is not valid JSON"),
    (_write("tokenizer_config.json", "[]"), "must hold a JSON object"),
    (_write("tokenizer_config.json", '{"eos_token": 3}'), "must be a string or an AddedToken"),
    (_both(_remove("chat_template.jinja"), _write("tokenizer_config.json", '{"chat_template": 5}')),
     "chat_template must be a string"),
    (_write("chat_template.jinja", "{% if %}\nx"), "chat template is not valid Jinja"),
    (_write("generation_config.json", '{"eos_token_id": "x"}'), "eos_token_id must be"),
    (_write("special_tokens_map.json", "{\n"), "special_tokens_map.json is not valid JSON"),
])
def test_broken_files(tmp_path: Path, setup: Setup, expected: str) -> None:
    write_tokenizer(tmp_path, 300)
    setup(tmp_path)
    with pytest.raises(TokenizerError) as error:
        Tokenizer.from_dir(tmp_path)
    assert expected in one_line(error)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as error:
        Tokenizer.from_dir(tmp_path / "nope")
    assert "does not exist" in one_line(error)


@pytest.mark.parametrize(("messages", "expected"), [
    ("hi", "messages must be a list"),
    ([], "must not be empty"),
    ([["user", "hi"]], r"messages\[0\] must be an object"),
    ([{"content": "hi"}], r"messages\[0\].role must be a non-empty string"),
    ([{"role": "user"}], r"messages\[0\].content is missing"),
    ([{"role": "user", "content": 3}], "must be a string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     r"content\[0\] must be a text part"),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], r"\.text must be a string"),
    ([{"role": "tool", "content": "x"}, {"role": "tool", "content": "y"}],
     "chat template: Conversation roles must be user or assistant after system"),
])
def test_bad_messages(llama_dir: Path, messages: Any, expected: str) -> None:
    with pytest.raises(ChatError, match=expected) as error:
        ours(llama_dir).apply_chat_template(messages)
    one_line(error)


def test_template_errors_are_chat_errors(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 300)
    msg = [{"role": "user", "content": "x"}]
    for source, expected in (
            ("{% set ns = namespace() %}{% set ns._x = 1 %}", "underscore-prefixed"),
            ("{{ messages.__class__.__mro__ }}", "chat template"),
            ("{{ raise_exception('nope\nnot here') }}", "chat template: nope not here"),
            ("{{ messages[0].content + 1 }}", "chat template failed: TypeError")):
        (tmp_path / "chat_template.jinja").write_text(source)
        tok = Tokenizer.from_dir(tmp_path)
        with pytest.raises(ChatError) as error:
            tok.apply_chat_template(msg)
        assert expected in one_line(error), source
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError) as no_template:
        Tokenizer.from_dir(tmp_path).apply_chat_template(msg)
    assert "no chat template" in one_line(no_template)


def test_bad_arguments(tiny_dir: Path) -> None:
    tok = ours(tiny_dir)
    with pytest.raises(TokenizerError) as error:
        Detokenizer(tok, stop=["ok", ""])
    assert "non-empty strings" in one_line(error)
    with pytest.raises(TokenizerError) as error:
        tok.encode(b"bytes")  # type: ignore[arg-type]
    assert "must be a string" in one_line(error)
    with pytest.raises(ChatError) as error:
        tok.apply_chat_template([{"role": "user", "content": "x"}], tools="f")  # type: ignore[arg-type]
    assert "tools must be a list" in one_line(error)
