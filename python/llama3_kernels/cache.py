"""KVCache: the keys and values a stack of blocks keeps while it generates.

    cache = KVCache(n_layers, batch, n_kv_heads, head_dim, capacity, dtype=..., device=...)
    cache.reset(padding)                 # left padding of each prompt (None: none)
    cache.advance(prompt.shape[1])       # then every block's decode over the prompt (prefill)
    for i, blk in enumerate(blocks): x = blk.decode(x, cos, sin, cache, i)
    cache.advance(1)                     # and one token at a time from there on

Each layer's k and v are (batch, n_kv_heads, capacity, head_dim).  One ``cache_range`` (int32
(batch, 2), [start, end) of the slots each sequence holds) and one ``positions`` (int32 (batch,),
the RoPE position of each sequence's first new token) serve every layer; ``advance`` moves them
on in place, on the device, so that the buffers the C calls see keep their addresses from step
to step and the library's graph replay turns each later decode step into one graph launch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class CacheSlots(NamedTuple):
    """One layer's view of a cache, as the C ABI's ``l3k_kv_cache`` holds it: k and v (batch,
    n_kv_heads, capacity, head_dim), written in place; cache_range int32 (batch, 2), [start, end)
    of each sequence's slots once this step's tokens are in (they take end - seq .. end - 1);
    positions int32 (batch,), the RoPE table row of each sequence's first new token, or None
    (new token i reads row i)."""

    k: torch.Tensor
    v: torch.Tensor
    cache_range: torch.Tensor
    positions: torch.Tensor | None = None


class KVCache:
    """Keys and values of `n_layers` blocks for `batch` sequences of up to `capacity` tokens."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.capacity = capacity
        self.cache_range = torch.zeros(batch, 2, dtype=torch.int32, device=device)
        self.positions = torch.zeros(batch, dtype=torch.int32, device=device)
        self.length = 0  # slots taken so far (host-side count, the same for every sequence)

    def layer(self, i: int) -> CacheSlots:
        """Layer i's k and v with the shared range and positions."""
        return CacheSlots(self.k[i], self.v[i], self.cache_range, self.positions)

    def reset(self, padding: torch.Tensor | None = None) -> KVCache:
        """Empty the cache; `padding` (batch,) counts each prompt's left padding tokens, which take
        slots but are never attended (their positions come before the sequence's first token)."""
        self.cache_range.zero_()
        if padding is not None:
            self.cache_range[:, 0].copy_(padding)
        self.length = 0
        return self

    def advance(self, n: int) -> KVCache:
        """Make room for `n` new tokens of every sequence: call once per step, before the first
        layer's decode."""
        if self.length + n > self.capacity:
            raise ValueError(
                f"KVCache: {self.length} + {n} tokens do not fit the capacity of {self.capacity}; make a larger cache"
            )
        self.length += n
        self.cache_range[:, 1] += n
        # The RoPE position of the first new token: its slot minus the sequence's start.
        torch.sub(self.cache_range[:, 1], self.cache_range[:, 0], out=self.positions)
        self.positions -= n
        return self
