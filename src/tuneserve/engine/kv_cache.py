"""The engine's own KV cache: preallocated keys and values, one slot per running sequence.

Per layer, keys and values are `[num_slots, num_kv_heads, max_len, head_dim]` tensors allocated
once (on CPU from calloc'd memory: pages no token was written to cost nothing). A sequence owns one
slot from admission to its end; token `p` of the sequence in slot `s` lives at `[s, :, p]`.
The memory budget is therefore `num_slots x max_len` tokens; when every slot is taken, new
requests wait in the scheduler (never an out-of-memory error mid-step).

Slots are handed out lowest-first so running sequences stay packed at the front: the decode
attention reads the cache through one view `[:S]` instead of gathering rows.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class KVCacheShape:
    num_layers: int
    num_slots: int
    num_kv_heads: int
    head_dim: int
    max_len: int

    @classmethod
    def from_config(cls, config: object, *, num_slots: int, max_len: int) -> KVCacheShape:
        """Read layer/head sizes off a transformers config (text config for multimodal ones)."""
        get_text_config = getattr(config, "get_text_config", None)
        text: Any = get_text_config() if callable(get_text_config) else config
        heads = int(text.num_attention_heads)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
        return cls(
            num_layers=int(text.num_hidden_layers),
            num_slots=num_slots,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            max_len=max_len,
        )


def _zeros(dims: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros; on CPU from calloc'd memory, so pages cost nothing until a token is written there.

    (`torch.zeros` writes every byte: a 32 x 2048-token cache would be resident at once.)
    Zeros, not `empty`: masked-out keys/values still enter SDPA's sums with weight 0, and
    0 * garbage NaN would be NaN.
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(dims, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for d in dims:
        count *= d
    raw = torch.from_numpy(np.zeros(count * itemsize, dtype=np.uint8))
    return raw.view(dtype).view(dims)


class KVCache:
    """Keys and values of up to `num_slots` sequences of up to `max_len` tokens each."""

    def __init__(
        self, shape: KVCacheShape, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.shape = shape
        dims = (shape.num_slots, shape.num_kv_heads, shape.max_len, shape.head_dim)
        # keys[layer], values[layer]: [num_slots, KVH, max_len, D]
        self.keys = [_zeros(dims, dtype, device) for _ in range(shape.num_layers)]
        self.values = [_zeros(dims, dtype, device) for _ in range(shape.num_layers)]
        self._free: list[int] = list(range(shape.num_slots))  # a min-heap
        heapq.heapify(self._free)

    # -- slots -----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """The lowest free slot, or None when every slot is taken."""
        return heapq.heappop(self._free) if self._free else None

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    # -- data ------------------------------------------------------------------------------
    def write(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Store new keys/values. key, value: [1, KVH, N, D]; slots, positions: [N] (long)."""
        # keys[layer][slots, :, positions] is [N, KVH, D]
        self.keys[layer][slots, :, positions] = key[0].transpose(0, 1).to(self.keys[layer].dtype)
        self.values[layer][slots, :, positions] = (
            value[0].transpose(0, 1).to(self.values[layer].dtype)
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
