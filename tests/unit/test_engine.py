"""The generation engine (continuous batching, bounded KV cache, sampler) against transformers'
``generate``, architecture by architecture, with experts reached through the local fan-out."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from autoglm.engine.cache import KVPool, Row
from autoglm.engine.errors import RETRY_AFTER_SECONDS, RequestError, SamplingError, Saturated
from autoglm.engine.sampler import SamplingParams, generator_for, sample
from autoglm.engine.scheduler import Engine, Event, Request
from autoglm.models.decoder import Model
from autoglm.repository import import_checkpoint, load_reference
from autoglm.testing.checkpoints import ARCHITECTURES, reference_model, write_checkpoint

NEW = 24
LENGTHS = (1, 3, 5, 8, 11, 16, 23, 40)
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """One model for the tests that do not depend on the architecture."""
    tmp = tmp_path_factory.mktemp("small")
    src = write_checkpoint("Qwen3MoeForCausalLM", tmp / "ckpt", seed=2)
    return load_reference(import_checkpoint(src, tmp / "repo", 1, "m", progress=False)
                          .repository, 1)


@dataclass
class Case:
    arch: str
    model: Model
    prompts: list[list[int]]
    expected: list[list[int]]  # transformers' greedy tokens for each prompt, alone


@pytest.fixture(scope="module", params=ARCHITECTURES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    arch: str = request.param
    tmp = tmp_path_factory.mktemp(arch)
    src = write_checkpoint(arch, tmp / "ckpt", seed=1)
    model = load_reference(import_checkpoint(src, tmp / "repo", 1, "m", progress=False)
                           .repository, 1)
    theirs: Any = reference_model(src)  # a transformers model: generate() is untyped
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in LENGTHS]
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        # eos_token_id=None disables EOS; an explicit mask, or generate would take the pad id
        # (= eos here) inside a prompt for padding and mask it out
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              do_sample=False, eos_token_id=None)
        assert out.shape[1] == len(p) + NEW, "EOS disabled: every generation runs to the end"
        expected.append(out[0, len(p):].tolist())
    return Case(arch, model, prompts, expected)


class CountingFanout:
    """The local fan-out, recording each call: (layer, tokens sent per expert)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.calls: list[tuple[int, dict[int, int]]] = []

    def __call__(self, layer: int, sends: Mapping[int, torch.Tensor],
                 ) -> dict[int, torch.Tensor]:
        self.calls.append((layer, {e: int(t.shape[0]) for e, t in sends.items()}))
        return self.model.local_fanout(layer, sends)


def engine(model: Model, capacity: int = 4096, batch: int = 64, chunk: int = 16,
           fanout: CountingFanout | None = None, width: int | None = None,
           prefix_caching: bool = True) -> Engine:
    return Engine(model.router, fanout or model.local_fanout, kv_capacity_tokens=capacity,
                  max_batch_tokens=batch, prefill_chunk=chunk, row_width=width,
                  prefix_caching=prefix_caching)


def drain(eng: Engine, out: dict[int, list[int]] | None = None,
          max_steps: int = 1000) -> dict[int, list[int]]:
    out = {} if out is None else out
    for _ in range(max_steps):
        if not eng.has_work():
            return out
        record(eng.step(), out)
    raise AssertionError("the engine did not finish")


def record(events: Sequence[Event], out: dict[int, list[int]]) -> None:
    for e in events:
        out.setdefault(e.id, []).append(e.token)


def generate_alone(model: Model, prompt: list[int], params: SamplingParams) -> list[int]:
    eng = engine(model)
    i = eng.add(Request(prompt, params))
    return drain(eng)[i]


def test_greedy_alone_equals_transformers(case: Case) -> None:
    for k in (0, len(LENGTHS) - 1):  # the shortest and the longest prompt
        assert generate_alone(case.model, case.prompts[k], GREEDY) == case.expected[k]


# rows as the engine picks them; one per sequence, padded to the longest chunk; one per token
@pytest.mark.parametrize("width", [None, 64, 1], ids=["chosen", "padded", "token-rows"])
def test_together_each_gets_its_own_tokens_and_one_fanout_call_per_layer(
        case: Case, width: int | None) -> None:
    """8 prompts, half joining after the others started; prompts are chunked (8 a step,
    32 tokens a step in all), so steps mix prefill chunks and decode tokens."""
    fanout = CountingFanout(case.model)
    eng = engine(case.model, batch=32, chunk=8, fanout=fanout, width=width)
    ids = [eng.add(Request(p, GREEDY)) for p in case.prompts[::2]]
    out: dict[int, list[int]] = {}
    per_step: list[list[tuple[int, dict[int, int]]]] = []
    for _ in range(3):
        record(eng.step(), out)
        per_step.append(fanout.calls)
        fanout.calls = []
    ids += [eng.add(Request(p, GREEDY)) for p in case.prompts[1::2]]
    while eng.has_work():
        record(eng.step(), out)
        per_step.append(fanout.calls)
        fanout.calls = []
    prompts = case.prompts[::2] + case.prompts[1::2]
    expected = case.expected[::2] + case.expected[1::2]
    for i, p, want in zip(ids, prompts, expected, strict=True):
        assert out[i] == want, f"prompt of {len(p)} tokens"

    moe = case.model.cfg.moe_layers
    for calls in per_step:
        assert sorted(layer for layer, _ in calls) == sorted(moe), \
            "one fan-out call per MoE layer per step, all selected experts in it"
    # every real token is routed to top_k experts, padding never: prompt + all but the last
    # generated token went through the model
    total = sum(len(p) + NEW - 1 for p in prompts)
    top_k = case.model.cfg.top_k
    for layer in moe:
        routed = sum(n for calls in per_step for lyr, sent in calls if lyr == layer
                     for n in sent.values())
        assert routed == top_k * total, f"layer {layer}"
    # a decode step of all 8 sequences: one call per layer carrying 8 tokens x top_k
    assert sum(per_step[-NEW // 2][0][1].values()) == 8 * top_k
    assert eng.pool.used_tokens == 0


class DeferredFanout(CountingFanout):
    """A local fan-out that, like the servers' (backends/fanout.py), starts calls and answers
    them later; it logs each start and finish: (event, layer)."""

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self.log: list[tuple[str, int]] = []

    def start(self, layer: int, sends: Mapping[int, torch.Tensor],
              ) -> Callable[[], dict[int, torch.Tensor]]:
        self.log.append(("start", layer))

        def finish() -> dict[int, torch.Tensor]:
            self.log.append(("finish", layer))
            return self(layer, sends)
        return finish


@pytest.mark.parametrize("micro", [2, 3])
def test_micro_batches_interleave_and_change_no_token(case: Case, micro: int) -> None:
    """Micro-batches (MegaScale-Infer's ping-pong): the next micro-batch starts its expert
    calls of a layer before the first one's of that layer are answered, and every greedy
    token stays transformers'."""
    fanout = DeferredFanout(case.model)
    eng = Engine(case.model.router, fanout, kv_capacity_tokens=4096, max_batch_tokens=32,
                 prefill_chunk=8, micro_batches=micro)
    ids = [eng.add(Request(p, GREEDY)) for p in case.prompts]
    out = drain(eng)
    for i, want in zip(ids, case.expected, strict=True):
        assert out[i] == want
    first = case.model.cfg.moe_layers[0]
    assert fanout.log[:micro + 1] == [("start", first)] * micro + [("finish", first)], \
        "every micro-batch's calls of the first MoE layer are in flight together"
    assert eng.pool.used_tokens == 0


def test_seeded_sampling_is_reproducible_across_runs_and_batches(case: Case) -> None:
    model, prompt = case.model, case.prompts[4]
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=20, seed=1234)
    alone = generate_alone(model, prompt, params)
    assert generate_alone(model, prompt, params) == alone
    eng = engine(model, chunk=4)
    others = [eng.add(Request(case.prompts[k], SamplingParams(max_tokens=10, temperature=1.2,
                                                               seed=k)))
              for k in (1, 7)]
    eng.add(Request(case.prompts[3], GREEDY))
    i = eng.add(Request(prompt, params))
    out = drain(eng)
    assert out[i] == alone, "batch composition changes no seeded request's tokens"
    assert all(len(out[o]) == 10 for o in others)
    other_seed = generate_alone(model, prompt, SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.9, top_k=20, seed=4321))
    assert other_seed != alone


def test_requests_beyond_capacity_wait_and_all_complete(small: Model) -> None:
    model = small
    prompts = [[5 + k] * (5 + k) for k in range(6)]
    # each request reserves 5..10 + 12 tokens: two 16-token blocks; 64 tokens hold two at once
    eng = engine(model, capacity=64, batch=16, chunk=4)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    ids = [eng.add(Request(p, params)) for p in prompts]
    out: dict[int, list[int]] = {}
    record(eng.step(), out)
    assert (eng.running, eng.waiting) == (2, 4)
    assert eng.admitted == tuple(ids[:2])  # what a step admits (its queue time ends)
    admitted = list(eng.admitted)
    peak = 0
    while eng.has_work():
        record(eng.step(), out)
        admitted += eng.admitted
        peak = max(peak, eng.pool.used_tokens)
        assert eng.running <= 2
    assert peak <= eng.pool.capacity == 64
    assert admitted == ids, "each admitted once, in arrival order"
    for i, p in zip(ids, prompts, strict=True):
        assert out[i] == generate_alone(model, p, params)
    with pytest.raises(RequestError, match="KV cache capacity"):
        eng.add(Request([1] * 60, params))


def test_a_full_waiting_queue_refuses_until_it_drains(small: Model) -> None:
    """``max_waiting`` bounds the requests queued beyond the running ones: one more is refused
    at once (Saturated, not a bad request), is taken again as the queue drains, and every
    admitted request completes with the tokens it makes alone."""
    params = SamplingParams(max_tokens=12, temperature=0.0)
    # each reserves two 16-token blocks: 64 tokens run two at once
    eng = Engine(small.router, small.local_fanout, kv_capacity_tokens=64, max_batch_tokens=16,
                 prefill_chunk=4, max_waiting=2)
    prompts = [[20 + k] * 5 for k in range(5)]
    ids = [eng.add(Request(p, params)) for p in prompts[:2]]
    with pytest.raises(Saturated, match=rf"2 requests are waiting .*at most 2.*retry in "
                                        rf"{RETRY_AFTER_SECONDS} s") as refused:
        eng.add(Request(prompts[2], params))
    assert not isinstance(refused.value, RequestError), "busy, not a bad request"
    with pytest.raises(RequestError, match="empty"):
        eng.add(Request([], params))  # what can never be served says so, full or not
    out: dict[int, list[int]] = {}
    record(eng.step(), out)
    assert (eng.running, eng.waiting) == (2, 0)
    ids += [eng.add(Request(p, params)) for p in prompts[2:4]]  # room again
    with pytest.raises(Saturated):
        eng.add(Request(prompts[4], params))
    assert eng.abort(ids[3]), "an aborted waiting request frees its place"
    ids[3] = eng.add(Request(prompts[3], params))
    drain(eng, out)
    ids.append(eng.add(Request(prompts[4], params)))
    drain(eng, out)
    for i, p in zip(ids, prompts, strict=True):
        assert out[i] == generate_alone(small, p, params)
    with pytest.raises(ValueError, match="max_waiting"):
        Engine(small.router, small.local_fanout, kv_capacity_tokens=64, max_batch_tokens=16,
               prefill_chunk=4, max_waiting=0)


def test_abort_returns_cache_use_to_baseline(small: Model) -> None:
    model = small
    eng = engine(model, capacity=256, chunk=4)
    baseline = eng.pool.used_tokens
    params = SamplingParams(max_tokens=20, temperature=0.0)
    a, b, c = (eng.add(Request([7, 8, 9, 10, 11][: 2 + k], params)) for k in range(3))
    out: dict[int, list[int]] = {}
    for _ in range(5):
        record(eng.step(), out)
    before = eng.pool.used_tokens
    assert eng.abort(b)
    assert eng.pool.used_tokens == before - 32, "its blocks are free at once"
    assert not eng.abort(b)
    waiting = eng.add(Request([3, 4], params))
    assert eng.abort(waiting), "a queued request can be aborted too"
    record(eng.step(), out)
    assert eng.abort(a) and eng.abort(c)
    assert eng.pool.used_tokens == baseline and not eng.has_work()
    assert (eng.running, eng.waiting) == (0, 0)
    assert eng.stats().kv_used_tokens == baseline


def test_stop_and_eos_ids_end_a_generation(small: Model) -> None:
    model = small
    prompt = [12, 13, 14]
    free = generate_alone(model, prompt, GREEDY)
    stop = free[5]
    cut = free.index(stop) + 1
    for req in (Request(prompt, GREEDY, stop_ids=[stop]), Request(prompt, GREEDY,
                                                                   eos_ids=[stop])):
        eng = engine(model)
        i = eng.add(req)
        events = [e for _ in range(100) if eng.has_work() for e in eng.step()]
        assert [e.token for e in events] == free[:cut]
        assert events[-1].finish == "stop" and events[-1].id == i
    eng = engine(model)
    eng.add(Request(prompt, GREEDY, eos_ids=[]))  # empty: EOS disabled
    events = [e for _ in range(100) if eng.has_work() for e in eng.step()]
    assert len(events) == NEW and events[-1].finish == "length"


@pytest.mark.parametrize("params, message", [
    (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(temperature=-0.1), "temperature"),
    (SamplingParams(temperature=float("nan")), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(top_k=-1), "top_k"),
    (SamplingParams(seed=-1), "seed"),
])
def test_out_of_range_sampling_parameters_are_refused(params: SamplingParams,
                                                      message: str) -> None:
    with pytest.raises(SamplingError, match=message):
        params.validate()


def test_bad_requests_are_refused(small: Model) -> None:
    eng = engine(small, capacity=1024)
    with pytest.raises(RequestError, match="empty"):
        eng.add(Request([], GREEDY))
    with pytest.raises(RequestError, match="vocabulary"):
        eng.add(Request([1, 128], GREEDY))
    with pytest.raises(RequestError, match="context window"):
        eng.add(Request([1] * 250, GREEDY))
    with pytest.raises(SamplingError):
        eng.add(Request([1], SamplingParams(top_k=-3)))
    assert not eng.has_work()


def test_sampler_filters() -> None:
    logits = torch.tensor([[3.0, 2.9, 2.8, -1.0, 0.5, 2.7]] * 2)
    gens = [generator_for(SamplingParams(seed=s)) for s in (1, 2)]
    seen: set[int] = set()
    for _ in range(200):
        seen.update(sample(logits, [SamplingParams(temperature=5.0, top_k=3)] * 2, gens))
    assert seen == {0, 1, 2}, "top_k keeps the k most likely"
    seen.clear()
    for _ in range(50):
        seen.update(sample(logits, [SamplingParams(temperature=1.0, top_p=1e-6)] * 2, gens))
    assert seen == {0}, "a tiny top_p keeps the most likely token"
    assert sample(logits, [SamplingParams(top_k=1), SamplingParams(temperature=0.0)],
                  gens) == [0, 0]


def test_pool_accounting() -> None:
    pool = KVPool([((2, 4), (2, 4))], capacity_tokens=70, block_size=16)
    assert pool.capacity == 64 and pool.used_tokens == 0
    assert pool.reserve(1, 17) and pool.used_tokens == 32
    assert not pool.reserve(2, 33), "only two blocks left"
    assert pool.reserve(2, 32) and not pool.fits(1)
    with pytest.raises(ValueError, match="row starts at 3"):
        pool.step([Row(1, 3, 2)], 2)
    pool.release(1)
    assert pool.used_tokens == 32 and pool.fits(32)
    pool.release(2)
    assert pool.used_tokens == 0
