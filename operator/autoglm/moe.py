"""The sparse Mixture-of-Experts model, in torch: the reference and its disaggregated parts.

Token ids → embedding → L MoE layers (pre-norm, residual; a top-k gate over N experts with
the selected logits renormalized by softmax; SwiGLU experts) → norm → output head.

The same weights serve two ways: :meth:`MoEModel.forward` in one process (the reference),
and split into a router (embedding, norms, gates, head) and N experts (expert *i* of every
layer) that the Triton models hold; :func:`moe_layer` is the one combine rule both use, with
the expert call injected, so their outputs agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int = 256
    d_model: int = 32
    d_ff: int = 64
    num_experts: int = 4
    top_k: int = 2
    layers: int = 2
    max_seq: int = 64

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


PRESETS = {
    "tiny": MoEConfig(),
    "bench": MoEConfig(vocab_size=1024, d_model=256, d_ff=1024, num_experts=8, top_k=2,
                       layers=4, max_seq=256),
}


class Expert(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))
        return out


class ExpertStack(nn.Module):
    """Expert *i* of every layer: what one ``expert_<i>`` Triton model holds."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Expert(cfg.d_model, cfg.d_ff) for _ in range(cfg.layers))

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers[layer](x)
        return out


class Router(nn.Module):
    """Everything but the experts: what the ``router`` Triton model holds."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq, cfg.d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.layers))
        self.gates = nn.ModuleList(nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
                                   for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[-1], device=ids.device)
        out: torch.Tensor = self.embed(ids) + self.pos(positions)
        return out

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.final_norm(h))
        return out


# expert index, layer, hidden [n, d] → expert output [n, d]
ExpertCall = Callable[[int, int, torch.Tensor], torch.Tensor]
# several calls of one layer at once: {expert: hidden} → {expert: output}
ExpertFanout = Callable[[int, Mapping[int, torch.Tensor]], Mapping[int, torch.Tensor]]


def route(router: Router, layer: int, x: torch.Tensor,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate one layer: (normed tokens [T, d], top-k expert ids [T, k], weights [T, k])."""
    h = router.norms[layer](x)
    logits = router.gates[layer](h)
    top, idx = torch.topk(logits, router.cfg.top_k, dim=-1)
    return h, idx, torch.softmax(top, dim=-1)


def moe_layer(router: Router, layer: int, x: torch.Tensor, fanout: ExpertFanout,
              ) -> tuple[torch.Tensor, dict[int, int]]:
    """x [T, d] → x + Σ_k w_k · expert_k(norm(x)); also the tokens sent to each expert.

    Each selected expert receives only its tokens, all experts of the layer at once."""
    h, idx, w = route(router, layer, x)
    sends: dict[int, torch.Tensor] = {}
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for e in torch.unique(idx).tolist():
        tok, slot = (idx == e).nonzero(as_tuple=True)
        rows[e] = (tok, slot)
        sends[e] = h[tok]
    outs = fanout(layer, sends)
    y = torch.zeros_like(x)
    for e, (tok, slot) in rows.items():
        y.index_add_(0, tok, outs[e] * w[tok, slot].unsqueeze(-1))
    return x + y, {e: int(t.shape[0]) for e, t in sends.items()}


def disaggregated_forward(router: Router, ids: torch.Tensor, fanout: ExpertFanout,
                          ) -> tuple[torch.Tensor, dict[int, int]]:
    """ids [B, S] → logits [B, S, V], with experts reached through ``fanout``."""
    b, s = ids.shape
    x = router.encode(ids).reshape(b * s, -1)
    tokens: dict[int, int] = {}
    for layer in range(router.cfg.layers):
        x, sent = moe_layer(router, layer, x, fanout)
        for e, n in sent.items():
            tokens[e] = tokens.get(e, 0) + n
    return router.decode(x).reshape(b, s, -1), tokens


class MoEModel(nn.Module):
    """The whole model in one process: the reference forward."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = nn.ModuleList(ExpertStack(cfg) for _ in range(cfg.num_experts))

    def local_fanout(self, layer: int, sends: Mapping[int, torch.Tensor],
                     ) -> dict[int, torch.Tensor]:
        return {e: self.experts[e](layer, h) for e, h in sends.items()}

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits, _ = disaggregated_forward(self.router, ids, self.local_fanout)
        return logits


def seed_for(name: str, version: int) -> int:
    digest = hashlib.sha256(f"{name}:{version}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def build_model(cfg: MoEConfig, name: str, version: int) -> MoEModel:
    """Deterministic weights for (name, version): the same bytes on every machine."""
    torch.manual_seed(seed_for(name, version))
    model = MoEModel(cfg)
    model.eval()
    return model
