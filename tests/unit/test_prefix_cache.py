"""Automatic prefix caching (``autoglm.engine.cache``): prompts sharing a prefix reuse its KV
blocks, change no greedy token on any architecture (MLA's latent cache included), prefill
only what is new, leak nothing when requests are aborted, and evict only blocks no sequence
holds, least recently used first."""

from __future__ import annotations

import collections
from collections.abc import Mapping

import pytest
import test_engine
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import Case, CountingFanout, drain, engine, record

from autoglm.engine.cache import KVPool, Row
from autoglm.engine.sampler import SamplingParams
from autoglm.engine.scheduler import Engine, Request, StepError
from autoglm.models.decoder import Model

case = test_engine.case  # its fixtures, by name: a model per architecture, and one model
small = test_engine.small
NEW = 12
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0)


def shared_prefix_prompts(case: Case) -> list[list[int]]:
    """Prompts over one 48-token prefix (three 16-token blocks): the prefix alone (all of it
    cached still computes its last token), longer, cut inside a block, a shorter prefix, and
    transformers' 40-token prompt (its tokens are known)."""
    prefix = case.prompts[-1] + case.prompts[3]
    return [prefix, prefix + case.prompts[2], prefix[:40] + case.prompts[4], prefix,
            prefix[:16] + case.prompts[6], case.prompts[-1]]


def run(eng: Engine, prompts: list[list[int]], mode: str) -> list[list[int]]:
    """Greedy tokens for ``prompts``: added together, each a few steps after the previous one
    (it shares blocks a running sequence holds), or each after the previous one ended (it
    shares the cached blocks of finished ones)."""
    out: dict[int, list[int]] = {}
    ids = []
    for p in prompts:
        ids.append(eng.add(Request(p, GREEDY)))
        if mode == "staggered":
            for _ in range(3):
                record(eng.step(), out)
        elif mode == "one-after-another":
            drain(eng, out)
    drain(eng, out)
    return [out[i] for i in ids]


@pytest.mark.parametrize("mode", ["together", "staggered", "one-after-another"])
def test_greedy_tokens_are_the_same_with_and_without_the_cache(case: Case, mode: str) -> None:
    prompts = shared_prefix_prompts(case)
    got: dict[bool, list[list[int]]] = {}
    hits: dict[bool, list[int]] = {}
    for caching in (False, True):
        eng = engine(case.model, batch=32, chunk=8, prefix_caching=caching)
        got[caching] = run(eng, prompts, mode)
        hits[caching] = [eng.stats().prefix_hit_tokens]
        # next turns: a previous prompt, its reply and more. Blocks ending in generated
        # tokens are cached too: prompt 1 (53 tokens) fills its fourth, prompt 4 (39) its third
        turns = [prompts[k] + got[caching][k] + case.prompts[1] for k in (1, 4)]
        got[caching] += run(eng, turns, mode)
        hits[caching].append(eng.stats().prefix_hit_tokens - hits[caching][0])
        assert eng.pool.used_tokens == 0
    assert got[True] == got[False], case.arch
    assert got[True][5] == case.expected[-1][:NEW], "transformers' tokens, from the cache"
    assert hits[False] == [0, 0]
    first = {"together": 0, "one-after-another": (3 + 2 + 2 + 1 + 2) * 16}
    if mode in first:
        assert hits[True][0] == first[mode]
    else:
        assert hits[True][0] > 0
    assert hits[True][1] == (4 + 3) * 16, "each turn finds all of its previous turn"


def computed_tokens(fanout: CountingFanout, model: Model) -> int:
    """Tokens that went through the model since the last call (each is routed to top_k
    experts in every MoE layer)."""
    layer = model.cfg.moe_layers[0]
    routed = sum(n for lyr, sent in fanout.calls if lyr == layer for n in sent.values())
    fanout.calls.clear()
    return routed // model.cfg.top_k


@pytest.mark.parametrize("caching", [True, False], ids=["cache", "no-cache"])
def test_shared_prefix_requests_prefill_only_their_new_tokens(small: Model,
                                                               caching: bool) -> None:
    new = 4
    params = SamplingParams(max_tokens=new, temperature=0.0)
    fanout = CountingFanout(small)
    eng = engine(small, fanout=fanout, prefix_caching=caching)
    a = [(7 * k + 3) % 128 for k in range(50)]
    # (prompt, tokens it finds cached)
    plan = [(a, 0), (a[:48] + [7] * 7, 48), (a, 48), (a[:48], 32), (a[:20] + [9] * 30, 16),
            ([1, *a[1:]], 0)]
    for prompt, cached in plan:
        before = eng.stats()
        eng.add(Request(prompt, params))
        drain(eng)
        after = eng.stats()
        reused = cached if caching else 0
        assert after.prompt_tokens - before.prompt_tokens == len(prompt)
        assert after.prefix_hit_tokens - before.prefix_hit_tokens == reused
        assert computed_tokens(fanout, small) == len(prompt) - reused + new - 1


def test_a_running_sequences_blocks_are_shared_and_counted_once(small: Model) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.0)
    eng = engine(small, chunk=16)
    x = [(5 * k + 1) % 128 for k in range(53)]
    first = eng.add(Request(x, params))
    out: dict[int, list[int]] = {}
    for _ in range(3):  # 48 of its 53 prompt tokens: three full blocks written
        record(eng.step(), out)
    assert eng.stats().kv_used_tokens == 64  # 53 + 4 tokens: four blocks
    second = eng.add(Request(x, params))
    record(eng.step(), out)
    stats = eng.stats()
    assert (stats.running, stats.prefix_hit_tokens) == (2, 48)
    assert stats.kv_used_tokens == 64 + 16, "the three shared blocks count once"
    drain(eng, out)
    assert out[first] == out[second]
    stats = eng.stats()
    # the shared blocks stay cached, reclaimable; each one's partly written last block is free
    assert (stats.kv_used_tokens, stats.kv_cached_tokens) == (0, 48)
    assert eng.pool.cached_prefix(x) == 48


class FailingFanout(CountingFanout):
    """Fails every call from the ``fail_at``-th on (an expert server down)."""

    def __init__(self, model: Model, fail_at: int) -> None:
        super().__init__(model)
        self.fail_at = fail_at

    def __call__(self, layer: int, sends: Mapping[int, torch.Tensor],
                 ) -> dict[int, torch.Tensor]:
        if len(self.calls) + 1 >= self.fail_at:
            raise RuntimeError("expert server down")
        return super().__call__(layer, sends)


def test_a_failed_step_caches_nothing_it_was_writing(small: Model) -> None:
    prompt = [(3 * k + 2) % 128 for k in range(40)]
    # the second step (prompt tokens 16..31) fails in its first MoE layer
    fanout = FailingFanout(small, fail_at=len(small.cfg.moe_layers) + 1)
    eng = engine(small, chunk=16, fanout=fanout)
    eng.add(Request(prompt, GREEDY))
    eng.step()
    with pytest.raises(StepError):
        eng.step()
    assert eng.pool.used_tokens == 0
    assert eng.pool.cached_prefix(prompt) == 16, "only the block written by a whole step"
    fanout.fail_at = 1 << 30
    again = eng.add(Request(prompt, GREEDY))
    assert drain(eng)[again] == drain_alone(small, prompt)


def drain_alone(model: Model, prompt: list[int]) -> list[int]:
    eng = engine(model, prefix_caching=False)
    i = eng.add(Request(prompt, GREEDY))
    return drain(eng)[i]


def check_pool(pool: KVPool) -> None:
    """Every block is free, cached (keyed, at 0 references) or held, and a held block's
    count is the number of sequences holding it."""
    held = collections.Counter(b for blocks in pool._blocks.values() for b in blocks)
    free, idle = set(pool._free), set(pool._idle)
    assert len(free) == len(pool._free), "a block twice on the free list"
    assert not free & idle and not (free | idle) & held.keys()
    assert len(free) + len(idle) + len(held) == pool.num_blocks
    assert pool._refs == [held[b] for b in range(pool.num_blocks)]
    assert idle <= pool._key.keys() and not free & pool._key.keys()
    assert {k: b for b, k in pool._key.items()} == pool._by_key
    assert pool.used_tokens == len(held) * pool.block_size
    assert pool.cached_tokens == len(idle) * pool.block_size


TENANTS = [torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(t)).tolist()
           for t in range(3)]
# (tenant, prefix tokens, own tokens, max_tokens, step it arrives, step it is aborted)
REQUESTS = st.tuples(st.integers(0, 2), st.integers(0, 40), st.integers(1, 12),
                     st.integers(1, 8), st.integers(0, 6), st.none() | st.integers(0, 14))


@settings(max_examples=25, deadline=None)
@given(requests=st.lists(REQUESTS, min_size=1, max_size=12))
def test_no_block_leaks_after_a_burst_of_aborts(
        small: Model, requests: list[tuple[int, int, int, int, int, int | None]]) -> None:
    """Requests over three tenants' prefixes arrive over a few steps and many are aborted at
    random steps, waiting or running; capacity (10 blocks) makes some wait. Throughout, the
    pool's states add up; at the end no block is held and all of it can be admitted again."""
    eng = engine(small, capacity=160, batch=16, chunk=8)
    ids: dict[int, int] = {}
    for step in range(200):
        for k, (tenant, n, own, new, arrive, _) in enumerate(requests):
            if arrive == step:
                prompt = TENANTS[tenant][:n] + [k + 1] * own
                ids[k] = eng.add(Request(prompt, SamplingParams(max_tokens=new,
                                                                temperature=0.0)))
        for k, req in enumerate(requests):
            if req[5] == step and k in ids:
                eng.abort(ids[k])
        eng.step()
        check_pool(eng.pool)
        if step > 6 and not eng.has_work():
            break
    assert not eng.has_work() and not eng.pool._blocks
    assert set(eng.pool._refs) == {0} and eng.pool.used_tokens == 0
    assert len(eng.pool._free) + len(eng.pool._idle) == eng.pool.num_blocks
    # the whole capacity in one request: every cached block is reclaimed for it
    whole = eng.add(Request([1] * 10, SamplingParams(max_tokens=150, temperature=0.0)))
    eng.step()
    assert eng.running == 1 and eng.pool.used_tokens == eng.pool.capacity == 160
    assert eng.pool.cached_tokens == 0
    eng.abort(whole)
    check_pool(eng.pool)


def write(pool: KVPool, seq: int, prompt: list[int]) -> None:
    """Admit ``prompt`` and write it whole, as a step would (no model: slots only)."""
    assert pool.reserve(seq, len(prompt), prompt)
    start = pool.length(seq)
    pool.step([Row(seq, start, len(prompt) - start)], len(prompt) - start)
    pool.commit(seq, prompt)


def test_eviction_takes_only_unheld_blocks_least_recently_used_first() -> None:
    pool = KVPool([((1, 2), (1, 2))], capacity_tokens=16, block_size=4)  # 4 blocks
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [11, 12, 13, 14, 15, 16, 17, 18]
    write(pool, 1, a)
    write(pool, 2, b)
    pool.release(2)
    pool.release(1)
    assert (pool.used_tokens, pool.cached_tokens) == (0, 16), "full of cached blocks"
    assert pool.cached_prefix([*a, 0]) == pool.cached_prefix([*b, 0]) == 8
    assert pool.cached_prefix(a) == 4, "a prompt's last token is always computed"

    # b (cached before a) is used again: it shares b's blocks and evicts the least recently
    # used of the rest, a's last block (useless without a's first, so released first)
    assert pool.reserve(3, 9, [*b, 99]) and pool.length(3) == 8
    assert (pool.used_tokens, pool.cached_tokens) == (12, 4)
    assert pool.cached_prefix([*a, 0]) == 4
    assert not pool.reserve(4, 8, [31] * 8), "b's blocks are held: never evicted"
    assert pool.cached_prefix([*b, 0]) == 8 and pool.cached_prefix([*a, 0]) == 4
    check_pool(pool)

    pool.release(3)  # b's blocks are now more recent than a's first block
    assert pool.reserve(4, 8, [31] * 8)  # the free block first, then the LRU: a's first
    assert pool.cached_prefix([*a, 0]) == 0 and pool.cached_prefix([*b, 0]) == 8
    pool.release(4)
    assert pool.reserve(5, 16, [41] * 16), "a request needing every block is admitted"
    assert (pool.used_tokens, pool.cached_tokens, pool.cached_prefix([*b, 0])) == (16, 0, 0)
    pool.release(5)
    check_pool(pool)


def test_a_shared_block_stays_held_until_its_last_sequence_releases_it() -> None:
    pool = KVPool([((1, 2), (1, 2))], capacity_tokens=16, block_size=4)  # 4 blocks
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    write(pool, 1, a)
    assert pool.reserve(2, 9, [*a, 0]) and pool.length(2) == 8  # a's blocks, and one more
    assert pool.used_tokens == 12, "shared blocks count once"
    pool.release(1)
    assert (pool.used_tokens, pool.cached_tokens) == (12, 0), "still held by sequence 2"
    assert not pool.reserve(3, 8, [5] * 8), "only one block is neither held nor shared"
    assert pool.reserve(3, 4, [5] * 4)
    pool.release(2)
    pool.release(3)
    assert (pool.used_tokens, pool.cached_tokens, pool.cached_prefix([*a, 0])) == (0, 8, 8)
    check_pool(pool)


def test_without_prefix_caching_nothing_is_kept() -> None:
    pool = KVPool([((1, 2), (1, 2))], capacity_tokens=16, block_size=4, prefix_caching=False)
    a = list(range(1, 9))
    write(pool, 1, a)
    pool.release(1)
    assert (pool.cached_tokens, pool.cached_prefix([*a, 0])) == (0, 0)
    assert pool.reserve(2, 9, [*a, 0]) and pool.length(2) == 0
    check_pool(pool)
