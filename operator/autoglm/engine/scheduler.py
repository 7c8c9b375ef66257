"""The engine: admission, iteration-level (continuous) batching and the step loop.

Each :meth:`Engine.step` runs every running sequence together in one forward: one token for
each (its next decode token or the next piece of its prompt), then the rest of the token
budget (``max_batch_tokens``) as prompt chunks (at most ``prefill_chunk`` tokens per sequence)
oldest first. So each MoE layer makes one fan-out call per step, carrying the tokens of every
sequence, and each selected expert is called once with all of its tokens. Sequences join at
the next step after they are admitted and leave when they finish. Admission is FIFO and
reserves prompt + max_tokens of KV cache up front (:mod:`autoglm.engine.cache`), so a running
sequence never runs out; at most ``max_batch_tokens`` sequences run, so each advances every
step. With ``prefix_caching``, a prompt starting with blocks already in the cache shares them
and is prefilled from there on; after each step the blocks it filled (prompt or generated
tokens) are offered to the cache.

Requests are token ids; text (tokenizer, stop strings) lives in the layer above.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from autoglm.engine.cache import KVPool, Row, StepCache
from autoglm.engine.errors import RETRY_AFTER_SECONDS, RequestError, Saturated
from autoglm.engine.sampler import SamplingParams, generator_for, sample
from autoglm.models.config import ModelConfig
from autoglm.models.decoder import (
    ExpertFanout,
    RouteObserver,
    RouterTier,
    forward_rows,
    interleave,
)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Request:
    """A generation request. ``eos_ids`` None or empty: EOS disabled (the API layer passes
    the tokenizer's); generation also stops after any of ``stop_ids``. The stopping token is
    emitted (its event says ``finish="stop"``)."""

    prompt: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    eos_ids: Collection[int] | None = None
    stop_ids: Collection[int] = ()


@dataclass(frozen=True)
class Event:
    """A token generated for request ``id``; ``finish`` is set on its last one."""

    id: int
    token: int
    finish: FinishReason | None = None


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_used_tokens: int      # held by running sequences
    kv_capacity_tokens: int
    steps: int
    prompt_tokens: int       # prompt tokens of the admitted requests, cumulative
    generated_tokens: int
    prefix_hit_tokens: int   # of prompt_tokens, found in the cache (not prefilled)
    kv_cached_tokens: int    # in cached blocks no sequence holds: reusable, reclaimable


class StepError(RuntimeError):
    """The step's forward failed (e.g. an expert call); its sequences ended and were freed."""

    def __init__(self, ids: Sequence[int], cause: BaseException) -> None:
        super().__init__(f"engine step failed for requests {list(ids)}: {cause}")
        self.ids = list(ids)


@dataclass
class _Sequence:
    id: int
    tokens: list[int]       # prompt, then generated tokens
    prompt_len: int
    params: SamplingParams
    ends: frozenset[int]    # eos and stop ids
    generator: torch.Generator
    max_tokens: int         # params.max_tokens, the rest of the window when that is None
    computed: int = 0       # tokens whose keys/values are in the cache

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass(frozen=True)
class _Batch:
    """One micro-batch of a step: its rows' token ids, the flat indices to sample from and
    the sequences they belong to, and its cache."""

    ids: torch.Tensor
    select: torch.Tensor
    done: list[_Sequence]
    cache: StepCache


class Engine:
    """Continuous-batching generation over a :class:`RouterTier`, experts through ``fanout``.

    ``row_width`` fixes the width of the batch's rows (tests, tuning); None picks the
    cheapest each step. ``prefix_caching`` False: every prompt is computed whole (benches
    compare). ``max_waiting`` bounds the requests queued but not running: :meth:`add`
    refuses more with :class:`Saturated` (None: unbounded). Thread-safe: :meth:`add` and
    :meth:`abort` may be called while another thread runs :meth:`step`; they take effect
    between steps."""

    def __init__(self, router: RouterTier, fanout: ExpertFanout, kv_capacity_tokens: int,
                 max_batch_tokens: int, prefill_chunk: int, *, block_size: int = 16,
                 row_width: int | None = None, on_route: RouteObserver | None = None,
                 micro_batches: int = 1, prefix_caching: bool = True,
                 max_waiting: int | None = None) -> None:
        if max_batch_tokens < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) and prefill_chunk "
                             f"({prefill_chunk}) must be >= 1")
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1 or None, got {max_waiting}")
        self.max_waiting = max_waiting
        self.router = router
        self.fanout = fanout
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.on_route = on_route
        self.row_width = row_width
        self.micro_batches = micro_batches
        emb = router.w["model.embed_tokens.weight"]
        self.device = emb.device
        self.pool = KVPool.for_model(router.cfg, kv_capacity_tokens, block_size=block_size,
                                     dtype=emb.dtype, device=emb.device,
                                     prefix_caching=prefix_caching)
        self._costs = _row_costs(router.cfg)
        self._ids = itertools.count()
        self._waiting: collections.OrderedDict[int, _Sequence] = collections.OrderedDict()
        self._running: dict[int, _Sequence] = {}  # admission order
        self._lock = threading.Lock()
        self.routed_tokens: collections.Counter[int] = collections.Counter()
        # ids the last step admitted into the running batch, in order: the layer above times
        # their queueing (the engine keeps no clock)
        self.admitted: tuple[int, ...] = ()
        self._steps = self._prompt_tokens = self._generated_tokens = self._hit_tokens = 0

    @property
    def cfg(self) -> ModelConfig:
        return self.router.cfg

    @property
    def context_window(self) -> int:
        """The most tokens (prompt + max_tokens) one request may span."""
        return min(self.cfg.max_position_embeddings, self.pool.capacity)

    # -- requests ---------------------------------------------------------------------------

    def add(self, request: Request) -> int:
        """Queue a request; returns its id. Raises :class:`RequestError` (a ValueError) for a
        request that can never be served as asked, :class:`Saturated` for one that could be
        served later (``max_waiting`` requests wait already)."""
        prompt = [int(t) for t in request.prompt]
        if not prompt:
            raise RequestError("the prompt is empty")
        vocab = self.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        params = request.params
        params.validate()
        # None: the rest of the window
        max_tokens = params.max_tokens or self.context_window - len(prompt)
        if max_tokens < 1:
            raise RequestError(f"the prompt ({len(prompt)} tokens) leaves no room in the "
                               f"context window ({self.context_window} tokens)")
        span = len(prompt) + max_tokens
        if span > self.cfg.max_position_embeddings:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens "
                               f"({max_tokens}) exceeds the context window "
                               f"({self.cfg.max_position_embeddings} tokens)")
        if span > self.pool.capacity:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens "
                               f"({max_tokens}) exceeds the KV cache capacity "
                               f"({self.pool.capacity} tokens)")
        ends = frozenset(int(t) for t in (*(request.eos_ids or ()), *request.stop_ids))
        with self._lock:
            # checked last: a request that can never be served hears why, not "retry"
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                n = len(self._waiting)
                raise Saturated(f"{n} request{' is' if n == 1 else 's are'} waiting for the "
                                f"engine (at most {self.max_waiting}): retry in "
                                f"{RETRY_AFTER_SECONDS} s")
            seq = _Sequence(next(self._ids), prompt, len(prompt), params, ends,
                            generator_for(params), max_tokens)
            self._waiting[seq.id] = seq
            return seq.id

    def abort(self, id: int) -> bool:
        """End request ``id`` now, freeing its cache; False if it is not queued or running."""
        with self._lock:
            if self._waiting.pop(id, None) is not None:
                return True
            if self._running.pop(id, None) is not None:
                self.pool.release(id)
                return True
            return False

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._running or self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=len(self._running), waiting=len(self._waiting),
                kv_used_tokens=self.pool.used_tokens, kv_capacity_tokens=self.pool.capacity,
                steps=self._steps, prompt_tokens=self._prompt_tokens,
                generated_tokens=self._generated_tokens, prefix_hit_tokens=self._hit_tokens,
                kv_cached_tokens=self.pool.cached_tokens)

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """One iteration: admit what fits (:attr:`admitted`), run every running sequence's
        next tokens in one forward (or in interleaved micro-batches, see :meth:`_split`),
        sample, and retire finished sequences. Returns the tokens made."""
        with self._lock:
            self._admit()
            if not self._running:
                return []
            seqs = list(self._running.values())
            counts = self._plan(seqs)
            try:
                batches = [self._batch(group, counts) for group in self._split(seqs, counts)]
                done = [s for b in batches for s in b.done]
                with torch.inference_mode():
                    stages = [forward_rows(self.router, b.ids, b.cache.positions,
                                           b.cache.valid, b.select, self.fanout, b.cache,
                                           self.on_route)
                              for b in batches]
                    outs = interleave(stages)
                    logits = torch.cat([out[0] for out in outs])
                    tokens = sample(logits, [s.params for s in done],
                                    [s.generator for s in done])
            except Exception as e:
                for s in seqs:
                    del self._running[s.id]
                    self.pool.release(s.id)
                raise StepError([s.id for s in seqs], e) from e
            self._steps += 1
            for out in outs:
                self.routed_tokens.update(out[1])
            for s in seqs:
                s.computed += counts[s.id]
                self.pool.commit(s.id, s.tokens)  # written now: its full blocks are shareable
            return [self._emit(s, t) for s, t in zip(done, tokens, strict=True)]

    def _admit(self) -> None:
        admitted: list[int] = []
        # FIFO without overtaking: a large request is not starved by smaller ones behind it
        while self._waiting and len(self._running) < self.max_batch_tokens:
            seq = next(iter(self._waiting.values()))
            if not self.pool.reserve(seq.id, seq.prompt_len + seq.max_tokens, seq.tokens):
                break
            seq.computed = self.pool.length(seq.id)  # the prompt's cached prefix
            self._prompt_tokens += seq.prompt_len
            self._hit_tokens += seq.computed
            del self._waiting[seq.id]
            self._running[seq.id] = seq
            admitted.append(seq.id)
        self.admitted = tuple(admitted)

    def _plan(self, seqs: Sequence[_Sequence]) -> dict[int, int]:
        """Tokens each sequence runs this step: one each, then prompt chunks oldest first."""
        counts = {s.id: 1 for s in seqs}
        budget = self.max_batch_tokens - len(seqs)
        for s in seqs:
            if budget <= 0:
                break
            extra = min(len(s.tokens) - s.computed, self.prefill_chunk) - 1
            if extra > 0:
                counts[s.id] += min(extra, budget)
                budget -= counts[s.id] - 1
        return counts

    def _split(self, seqs: list[_Sequence], counts: dict[int, int]) -> list[list[_Sequence]]:
        """The step's micro-batches: one, or with ``micro_batches`` > 1 and a fan-out that
        answers later, that many runs of sequences of about equal tokens, so one's attention
        runs while another's expert calls are in flight."""
        m = min(self.micro_batches, len(seqs))
        if m < 2 or getattr(self.fanout, "start", None) is None:
            return [seqs]
        total, acc = sum(counts.values()), 0
        groups: list[list[_Sequence]] = [[] for _ in range(m)]
        for s in seqs:
            groups[min(m - 1, acc * m // total)].append(s)
            acc += counts[s.id]
        return [g for g in groups if g]

    def _batch(self, seqs: Sequence[_Sequence], counts: dict[int, int]) -> _Batch:
        rows, width = self._layout(seqs, counts)
        ids = torch.tensor([self._running[r.seq].tokens[r.start:r.start + r.count]
                            + [0] * (width - r.count) for r in rows], device=self.device)
        # sample where a chunk reaches the end of what is known: decode, or prompt done
        last_row = {r.seq: i for i, r in enumerate(rows)}
        done = [s for s in seqs if s.computed + counts[s.id] == len(s.tokens)]
        select = torch.tensor([last_row[s.id] * width + rows[last_row[s.id]].count - 1
                               for s in done], dtype=torch.long, device=self.device)
        return _Batch(ids, select, done, self.pool.step(rows, width))

    def _layout(self, seqs: Sequence[_Sequence], counts: dict[int, int],
                ) -> tuple[list[Row], int]:
        """Rows of one width holding every chunk (a long chunk spans several rows). Narrow rows
        waste less on padding but each row reads its whole context: pick the cheapest."""
        longest = max(counts.values())
        context = max(s.computed + counts[s.id] for s in seqs)
        token, row_token, pair = self._costs
        best: tuple[float, int] | None = None
        widths = {*(1 << i for i in range(longest.bit_length())), longest}
        for w in sorted(widths if self.row_width is None else {min(self.row_width, longest)}):
            n_rows = sum(-(-c // w) for c in counts.values())
            cost = n_rows * (w * token + context * (row_token + w * pair))
            if best is None or cost < best[0]:
                best = (cost, w)
        assert best is not None
        width = best[1]
        rows = [Row(s.id, s.computed + i, min(width, counts[s.id] - i))
                for s in seqs for i in range(0, counts[s.id], width)]
        return rows, width

    def _emit(self, s: _Sequence, token: int) -> Event:
        s.tokens.append(token)
        self._generated_tokens += 1
        finish: FinishReason | None = None
        if token in s.ends:
            finish = "stop"
        elif s.generated >= s.max_tokens:
            finish = "length"
        if finish is not None:
            del self._running[s.id]
            self.pool.release(s.id)
        return Event(s.id, token, finish)


def _row_costs(cfg: ModelConfig) -> tuple[float, float, float]:
    """Rough multiply-adds of the attention block, for :meth:`Engine._layout`: per row token
    (projections), per (row, context token) pair (the gather, MLA's latent expansion) and per
    (query, key) pair (the scores and the weighted sum)."""
    d, h = cfg.hidden_size, cfg.num_heads
    if cfg.mla is not None:
        m = cfg.mla
        q_in = m.q_lora_rank or d
        q_out = h * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        token = (d * q_in if m.q_lora_rank else 0) + q_in * q_out \
            + d * (m.kv_lora_rank + m.qk_rope_head_dim) + h * m.v_head_dim * d
        context = m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim) \
            + 4 * (m.kv_lora_rank + m.qk_rope_head_dim)
        pair = h * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
        return float(token), float(context), float(pair)
    hd, kv = cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    token = d * (2 * h * hd + 2 * kv)
    context = 4 * 2 * kv + 2 * h * hd  # gather; repeat_interleave to all heads
    return float(token), float(context), float(2 * h * hd)
