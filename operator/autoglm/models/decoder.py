"""The MoE decoder, split the way it is served: a router tier and one slice per expert.

The router tier (:class:`RouterTier`) holds everything but the routed experts: embeddings,
attention, norms, gates, shared experts, dense MLPs and the head. :class:`ExpertSlice` ``i``
holds routed expert *i* of every MoE layer. :func:`moe_layer` is the one fan-out/combine rule:
the in-process reference (:class:`Model`) and the Triton router both run it, with the expert
call injected, so their outputs agree.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from typing import TypeVar

import torch

from autoglm.models import layers as L
from autoglm.models.config import ModelConfig
from autoglm.models.rope import Rotary

# several expert calls of one layer at once: {expert: tokens [n, d]} → {expert: output [n, d]}
ExpertFanout = Callable[[int, Mapping[int, torch.Tensor]], Mapping[int, torch.Tensor]]
# sees each MoE layer's routing: (layer, expert ids [T, k])
RouteObserver = Callable[[int, torch.Tensor], None]
T = TypeVar("T")


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


class RouterTier:
    """Everything but the routed experts: what the ``router`` Triton model holds."""

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.w = dict(weights)
        if cfg.tie_word_embeddings:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.rotary = Rotary(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self._attention = L.mla if cfg.mla is not None else L.gqa

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.w["model.embed_tokens.weight"][ids]

    def attention(self, layer: int, x: torch.Tensor, positions: torch.Tensor,
                  cache: L.KVCache | None = None) -> torch.Tensor:
        """Pre-norm attention block with its residual: x [B, S, d] → [B, S, d]."""
        p = layer_prefix(layer)
        h = L.rms_norm(x, self.w[f"{p}.input_layernorm.weight"], self.cfg.rms_norm_eps)
        return x + self._attention(self.cfg, self.rotary, self.w, f"{p}.self_attn", layer, h,
                                   positions, cache)

    def post_norm(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return L.rms_norm(x, self.w[f"{layer_prefix(layer)}.post_attention_layernorm.weight"],
                          self.cfg.rms_norm_eps)

    def route(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = f"{layer_prefix(layer)}.mlp.gate"
        return L.route(self.cfg.gate, self.cfg.top_k, h, self.w[f"{p}.weight"],
                       self.w.get(f"{p}.e_score_correction_bias"))

    def local_mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        """What the router computes itself for a layer's MLP: the whole dense MLP, or the
        shared experts of an MoE layer (None when it has none)."""
        p = f"{layer_prefix(layer)}.mlp"
        if not self.cfg.is_moe(layer):
            return L.mlp(h, self.w, p)
        if not self.cfg.shared_intermediate_size:
            return None
        if self.cfg.shared_expert_gate:
            gate = torch.sigmoid(L.linear(h, self.w, f"{p}.shared_expert_gate"))
            return gate * L.mlp(h, self.w, f"{p}.shared_expert")
        return L.mlp(h, self.w, f"{p}.shared_experts")

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = L.rms_norm(x, self.w["model.norm.weight"], self.cfg.rms_norm_eps)
        return L.linear(x, self.w, "lm_head")


# A forward in stages: it yields while a layer's expert calls are in flight, so that another
# micro-batch's forward can run then (:func:`interleave`); its value is the forward's result.
Stages = Generator[None, None, T]


def run(stages: Stages[T]) -> T:
    """A staged forward run to the end on its own."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def interleave(stages: Sequence[Stages[T]]) -> list[T]:
    """Staged forwards round-robin, MegaScale-Infer's ping-pong: while one micro-batch's
    expert calls are in flight the next computes its attention. Results in order."""
    results: dict[int, T] = {}
    live = list(enumerate(stages))
    try:
        while live:
            still = []
            for i, g in live:
                try:
                    next(g)
                    still.append((i, g))
                except StopIteration as done:
                    results[i] = done.value
            live = still
    finally:
        for g in stages:
            g.close()
    return [results[i] for i in range(len(stages))]


def moe_layer_stages(router: RouterTier, layer: int, h: torch.Tensor, fanout: ExpertFanout,
                     on_route: RouteObserver | None = None,
                     ) -> Stages[tuple[torch.Tensor, dict[int, int]]]:
    """h [T, d] (post-norm tokens) → Σ_k w_k · expert_k(h) (+ shared experts), and the tokens
    sent to each expert. Each selected expert receives only its tokens, all at once."""
    idx, weights = router.route(layer, h)
    if on_route is not None:
        on_route(layer, idx)
    sends: dict[int, torch.Tensor] = {}
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for e in torch.unique(idx).tolist():  # ascending, as transformers accumulates
        tok, k = (idx == e).nonzero(as_tuple=True)
        rows[e] = (tok, k)
        sends[e] = h[tok]
    # A fan-out that can (backends/fanout.py) sends first and answers later: the shared
    # experts, and other micro-batches, run while the expert servers work.
    start = getattr(fanout, "start", None)
    if start is not None:
        pending = start(layer, sends)
        shared = router.local_mlp(layer, h)
        yield
        outs = pending()
    else:
        outs = fanout(layer, sends)
        shared = router.local_mlp(layer, h)
    y = torch.zeros_like(h)
    for e, (tok, k) in rows.items():
        y.index_add_(0, tok, (outs[e] * weights[tok, k, None]).to(y.dtype))
    return (y if shared is None else y + shared), {e: int(t.shape[0]) for e, t in sends.items()}


def moe_layer(router: RouterTier, layer: int, h: torch.Tensor, fanout: ExpertFanout,
              on_route: RouteObserver | None = None) -> tuple[torch.Tensor, dict[int, int]]:
    """:func:`moe_layer_stages` run on its own."""
    return run(moe_layer_stages(router, layer, h, fanout, on_route))


def mlp_block(router: RouterTier, layer: int, h: torch.Tensor, fanout: ExpertFanout,
              on_route: RouteObserver | None, tokens: dict[int, int]) -> Stages[torch.Tensor]:
    """A layer's MLP half on post-norm tokens h [T, d]: the MoE fan-out (adding the tokens
    it routed to ``tokens``) or the dense MLP."""
    if router.cfg.is_moe(layer):
        out, sent = yield from moe_layer_stages(router, layer, h, fanout, on_route)
        for e, n in sent.items():
            tokens[e] = tokens.get(e, 0) + n
        return out
    dense = router.local_mlp(layer, h)
    assert dense is not None  # a dense layer always has its MLP
    return dense


def forward(router: RouterTier, ids: torch.Tensor, fanout: ExpertFanout,
            positions: torch.Tensor | None = None, cache: L.KVCache | None = None,
            on_route: RouteObserver | None = None) -> tuple[torch.Tensor, dict[int, int]]:
    """ids [B, S] → logits [B, S, V], with experts reached through ``fanout``; also the
    tokens routed to each expert. Without a cache, each row is a whole sequence from 0."""
    b, s = ids.shape
    if positions is None:
        positions = torch.arange(s, device=ids.device).expand(b, s)
    x = router.embed(ids)
    tokens: dict[int, int] = {}
    for layer in range(router.cfg.num_layers):
        x = router.attention(layer, x, positions, cache)
        h = router.post_norm(layer, x).reshape(b * s, -1)
        out = run(mlp_block(router, layer, h, fanout, on_route, tokens))
        x = x + out.view(b, s, -1)
    return router.head(x), tokens


def forward_rows(router: RouterTier, ids: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor, select: torch.Tensor, fanout: ExpertFanout,
                 cache: L.KVCache, on_route: RouteObserver | None = None,
                 ) -> Stages[tuple[torch.Tensor, dict[int, int]]]:
    """The generation engine's step: rows of tokens ids [R, S] whose ``valid`` [R, S] marks
    real tokens; the rest pad the rows to one shape. Padding goes through attention only
    (rows must be rectangular there; the cache must not store it, and its positions must let
    it see a key so it stays finite); it never reaches a gate, an expert or an MLP. Returns
    the logits of the flat token indices ``select`` [n] (the tokens to sample from) and the
    tokens routed to each expert. Staged: run it with :func:`run` or :func:`interleave`."""
    r, s = ids.shape
    keep = valid.reshape(-1).nonzero().squeeze(1)
    dense = keep.numel() == r * s  # no padding (e.g. decode only): skip the gathers
    x = router.embed(ids)
    tokens: dict[int, int] = {}
    for layer in range(router.cfg.num_layers):
        x = router.attention(layer, x, positions, cache)
        flat = x.view(r * s, -1)
        h = router.post_norm(layer, flat if dense else flat.index_select(0, keep))
        out = yield from mlp_block(router, layer, h, fanout, on_route, tokens)
        if dense:
            flat += out.to(flat.dtype)  # x is attention's fresh output: update it in place
        else:
            flat.index_add_(0, keep, out.to(flat.dtype))
    return router.head(x.view(r * s, -1).index_select(0, select)), tokens


class ExpertSlice:
    """Routed expert *i* of every MoE layer (an expert server holds one per expert)."""

    def __init__(self, cfg: ModelConfig, expert: int,
                 weights: Mapping[str, torch.Tensor]) -> None:
        self.expert = expert
        self.layers = {
            layer: tuple(weights[f"{layer_prefix(layer)}.mlp.experts.{expert}.{m}.weight"]
                         for m in ("gate_proj", "up_proj", "down_proj"))
            for layer in cfg.moe_layers}

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.layers[layer]
        return L.swiglu(x, gate, up, down)


class Model:
    """The whole model in one process: the reference the disaggregated forms must equal."""

    def __init__(self, router: RouterTier, experts: list[ExpertSlice]) -> None:
        self.router = router
        self.experts = experts

    @property
    def cfg(self) -> ModelConfig:
        return self.router.cfg

    def local_fanout(self, layer: int, sends: Mapping[int, torch.Tensor],
                     ) -> dict[int, torch.Tensor]:
        return {e: self.experts[e](layer, h) for e, h in sends.items()}

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        logits, _ = forward(self.router, ids, self.local_fanout)
        return logits
