"""The engine's KV cache: a paged pool of fixed capacity, reserved per sequence at admission,
with automatic prefix caching.

Layout: per layer, one token-major tensor ``[blocks * block_size, heads, dim]`` for keys and
one for values (MLA: its compressed latent and its rotary key, one "head" each). A sequence
lists its blocks in its block table. One engine step is a :class:`StepCache` (the
``KVCache`` the model code calls): it computes the step's slot indices once, and each layer
then costs one ``index_copy_`` (the new tokens) and one ``index_select`` (what the rows
attend to) per tensor.

Why paged rather than per-sequence buffers sized at admission: capacity is one number for the
whole engine, and fixed-size blocks let any mix of lengths use it without fragmentation (a
contiguous arena would need compaction), while the read stays a single gather for the whole
batch instead of one copy per sequence into a padded batch. Its cost is rows x the longest
context per layer, which the scheduler weighs when it lays tokens out in rows.

Prefix caching (vLLM's automatic prefix caching): once a block is completely written, it is
keyed by a chain hash of its tokens and every token before them. A new sequence whose prompt
starts with keyed blocks shares them (a reference count) and computes only the rest; it never
writes into them, since it starts past them. A block no sequence holds keeps its key and
stays reusable until its room is needed: allocation takes never-keyed free blocks first, then
evicts the least recently released keyed block. Only blocks at reference count 0 are evicted,
so nothing in flight is.

Admission reserves prompt + max_tokens up front (rounded up to blocks; shared blocks counted
once), so a running sequence never runs out; finishing or aborting returns the blocks at once
(keyed ones to the cache, reclaimable by anyone).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from autoglm.models.config import ModelConfig

# per layer: (key heads, key dim), (value heads, value dim)
LayerShape = tuple[tuple[int, int], tuple[int, int]]
BlockKey = bytes  # a name: KVPool.bytes shadows the builtin in its class body


def kv_shapes(cfg: ModelConfig) -> list[LayerShape]:
    """What each layer stores per token: GQA keys/values, or MLA's latent and rotary key."""
    if cfg.mla is not None:
        shape: LayerShape = ((1, cfg.mla.kv_lora_rank), (1, cfg.mla.qk_rope_head_dim))
    else:
        shape = ((cfg.num_kv_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim))
    return [shape] * cfg.num_layers


def block_key(parent: BlockKey, tokens: Sequence[int]) -> BlockKey:
    """A full block's key: its tokens and, through ``parent`` (the previous block's key, b""
    for the first), every token before them. SHA-256 rather than ``hash()``: a collision would
    hand one prompt another's keys and values, and ``hash()`` of ints is easy to collide."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


@dataclass(frozen=True)
class Row:
    """One row of a step's batch: tokens [start, start + count) of sequence ``seq``. A long
    chunk may span several rows of the same sequence; each row sees the whole sequence."""

    seq: int
    start: int
    count: int


class KVPool:
    """Fixed-capacity paged key/value memory shared by every sequence of one engine.

    Every block is in exactly one state: free (never keyed, or evicted), cached (keyed, held
    by no sequence: reusable, reclaimable) or held (by one or more sequences)."""

    def __init__(self, shapes: Sequence[LayerShape], capacity_tokens: int, *,
                 block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", prefix_caching: bool = True) -> None:
        if block_size < 1 or capacity_tokens < block_size:
            raise ValueError(f"KV capacity {capacity_tokens} tokens is less than one block "
                             f"({block_size} tokens)")
        self.block_size = block_size
        self.num_blocks = capacity_tokens // block_size
        self.device = torch.device(device)
        self.prefix_caching = prefix_caching
        slots = self.num_blocks * block_size
        self._k = [torch.zeros(slots, *k, dtype=dtype, device=self.device) for k, _ in shapes]
        self._v = [torch.zeros(slots, *v, dtype=dtype, device=self.device) for _, v in shapes]
        self._free = list(range(self.num_blocks - 1, -1, -1))  # a stack: low blocks first
        self._refs = [0] * self.num_blocks      # sequences holding each block
        self._key: dict[int, BlockKey] = {}        # block -> its key, while cached or held
        self._by_key: dict[BlockKey, int] = {}     # key -> block
        self._idle: dict[int, None] = {}        # cached blocks at 0 refs, least recent first
        self._blocks: dict[int, list[int]] = {}
        self._length: dict[int, int] = {}
        self._keys: dict[int, list[BlockKey]] = {}  # keys of each sequence's full blocks

    @classmethod
    def for_model(cls, cfg: ModelConfig, capacity_tokens: int, *, block_size: int = 16,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  prefix_caching: bool = True) -> KVPool:
        return cls(kv_shapes(cfg), capacity_tokens, block_size=block_size, dtype=dtype,
                   device=device, prefix_caching=prefix_caching)

    @property
    def capacity(self) -> int:
        """Tokens the pool holds in all."""
        return self.num_blocks * self.block_size

    @property
    def used_tokens(self) -> int:
        """Tokens reserved by admitted sequences (whole blocks, a shared one once):
        unavailable to others."""
        return (self.num_blocks - len(self._free) - len(self._idle)) * self.block_size

    @property
    def cached_tokens(self) -> int:
        """Tokens in cached blocks no sequence holds: reusable by a prompt that starts with
        them, and reclaimable by any admission (so not counted as used)."""
        return len(self._idle) * self.block_size

    @property
    def stored_tokens(self) -> int:
        """Tokens in the sequences' contexts so far (a shared block once per sequence)."""
        return sum(self._length.values())

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v))

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits(self, tokens: int) -> bool:
        """Whether ``tokens`` can be reserved now (sharing no cached block)."""
        return self.blocks_for(tokens) <= len(self._free) + len(self._idle)

    def reserve(self, seq: int, tokens: int, prompt: Sequence[int] = ()) -> bool:
        """Reserve room for ``tokens`` tokens of ``seq``, sharing the cached blocks that
        ``prompt`` starts with (:meth:`length` then says how many tokens they hold: the
        sequence continues from there); False (nothing taken) if it does not fit now."""
        if seq in self._blocks:
            raise ValueError(f"sequence {seq} already holds KV blocks")
        hit, keys = self._match(prompt)
        need = self.blocks_for(tokens) - len(hit)
        # a cached block it shares is no longer room for its other blocks
        if need > len(self._free) + len(self._idle) - sum(b in self._idle for b in hit):
            return False
        for b in hit:
            self._idle.pop(b, None)
            self._refs[b] += 1
        blocks = hit + [self._take() for _ in range(need)]
        self._blocks[seq] = blocks
        self._length[seq] = len(hit) * self.block_size
        self._keys[seq] = keys
        return True

    def cached_prefix(self, prompt: Sequence[int]) -> int:
        """How many of ``prompt``'s tokens :meth:`reserve` would find in the cache now."""
        return len(self._match(prompt)[0]) * self.block_size

    def _match(self, prompt: Sequence[int]) -> tuple[list[int], list[BlockKey]]:
        """The cached blocks ``prompt`` starts with, and their keys. Never its last token:
        the sequence must compute it to get the logits of its first new token."""
        if not self.prefix_caching:
            return [], []
        bs = self.block_size
        blocks: list[int] = []
        keys: list[BlockKey] = []
        for i in range((len(prompt) - 1) // bs):
            key = block_key(keys[-1] if keys else b"", prompt[i * bs:(i + 1) * bs])
            block = self._by_key.get(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
        return blocks, keys

    def _take(self) -> int:
        """A block for a new owner: a free one, else the least recently used cached one."""
        if self._free:
            block = self._free.pop()
        else:
            block = next(iter(self._idle))
            del self._idle[block]
            del self._by_key[self._key.pop(block)]
        self._refs[block] = 1
        return block

    def commit(self, seq: int, tokens: Sequence[int]) -> None:
        """``seq``'s keys and values are written up to its length (a step succeeded);
        ``tokens`` are its tokens. Key the blocks that became full, so later prompts can
        share them. A block already cached under the same key (a twin computed alongside)
        stays the sequence's own."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        keys, blocks = self._keys[seq], self._blocks[seq]
        for i in range(len(keys), self._length[seq] // bs):
            key = block_key(keys[-1] if keys else b"", tokens[i * bs:(i + 1) * bs])
            keys.append(key)
            if key not in self._by_key:
                self._by_key[key] = blocks[i]
                self._key[blocks[i]] = key

    def release(self, seq: int) -> None:
        """Drop ``seq``'s hold on its blocks (no-op for a sequence holding none): those no one
        else holds become free, or cached if keyed. Its last blocks are released first, so
        they are evicted before the prefix they extend (useless without it)."""
        blocks = self._blocks.pop(seq, None)
        self._length.pop(seq, None)
        self._keys.pop(seq, None)
        for b in reversed(blocks or ()):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key:
                    self._idle[b] = None
                else:
                    self._free.append(b)

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
