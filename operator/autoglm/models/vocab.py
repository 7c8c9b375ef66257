"""A tiny, deterministic tokenizer for random test models.

The vocabulary is printable ASCII plus merges of it, so whatever ids a random model emits decode
to valid text (no partial UTF-8 sequences), and ``decode(encode(s)) == s`` for any printable
ASCII ``s``. Layout:

* ids 0..2: ``<|endoftext|>`` (eos and pad), ``<|im_start|>``, ``<|im_end|>`` (special);
* ids 3..97: the 95 printable ASCII characters, in code-point order;
* id 98: ``"\\n"`` (ChatML separates turns with newlines), when ``vocab_size > 98``;
* then BPE merges up to ``vocab_size``: first those learnt from a fixed English text, then
  every (token, character) concatenation in a fixed order.

Characters outside the vocabulary (tabs, non-ASCII, and newlines when ``vocab_size == 98``) are
dropped by the encoder: there is no unknown token, which a random model could emit.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIALS: tuple[str, ...] = (EOS, IM_START, IM_END)
EOS_ID = SPECIALS.index(EOS)  # also the pad id; there is no bos
PRINTABLE: tuple[str, ...] = tuple(chr(c) for c in range(0x20, 0x7F))
MIN_VOCAB = len(SPECIALS) + len(PRINTABLE)

# Words keep their leading space (GPT-2 style) so merges look like real subwords; every
# character is matched by one of the two alternatives, so splitting loses nothing.
_SPLIT = r" ?[^\s]+|\s+"

# ChatML, as Qwen uses it (without tools).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# The text the first merges are learnt from: fixed, so the vocabulary is the same every call.
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A mixture of experts routes each token to a "
    "few of its experts: the router scores every expert, keeps the top ones and weights their "
    "outputs. The system prompt tells the assistant what to do; the user asks a question and "
    "the assistant answers it. Hello, world! What is the capital of France? The capital of "
    "France is Paris. Count from one to ten: one, two, three, four, five, six, seven, eight, "
    "nine, ten. def main() -> int: return 0 # a comment in code, with (parentheses) and "
    "[brackets] and {braces} and \"quotes\" and 'apostrophes'. It is 12:30 on 2024-01-01, "
    "and 3 + 4 = 7 while 10 * 10 = 100. Models that are served by the operator scale with "
    "the load on them: there are many experts, and they are not all equally popular."
)


def _learnt_merges(limit: int) -> Iterator[tuple[str, str]]:
    """Byte-pair merges over ``_CORPUS``, most frequent pair first (ties: smallest pair),
    while some pair still occurs at least twice."""
    words = Counter(tuple(w) for w in re.findall(_SPLIT, _CORPUS))
    for _ in range(limit):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        if not pairs:
            return
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            return
        yield best
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged


def _filler_merges() -> Iterator[tuple[str, str]]:
    """Every printable string of length 2, then 3, ..., as (prefix, last character): each
    prefix was produced by the previous length, so every merge is valid BPE."""
    for length in itertools.count(2):
        for chars in itertools.product(PRINTABLE, repeat=length):
            yield "".join(chars[:-1]), chars[-1]


def _vocab_and_merges(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIALS + PRINTABLE)}
    if vocab_size > len(vocab):
        vocab["\n"] = len(vocab)
    merges: list[tuple[str, str]] = []
    budget = vocab_size - len(vocab)
    for a, b in itertools.chain(_learnt_merges(budget), _filler_merges()):
        if len(vocab) >= vocab_size:
            break
        if a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    return vocab, merges


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """The tokenizer ``write_tokenizer`` saves (see the module docstring for its layout)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB}, got {vocab_size}")
    vocab, merges = _vocab_and_merges(vocab_size)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated")
    # Fuse concatenates tokens as they are; the default decoder would join them with spaces.
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def write_tokenizer(dest: Path, vocab_size: int, *, model_max_length: int = 256) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into ``dest``.

    Loadable by ``tokenizers.Tokenizer.from_file`` and by transformers' ``AutoTokenizer``
    (``PreTrainedTokenizerFast``), with the same ids. Same bytes on every call.
    Raises ValueError when ``vocab_size`` < 98 (3 special tokens + 95 printable characters).
    """
    tok = build_tokenizer(vocab_size)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "model_max_length": model_max_length,
        # Cleaning would turn " ." into "." and break the exact round trip.
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dest / "chat_template.jinja").write_text(CHAT_TEMPLATE)
