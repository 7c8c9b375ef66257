"""Text in, text out: the engine with the checkpoint's tokenizer, chat template and stops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from autoglm.engine.errors import RequestError
from autoglm.engine.scheduler import Engine
from autoglm.engine.service import Chunk, TextEngine, merge, parse_parameters
from autoglm.engine.text import Tokenizer
from autoglm.models.tiny import PRESETS, write_tiny_checkpoint
from autoglm.repository import import_checkpoint, load_reference
from autoglm.testing.checkpoints import reference_model


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[TextEngine, Any, Path]:
    tmp = tmp_path_factory.mktemp("svc")
    src = write_tiny_checkpoint(tmp / "ckpt", PRESETS["tiny"], "tiny-moe", 1)
    repo = import_checkpoint(src, tmp / "repo", 1, "tiny-moe", progress=False).repository
    model = load_reference(repo, 1)
    engine = Engine(model.router, model.local_fanout, kv_capacity_tokens=1024,
                    max_batch_tokens=64, prefill_chunk=32)
    return TextEngine(engine, Tokenizer.from_dir(repo / "router" / "1" / "hf")), \
        reference_model(src), src


def run(te: TextEngine) -> dict[int, list[Chunk]]:
    out: dict[int, list[Chunk]] = {}
    while te.engine.has_work():
        for c in te.step():
            out.setdefault(c.id, []).append(c)
    return out


def test_greedy_text_equals_transformers_generate(
        served: tuple[TextEngine, Any, Path]) -> None:
    te, theirs, _ = served
    prompts = ["Hello there", "def f(x):", "The quick brown fox"]
    ids = [te.submit({"max_tokens": 24, "temperature": 0, "ignore_eos": True}, text=p)
           for p in prompts]
    chunks = run(te)
    for rid, prompt in zip(ids, prompts, strict=True):
        got = [t for c in chunks[rid] for t in c.token_ids]
        x = torch.tensor([te.tokenizer.encode(prompt)])
        want = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24,
                               do_sample=False, eos_token_id=None)[0, x.shape[1]:].tolist()
        assert got == want
        last = chunks[rid][-1]
        assert last.finish_reason == "length" and last.completion_tokens == 24
        assert last.prompt_tokens == x.shape[1]
        assert "".join(c.text for c in chunks[rid]) == te.tokenizer.decode(want)
    assert te.active == 0 and te.engine.stats().kv_used_tokens == 0


def test_stop_string_ends_the_generation_and_is_not_returned(
        served: tuple[TextEngine, Any, Path]) -> None:
    te, _, _ = served
    rid = te.submit({"max_tokens": 40, "temperature": 0, "ignore_eos": True}, text="Hello")
    full = "".join(c.text for c in run(te)[rid])
    stop = full[5:8]
    assert stop and stop in full
    rid = te.submit({"max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop": [stop]},
                    text="Hello")
    chunks = run(te)[rid]
    assert "".join(c.text for c in chunks) == full[:full.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert te.engine.stats().kv_used_tokens == 0, "its cache freed at once"


def test_chat_messages_use_the_checkpoint_template(
        served: tuple[TextEngine, Any, Path]) -> None:
    te, _, _ = served
    messages = [{"role": "user", "content": "Hi!"}]
    rid = te.submit({"max_tokens": 4, "temperature": 0}, messages=messages)
    chunks = run(te)[rid]
    assert chunks[-1].prompt_tokens == len(te.tokenizer.encode_chat(messages))


def test_max_tokens_defaults_as_openai_does(served: tuple[TextEngine, Any, Path]) -> None:
    """A completion makes 16 tokens; a chat reply may run to the end of the window."""
    te, _, _ = served
    messages = [{"role": "user", "content": "Hi!"}]
    chat = te.submit({"temperature": 0, "ignore_eos": True}, messages=messages)
    text = te.submit({"temperature": 0, "ignore_eos": True}, text="Hi!")
    out = run(te)
    assert out[text][-1].completion_tokens == 16
    last = out[chat][-1]
    assert last.finish_reason == "length"
    assert last.prompt_tokens + last.completion_tokens == te.engine.context_window
    long = [{"role": "user", "content": "x" * te.engine.context_window}]
    with pytest.raises(RequestError, match="leaves no room in the context window"):
        te.submit({}, messages=long)


@pytest.mark.parametrize(("params", "message"), [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"max_tokens": "5"}, "max_tokens must be int"),
    ({"temperature": -1}, "temperature must be in [0, 100]"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"stop": [""]}, "stop must be a non-empty string"),
    ({"max_tokens": 100000}, "exceeds the context window"),
])
def test_bad_parameters_are_refused_in_one_line(served: tuple[TextEngine, Any, Path],
                                                params: dict[str, Any], message: str) -> None:
    te, _, _ = served
    with pytest.raises(RequestError) as err:
        te.submit(params, text="Hello")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not te.engine.has_work()


def test_exactly_one_prompt_form(served: tuple[TextEngine, Any, Path]) -> None:
    te, _, _ = served
    with pytest.raises(RequestError, match="exactly one"):
        te.submit({}, text="a", ids=[1, 2])
    with pytest.raises(RequestError, match=r"messages|role|content"):
        te.submit({}, messages=[{"content": 3}])


def test_stop_given_as_a_json_string_parameter() -> None:
    _, stop, ignore = parse_parameters({"stop": '["a", "bc"]', "ignore_eos": True})
    assert stop == ["a", "bc"] and ignore


def test_merged_chunks_join_text_and_tokens_and_keep_the_last_counts() -> None:
    """A response of several tokens (a stream interval): everything the chunks carried, in
    order, with the last one's finish reason and counts."""
    a, b = Chunk(7, "He", (1,), None, 3, 1), Chunk(7, "", (2,), None, 3, 2)
    c = Chunk(7, "llo!", (3, 4), "stop", 3, 4)
    assert merge([a]) is a
    assert merge([a, b, c]) == Chunk(7, "Hello!", (1, 2, 3, 4), "stop", 3, 4)
    assert merge([a, b]) == Chunk(7, "He", (1, 2), None, 3, 2)
    with pytest.raises(ValueError, match="nothing"):
        merge([])
    with pytest.raises(ValueError, match="different requests"):
        merge([a, Chunk(8, "x", (5,), None, 1, 1)])


def test_a_generation_merged_four_tokens_a_response_is_the_same_generation(
        served: tuple[TextEngine, Any, Path]) -> None:
    te, _, _ = served
    rid = te.submit({"max_tokens": 10, "temperature": 0, "ignore_eos": True}, text="Hello")
    chunks = run(te)[rid]
    responses = [merge(g) for g in
                 [chunks[:1], *(chunks[i:i + 4] for i in range(1, len(chunks), 4))]]
    assert [len(r.token_ids) for r in responses] == [1, 4, 4, 1]
    assert "".join(r.text for r in responses) == "".join(c.text for c in chunks)
    assert [t for r in responses for t in r.token_ids] == \
        [t for c in chunks for t in c.token_ids]
    assert [r.completion_tokens for r in responses] == [1, 5, 9, 10]
    assert responses[-1].finish_reason == "length" and \
        all(r.finish_reason is None for r in responses[:-1])
