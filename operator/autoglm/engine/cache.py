"""The engine's KV cache: a paged pool of fixed capacity, reserved per sequence at admission.

Layout: per layer, one token-major tensor ``[blocks * block_size, heads, dim]`` for keys and
one for values (MLA: its compressed latent and its rotary key, one "head" each). A sequence
owns whole blocks, listed in its block table. One engine step is a :class:`StepCache` (the
``KVCache`` the model code calls): it computes the step's slot indices once, and each layer
then costs one ``index_copy_`` (the new tokens) and one ``index_select`` (what the rows
attend to) per tensor.

Why paged rather than per-sequence buffers sized at admission: capacity is one number for the
whole engine, and fixed-size blocks let any mix of lengths use it without fragmentation (a
contiguous arena would need compaction), while the read stays a single gather for the whole
batch instead of one copy per sequence into a padded batch. Its cost is rows x the longest
context per layer, which the scheduler weighs when it lays tokens out in rows.

Admission reserves prompt + max_tokens up front (rounded up to blocks), so a running sequence
never runs out and nothing is ever evicted; finishing or aborting returns the blocks at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from autoglm.models.config import ModelConfig

# per layer: (key heads, key dim), (value heads, value dim)
LayerShape = tuple[tuple[int, int], tuple[int, int]]


def kv_shapes(cfg: ModelConfig) -> list[LayerShape]:
    """What each layer stores per token: GQA keys/values, or MLA's latent and rotary key."""
    if cfg.mla is not None:
        shape: LayerShape = ((1, cfg.mla.kv_lora_rank), (1, cfg.mla.qk_rope_head_dim))
    else:
        shape = ((cfg.num_kv_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim))
    return [shape] * cfg.num_layers


@dataclass(frozen=True)
class Row:
    """One row of a step's batch: tokens [start, start + count) of sequence ``seq``. A long
    chunk may span several rows of the same sequence; each row sees the whole sequence."""

    seq: int
    start: int
    count: int


class KVPool:
    """Fixed-capacity paged key/value memory shared by every sequence of one engine."""

    def __init__(self, shapes: Sequence[LayerShape], capacity_tokens: int, *,
                 block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if block_size < 1 or capacity_tokens < block_size:
            raise ValueError(f"KV capacity {capacity_tokens} tokens is less than one block "
                             f"({block_size} tokens)")
        self.block_size = block_size
        self.num_blocks = capacity_tokens // block_size
        self.device = torch.device(device)
        slots = self.num_blocks * block_size
        self._k = [torch.zeros(slots, *k, dtype=dtype, device=self.device) for k, _ in shapes]
        self._v = [torch.zeros(slots, *v, dtype=dtype, device=self.device) for _, v in shapes]
        self._free = list(range(self.num_blocks - 1, -1, -1))  # a stack: low blocks first
        self._blocks: dict[int, list[int]] = {}
        self._length: dict[int, int] = {}

    @classmethod
    def for_model(cls, cfg: ModelConfig, capacity_tokens: int, *, block_size: int = 16,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> KVPool:
        return cls(kv_shapes(cfg), capacity_tokens, block_size=block_size, dtype=dtype,
                   device=device)

    @property
    def capacity(self) -> int:
        """Tokens the pool holds in all."""
        return self.num_blocks * self.block_size

    @property
    def used_tokens(self) -> int:
        """Tokens reserved by admitted sequences (whole blocks): unavailable to others."""
        return (self.num_blocks - len(self._free)) * self.block_size

    @property
    def stored_tokens(self) -> int:
        """Tokens actually written so far."""
        return sum(self._length.values())

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v))

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits(self, tokens: int) -> bool:
        """Whether ``tokens`` can be reserved now."""
        return self.blocks_for(tokens) <= len(self._free)

    def reserve(self, seq: int, tokens: int) -> bool:
        """Reserve room for ``tokens`` tokens of ``seq``; False (nothing taken) if it does not
        fit now."""
        if seq in self._blocks:
            raise ValueError(f"sequence {seq} already holds KV blocks")
        n = self.blocks_for(tokens)
        if n > len(self._free):
            return False
        self._blocks[seq] = [self._free.pop() for _ in range(n)]
        self._length[seq] = 0
        return True

    def release(self, seq: int) -> None:
        """Return ``seq``'s blocks to the pool (no-op for a sequence holding none)."""
        blocks = self._blocks.pop(seq, None)
        self._length.pop(seq, None)
        if blocks:
            self._free.extend(reversed(blocks))

    def holds(self, seq: int) -> bool:
        return seq in self._blocks

    def length(self, seq: int) -> int:
        return self._length[seq]

    def step(self, rows: Sequence[Row], width: int) -> StepCache:
        """The cache for one forward over ``rows``, each padded to ``width`` tokens. Each
        sequence's rows must continue where it stopped, in order."""
        return StepCache(self, rows, width)

    def _advance(self, rows: Sequence[Row]) -> dict[int, int]:
        """Check that rows extend each sequence contiguously within its reservation; record
        the new lengths (the step is about to write them) and return them."""
        after: dict[int, int] = {}
        for row in rows:
            end = after.get(row.seq, self._length[row.seq])
            if row.start != end or row.count < 1:
                raise ValueError(f"sequence {row.seq}: row starts at {row.start}, "
                                 f"expected {end}")
            after[row.seq] = row.start + row.count
            if after[row.seq] > len(self._blocks[row.seq]) * self.block_size:
                raise ValueError(f"sequence {row.seq} exceeds its reservation")
        self._length.update(after)
        return after


class StepCache:
    """The :class:`~autoglm.models.layers.KVCache` of one step: stores the rows' valid
    tokens and returns, for every row, its whole sequence so far (masked past its length)."""

    def __init__(self, pool: KVPool, rows: Sequence[Row], width: int) -> None:
        if not rows or width < max(r.count for r in rows):
            raise ValueError("a step needs rows no wider than its width")
        self.pool = pool
        after = pool._advance(rows)
        bs = pool.block_size
        n_rows = len(rows)
        total = max(after[r.seq] for r in rows)  # longest context of the step
        n_blocks = pool.blocks_for(total)
        table = torch.tensor([(pool._blocks[r.seq] + [0] * n_blocks)[:n_blocks] for r in rows])
        start = torch.tensor([r.start for r in rows])
        count = torch.tensor([r.count for r in rows])
        j = torch.arange(width)
        valid = j < count[:, None]
        # padding repeats the row's last position: it then sees a key (a finite output)
        positions = start[:, None] + torch.minimum(j, count[:, None] - 1)
        slots = table.gather(1, positions // bs) * bs + positions % bs
        keep = valid.view(-1).nonzero().squeeze(1)
        t = torch.arange(total)
        length = torch.tensor([after[r.seq] for r in rows])
        dev = pool.device
        self.rows = list(rows)
        self.width = width
        self.valid = valid.to(dev)
        self.positions = positions.to(dev)
        self.keep = keep.to(dev)
        self._write = slots.view(-1).index_select(0, keep).to(dev)
        self._read = (table[:, t // bs] * bs + t % bs).view(-1).to(dev)
        self._read_positions = torch.where(t < length[:, None], t, -1).to(dev)
        self._shape = (n_rows, total)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_rows, total = self._shape
        out = []
        for new, pool in ((k, self.pool._k[layer]), (v, self.pool._v[layer])):
            heads, dim = pool.shape[1:]
            if new.shape != (n_rows, heads, self.width, dim):
                raise ValueError(f"layer {layer}: cache holds [{n_rows}, {heads}, "
                                 f"{self.width}, {dim}], got {list(new.shape)}")
            tokens = new.transpose(1, 2).reshape(-1, heads, dim).index_select(0, self.keep)
            pool.index_copy_(0, self._write, tokens.to(pool.dtype))
            out.append(pool.index_select(0, self._read).view(n_rows, total, heads, dim)
                       .transpose(1, 2))
        return out[0], out[1], self._read_positions
