"""``generate``: text generation in the router tier, a thin decoupled Triton model over
:class:`autoglm.engine.service.TextEngine`.

It lives beside ``router`` in every router server and loads the same version's router slice
and tokenizer (``router/<V>/``). ``execute`` only hands requests to the inbox; one engine
thread admits them between steps, runs the continuous-batching loop and streams each
request's tokens out through its response sender as they are made, ``AUTOGLM_STREAM_INTERVAL``
(``spec.router.streamInterval``, default 1) tokens a response: the first token goes alone at
once (time to first token is unchanged), then a response when that many are pending or the
generation ends, which cuts the per-response costs downstream (the gateway's events, the
client's reads) at the price of burstier streams. No lock is held across a step (its expert
calls), so new requests are taken while a step runs. A cancelled request (a
gRPC client that went away) is aborted within ``CANCEL_CHECK_SECONDS``, freeing its KV cache:
each ``is_cancelled()``, like each metric update, is a blocking message to the Triton
process, so neither is sent every step. The engine reuses the KV blocks of cached prompt
prefixes unless ``AUTOGLM_PREFIX_CACHING=0`` (benches compare).

Saturation: at most ``AUTOGLM_MAX_WAITING`` requests (default 256) wait for room in the
engine (KV cache, batch) beyond those running; one more is refused at once with an error
that begins with ``SATURATED`` (``"saturated: "``), which the gateway answers as 429 with
``Retry-After``, rather than queued without bound (its client would wait for minutes, or
time out). ``0`` lifts the bound (the queue grows as requests come, as before).

Inputs (exactly one): ``text_input`` BYTES [1] (a prompt), ``messages`` BYTES [1] (chat
messages as JSON, rendered with the checkpoint's chat template), ``input_ids`` INT64 [-1].
Request parameters: ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``
(a string or a JSON list), ``ignore_eos``. Each response: ``text_output`` (new text),
``output_ids`` (new token ids: one, up to the stream interval), ``finish_reason`` ("" until
the last: "stop" or "length"), ``prompt_tokens``, ``completion_tokens`` (so far),
``model_version``. The latency histograms time the tokens as the engine makes them, not the
responses, from the request's arrival in ``execute``; the queue-time histogram, from arrival
to admission into the running batch (the rest of the time to first token is prefill). The
parameter ``canary`` (no input) runs the version's stored prompt greedily; its last response
adds ``canary_expected``, the reference's greedy tokens, so a version's generation can be
verified by whoever reaches the router.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from autoglm.backends.expect import check_expectations
from autoglm.backends.fanout import ExpertFanout
from autoglm.backends.placement import placement
from autoglm.engine.errors import FAILED, SATURATED, RequestError, Saturated
from autoglm.engine.scheduler import Engine, StepError
from autoglm.engine.service import Chunk, TextEngine, merge
from autoglm.engine.text import Tokenizer
from autoglm.models.decoder import RouterTier
from autoglm.plan import STREAM_INTERVAL_ENV, router_model
from autoglm.repository import load_part_config, load_weights

# Seconds. Time to first token spans queueing and prefill; inter-token latency one step.
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
QUEUE_BUCKETS = [0.001, 0.0025, 0.005, *TTFT_BUCKETS]  # most wait a step at most
ITL_BUCKETS = [0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5.0]
CANCEL_CHECK_SECONDS = 0.2
MAX_WAITING_ENV = "AUTOGLM_MAX_WAITING"
MAX_WAITING_DEFAULT = 256  # queued behind a full engine: beyond it a client is told to retry


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self.version = int(args["model_version"])
        d = Path(args["model_repository"]).parent / router_model() / args["model_version"]
        _, cfg = load_part_config(d)
        check_expectations(cfg, self.version)
        device, dtype = placement(args)
        torch.set_num_threads(_env_int("AUTOGLM_TORCH_THREADS", 1))
        self.interval = _env_int(STREAM_INTERVAL_ENV, 1)
        if self.interval < 1:
            raise ValueError(f"{STREAM_INTERVAL_ENV} must be at least 1, got {self.interval}")
        max_waiting = _env_int(MAX_WAITING_ENV, MAX_WAITING_DEFAULT)
        if max_waiting < 0:
            raise ValueError(f"{MAX_WAITING_ENV} must be 0 (no bound) or more, got "
                             f"{max_waiting}")
        self.fanout = ExpertFanout(cfg.num_experts, self.version)
        engine = Engine(RouterTier(cfg, load_weights(d, device, dtype)), self.fanout,
                        kv_capacity_tokens=_env_int("AUTOGLM_KV_CAPACITY_TOKENS", 16384),
                        max_batch_tokens=_env_int("AUTOGLM_MAX_BATCH_TOKENS", 256),
                        prefill_chunk=_env_int("AUTOGLM_PREFILL_CHUNK", 128),
                        micro_batches=_env_int("AUTOGLM_MICRO_BATCHES", 1),
                        prefix_caching=_env_int("AUTOGLM_PREFIX_CACHING", 1) != 0,
                        max_waiting=max_waiting or None,
                        on_route=self._routed)
        self._metrics()
        self.text = TextEngine(engine, Tokenizer.from_dir(d / "hf"))
        with np.load(d / "canary.npz") as z:  # the version's greedy canary
            self.canary = (z["greedy_prompt"].tolist(), z["greedy_tokens"])
        # Only the engine thread touches the engine and these:
        self.canaries: set[int] = set()
        self.requests: dict[int, Any] = {}  # engine id → Triton request (for its sender)
        self.senders: dict[int, Any] = {}
        self.pending: dict[int, list[Chunk]] = {}  # chunks made, not yet sent (the interval)
        self._cancel_checked = self._observed = 0.0
        # Shared with execute(), under the lock: requests not yet admitted, and stopping.
        self.inbox: list[tuple[Any, Any, float]] = []  # (request, sender, arrival)
        self.work = threading.Condition(threading.Lock())
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def _metrics(self) -> None:
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        histogram = pb_utils.MetricFamily.HISTOGRAM
        self._families = {
            name: pb_utils.MetricFamily(name=name, description=doc, kind=kind)
            for name, doc, kind in (
                ("autoglm_generate_running", "Sequences generating", gauge),
                ("autoglm_generate_waiting", "Sequences waiting for KV cache", gauge),
                ("autoglm_kv_cache_used_tokens", "KV cache reserved, in tokens", gauge),
                ("autoglm_kv_cache_capacity_tokens", "KV cache capacity, in tokens", gauge),
                ("autoglm_kv_cache_cached_tokens", "KV cache held by no generation but kept "
                 "for prefix reuse (reclaimable), in tokens", gauge),
                ("autoglm_generated_tokens_total", "Tokens generated", counter),
                ("autoglm_prompt_tokens_total", "Prompt tokens of admitted generations",
                 counter),
                ("autoglm_prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix "
                 "cache, not prefilled (hit rate: / autoglm_prompt_tokens_total)", counter),
                ("autoglm_generate_steps_total", "Engine steps: batched forwards, each one "
                 "fan-out per MoE layer (expert server calls per step: "
                 "autoglm_expert_server_calls_total / this)", counter),
                ("autoglm_time_to_first_token_seconds",
                 "From a generation's arrival to its first token", histogram),
                ("autoglm_queue_seconds", "From a generation's arrival to its admission "
                 "into the running batch (waiting for KV cache or a batch place)",
                 histogram),
                ("autoglm_inter_token_latency_seconds",
                 "Between consecutive tokens of a generation, as the engine makes them "
                 "(a stream interval sends them in bursts)", histogram))}
        labels = {"version": str(self.version)}
        buckets = {"autoglm_time_to_first_token_seconds": TTFT_BUCKETS,
                   "autoglm_inter_token_latency_seconds": ITL_BUCKETS,
                   "autoglm_queue_seconds": QUEUE_BUCKETS}
        self.m = {name: fam.Metric(labels=labels, buckets=buckets[name]) if name in buckets
                  else fam.Metric(labels=labels) for name, fam in self._families.items()}
        self._generated = self._steps = self._prompt = self._hits = 0
        self._last: dict[int, float] = {}  # request → arrival, then its last token's time
        self._queued: dict[int, float] = {}  # request → arrival, until it is admitted

    def _observe(self, force: bool = False) -> None:
        """The engine's gauges, at most once a flush period unless ``force``."""
        now = time.monotonic()
        if not force and now - self._observed < self.fanout.counters.period:
            return
        self._observed = now
        stats = self.text.engine.stats()
        self.m["autoglm_generate_running"].set(float(stats.running))
        self.m["autoglm_generate_waiting"].set(float(stats.waiting))
        self.m["autoglm_kv_cache_used_tokens"].set(float(stats.kv_used_tokens))
        self.m["autoglm_kv_cache_capacity_tokens"].set(float(stats.kv_capacity_tokens))
        self.m["autoglm_generated_tokens_total"].increment(
            float(stats.generated_tokens - self._generated))
        self._generated = stats.generated_tokens
        self.m["autoglm_generate_steps_total"].increment(float(stats.steps - self._steps))
        self._steps = stats.steps
        self.m["autoglm_kv_cache_cached_tokens"].set(float(stats.kv_cached_tokens))
        self.m["autoglm_prompt_tokens_total"].increment(
            float(stats.prompt_tokens - self._prompt))
        self._prompt = stats.prompt_tokens
        self.m["autoglm_prefix_cache_hit_tokens_total"].increment(
            float(stats.prefix_hit_tokens - self._hits))
        self._hits = stats.prefix_hit_tokens

    def _routed(self, layer: int, idx: torch.Tensor) -> None:
        """Prefill and decode tokens alike feed the autoscaling signal; a step of canaries
        only (a standby being verified) is not user load."""
        if self.canaries and len(self.canaries) >= self.text.engine.running:
            return
        experts, counts = torch.unique(idx, return_counts=True)
        self.fanout.count_routed(dict(zip(experts.tolist(), counts.tolist(), strict=True)))

    # -- requests in -------------------------------------------------------------------

    def execute(self, requests: list[Any]) -> None:
        now = time.monotonic()  # arrival: the engine thread may be in a step
        arrived = [(r, r.get_response_sender(), now) for r in requests]
        with self.work:
            self.inbox.extend(arrived)
            self.work.notify()
        return None

    def _admit(self, request: Any, sender: Any, arrival: float) -> None:
        """Into the engine (on the engine thread, between steps), or refused with the
        reason."""
        try:
            rid = self._submit(request)
        except Saturated as e:  # not the request's fault: "retry later", not "bad request"
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                SATURATED + str(e), pb_utils.TritonError.UNAVAILABLE)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        except (RequestError, ValueError) as e:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                str(e), pb_utils.TritonError.INVALID_ARG)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        self.requests[rid] = request
        self.senders[rid] = sender
        if rid not in self.canaries:  # canaries are not user load: not timed
            self._last[rid] = self._queued[rid] = arrival

    def _submit(self, request: Any) -> int:
        def text(name: str) -> str | None:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                return None
            v = t.as_numpy().reshape(-1)
            if v.size != 1:
                raise RequestError(f"{name} must hold one string")
            raw = v[0]
            return raw.decode() if isinstance(raw, bytes) else str(raw)

        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        messages = text("messages")
        try:
            parsed = json.loads(messages) if messages is not None else None
            params = json.loads(request.parameters() or "{}")
        except ValueError as e:
            raise RequestError(f"not JSON: {e}") from None
        if params.get("canary") is True:  # the stored prompt, greedy; expected tokens at the end
            rid = self.text.submit({"max_tokens": len(self.canary[1]), "temperature": 0.0,
                                    "ignore_eos": True}, ids=self.canary[0])
            self.canaries.add(rid)
            return rid
        return self.text.submit(
            params, text=text("text_input"), messages=parsed,
            ids=ids.as_numpy().reshape(-1).tolist() if ids is not None else None)

    # -- the engine loop ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.work:
                while not self.stopping and not self.inbox \
                        and not self.text.engine.has_work():
                    self._observe(force=True)  # idle: as it is now
                    self.work.wait()
                if self.stopping:
                    return
                arrived, self.inbox = self.inbox, []
            for request, sender, arrival in arrived:
                self._admit(request, sender, arrival)
            now = time.monotonic()
            if arrived or now - self._cancel_checked >= CANCEL_CHECK_SECONDS:
                self._cancel_checked = now
                for rid in [r for r, req in self.requests.items() if req.is_cancelled()]:
                    self.text.abort(rid)
                    self._close(rid)
            self._observe()
            started = time.monotonic()  # a step admits first: its admissions happen now
            try:
                chunks = self.text.step()
            except StepError as e:  # an expert down: the step's requests end with it
                self._admitted(started)
                for rid in e.ids:
                    self._fail(rid, str(e.__cause__ or e))
                continue
            self._admitted(started)
            for c in chunks:
                self._made(c)

    def _admitted(self, at: float) -> None:
        """Queue time of what the step that started ``at`` admitted."""
        for rid in self.text.engine.admitted:
            arrival = self._queued.pop(rid, None)
            if arrival is not None:  # not a canary
                self.m["autoglm_queue_seconds"].observe(at - arrival)

    def _made(self, c: Chunk) -> None:
        """A token made for request ``c.id``: timed now, then sent at once if it is the first
        or the last, else held until ``interval`` tokens are pending."""
        if c.id not in self.senders:
            return
        final = c.finish_reason is not None
        self._latency(c, final)
        held = self.pending.pop(c.id, [])
        held.append(c)
        if final or c.completion_tokens == 1 \
                or sum(len(x.token_ids) for x in held) >= self.interval:
            self._send(merge(held))
        else:
            self.pending[c.id] = held

    def _send(self, c: Chunk, final: bool = False) -> None:
        """One response: ``c`` may carry several tokens (:func:`merge`); the last of the
        request if ``c`` is (its finish reason) or ``final``."""
        sender = self.senders.get(c.id)
        if sender is None:
            return
        out = [pb_utils.Tensor("text_output", np.array([c.text.encode()], dtype=np.object_)),
               pb_utils.Tensor("output_ids", np.array(c.token_ids, dtype=np.int64)),
               pb_utils.Tensor("finish_reason",
                               np.array([(c.finish_reason or "").encode()], dtype=np.object_)),
               pb_utils.Tensor("prompt_tokens", np.array([c.prompt_tokens], dtype=np.int32)),
               pb_utils.Tensor("completion_tokens",
                               np.array([c.completion_tokens], dtype=np.int32)),
               pb_utils.Tensor("model_version", np.array([self.version], dtype=np.int64))]
        finished = c.finish_reason is not None
        final = final or finished
        if finished and c.id in self.canaries:
            out.append(pb_utils.Tensor("canary_expected", self.canary[1].astype(np.int64)))
        sender.send(pb_utils.InferenceResponse(output_tensors=out),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
        if final:
            self._forget(c.id)

    def _latency(self, c: Chunk, final: bool) -> None:
        """Per token made (each chunk carries the one token a step made for its request), as
        the engine makes it, whether or not its response goes now: with a stream interval
        the client sees the later tokens in bursts, these time the engine."""
        last = self._last.pop(c.id, None) if final else self._last.get(c.id)
        if last is None:  # a canary
            return
        now = time.monotonic()
        name = ("autoglm_time_to_first_token_seconds" if c.completion_tokens == 1
                else "autoglm_inter_token_latency_seconds")
        self.m[name].observe(now - last)
        if not final:
            self._last[c.id] = now

    def _forget(self, rid: int) -> Any:
        """Everything held for a request that has ended, however it ended (a canary that
        failed or was cancelled too: a leaked canary id would hide user load from
        ``_routed``); its sender, if it still had one."""
        self._last.pop(rid, None)
        self._queued.pop(rid, None)
        self.pending.pop(rid, None)
        self.canaries.discard(rid)
        self.requests.pop(rid, None)
        return self.senders.pop(rid, None)

    def _fail(self, rid: int, message: str) -> None:
        """The generation failed: its error ends the stream (tokens held back are dropped)."""
        sender = self._forget(rid)
        if sender is None:
            return
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(FAILED + message)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _close(self, rid: int) -> None:
        """The request was cancelled: its last response carries any tokens held back."""
        held = self.pending.pop(rid, None)
        if held and rid in self.senders:
            self._send(merge(held), final=True)
            return
        sender = self._forget(rid)
        if sender is not None:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        with self.work:
            self.stopping = True
            self.work.notify()
        self.thread.join(timeout=10)
        self.fanout.close()
