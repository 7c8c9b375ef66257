"""Sampling parameters and the sampler: greedy, temperature, top_k, top_p, per-request seed.

Each request owns a ``torch.Generator``; a sampled token consumes exactly one uniform draw of
its own generator (inverse-CDF sampling over the filtered distribution), so a seeded request
gets the same tokens whatever else shares its batch. Filters follow transformers' order:
temperature, then top_k, then top_p over the renormalized top-k distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from autoglm.engine.errors import SamplingError

_SEED_LIMIT = 1 << 64  # torch.Generator.manual_seed takes unsigned 64-bit seeds


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature`` 0 is greedy; ``top_k`` 0 and
    ``top_p`` 1 disable those filters; ``seed`` None draws a fresh random seed;
    ``max_tokens`` None runs to the end of the context window (the chat API's default)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def validate(self) -> None:
        """Raise :class:`SamplingError` naming the first parameter out of range."""
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool)
                                            or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise SamplingError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _real(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not _real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0: no limit), "
                                f"got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < _SEED_LIMIT):
            raise SamplingError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def generator_for(params: SamplingParams) -> torch.Generator:
    """The request's own random stream (CPU: the same draws whatever device the model uses)."""
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row of ``logits`` [R, V], row r drawn as ``params[r]`` asks with
    ``generators[r]`` (greedy rows draw nothing)."""
    out = logits.argmax(dim=-1).tolist()
    rows = [r for r, p in enumerate(params) if not p.greedy]
    if not rows:
        return [int(t) for t in out]
    dev = logits.device
    vocab = logits.shape[-1]
    idx = torch.tensor(rows, device=dev)
    temp = torch.tensor([params[r].temperature for r in rows], device=dev)
    lg = logits.index_select(0, idx).float() / temp[:, None]
    # stable: equal logits keep vocabulary order, so a draw maps to one token everywhere
    lg, order = lg.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=dev)
    top_k = torch.tensor([params[r].top_k or vocab for r in rows], device=dev)
    lg = lg.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = torch.softmax(lg, dim=-1)
    top_p = torch.tensor([params[r].top_p for r in rows], device=dev)
    # keep a token while the mass ranked above it is below top_p (the first always stays)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p[:, None]) & (top_p[:, None] < 1.0), 0.0)
    cdf = probs.cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=generators[r], dtype=torch.float64)
                     for r in rows]).to(device=dev, dtype=cdf.dtype)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    # probs are sorted, so the kept tokens are a prefix; rounding must not step past it
    pick = torch.minimum(pick, (probs > 0).sum(dim=-1, keepdim=True) - 1)
    chosen = order.gather(1, pick).squeeze(1).tolist()
    for r, t in zip(rows, chosen, strict=True):
        out[r] = t
    return [int(t) for t in out]
