"""The engine's own KV cache: a pool of fixed-size blocks that sequences take as they grow.

Per layer, keys and values are one `[num_blocks * block_size, KVH, D]` tensor of token rows (a
token's heads side by side: a write or a read moves whole rows). A sequence holds a list of
block ids, its block table; token `p` of it lives at row `table[p // block_size] * block_size +
p % block_size`. Blocks are taken when a sequence's next tokens need one and given back when it
ends, so the memory in use follows the tokens in flight, not `max_num_seqs x max_model_len`:
many short sequences fit where one long one could.

The pool's size is the memory budget (`kv_cache_budget`): `--kv-cache-memory`, or on CUDA a
fraction of the device memory left after the weights (vLLM's `gpu_memory_utilization`). When it
is full the scheduler makes new requests wait or preempts the newest running one (it is
recomputed later), never an out-of-memory error mid-step.

The cache may hold keys and values in a narrower type than the model computes in (`dtype` vs
`compute`: bfloat16 for a float32 model serving bfloat16 weights on a CPU, half the bytes to read
each decode step): writes round to it, and the torch reads below widen back to `compute`.

Block 0 is never handed out and never written: it stays zeros, and gathers pad with it (masked
keys still enter SDPA's sums with weight 0, and 0 x garbage NaN would be NaN). On CPU the pool
comes from calloc'd memory, so pages no token was written to cost nothing; blocks are handed out
lowest-first so the touched pages stay few.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tuneserve.errors import EngineError

BLOCK_SIZE = 16  # tokens per block (vLLM's default)
CPU_DEFAULT_BUDGET = 4 * 2**30  # vLLM's CPU default KV space; calloc'd, so unused pages are free
GPU_MEMORY_UTILIZATION = 0.9  # of the whole device, weights and everything else included


@dataclass(frozen=True, slots=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int  # including the reserved zero block
    block_size: int = BLOCK_SIZE

    @classmethod
    def from_config(
        cls, config: object, *, num_blocks: int, block_size: int = BLOCK_SIZE
    ) -> KVCacheShape:
        """Read layer/head sizes off a transformers config (text config for multimodal ones)."""
        get_text_config = getattr(config, "get_text_config", None)
        text: Any = get_text_config() if callable(get_text_config) else config
        heads = int(text.num_attention_heads)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
        return cls(
            num_layers=int(text.num_hidden_layers),
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            num_blocks=num_blocks,
            block_size=block_size,
        )

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.block_size * itemsize

    @property
    def num_tokens(self) -> int:
        """Tokens the usable blocks hold (the zero block excluded)."""
        return (self.num_blocks - 1) * self.block_size


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def kv_cache_budget(
    shape: KVCacheShape,
    dtype: torch.dtype,
    device: torch.device,
    *,
    max_num_seqs: int,
    max_model_len: int,
    memory: int | None = None,
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
) -> KVCacheShape:
    """`shape` with its number of blocks set from the memory budget.

    The budget is `memory` bytes when given; else on CUDA `gpu_memory_utilization` of the
    device's memory minus what is already used (the weights), else `CPU_DEFAULT_BUDGET`. It is
    never more than `max_num_seqs` full-length sequences need. Raises EngineError, naming the
    flags, when one sequence of `max_model_len` tokens does not fit.
    """
    per_block = shape.bytes_per_block(dtype)
    blocks_per_seq = math.ceil(max_model_len / shape.block_size)
    if memory is not None:
        budget, source = memory, f"--kv-cache-memory {format_bytes(memory)}"
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(gpu_memory_utilization * total) - (total - free)
        source = (
            f"--gpu-memory-utilization {gpu_memory_utilization} of "
            f"{format_bytes(total)} with {format_bytes(total - free)} in use"
        )
    else:
        budget = CPU_DEFAULT_BUDGET
        source = f"the default --kv-cache-memory of {format_bytes(budget)}"
    usable = max(0, budget // per_block)
    if usable < blocks_per_seq:
        raise EngineError(
            f"the KV cache budget ({source}) holds {usable * shape.block_size} tokens, but one "
            f"sequence of max_model_len={max_model_len} tokens needs "
            f"{format_bytes(blocks_per_seq * per_block)}: raise --kv-cache-memory "
            "(or --gpu-memory-utilization on CUDA) or lower --max-model-len"
        )
    usable = min(usable, max_num_seqs * blocks_per_seq)
    return KVCacheShape(
        shape.num_layers, shape.num_kv_heads, shape.head_dim, usable + 1, shape.block_size
    )


def _zeros(dims: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros; on CPU from calloc'd memory, so pages cost nothing until a token is written there.

    (`torch.zeros` writes every byte: the whole budget would be resident at once.)
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(dims, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.from_numpy(np.zeros(math.prod(dims) * itemsize, dtype=np.uint8))
    return raw.view(dtype).view(dims)


class KVCache:
    """Keys and values in blocks; `allocate`/`free` hand blocks to sequences."""

    def __init__(
        self,
        shape: KVCacheShape,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        compute: torch.dtype | None = None,
    ) -> None:
        if shape.num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks, got {shape.num_blocks}")
        self.shape = shape
        self.dtype = dtype
        self.compute = compute or dtype  # what `gather` and `rows` return
        self.block_size = shape.block_size
        dims = (shape.num_blocks * shape.block_size, shape.num_kv_heads, shape.head_dim)
        # keys[layer], values[layer]: [num_blocks * block_size, KVH, D]
        self.keys = [_zeros(dims, dtype, device) for _ in range(shape.num_layers)]
        self.values = [_zeros(dims, dtype, device) for _ in range(shape.num_layers)]
        self._free: list[int] = list(range(1, shape.num_blocks))  # a min-heap; 0 is reserved
        heapq.heapify(self._free)

    # -- blocks ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Blocks a sequence can hold (the zero block excluded)."""
        return self.shape.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """`n` free blocks, lowest first, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [heapq.heappop(self._free) for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            heapq.heappush(self._free, block)

    # -- data ------------------------------------------------------------------------------
    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor) -> None:
        """Store new keys/values. key, value: [N, KVH, D]; rows: [N] long, cache rows."""
        k, v = self.keys[layer], self.values[layer]
        k.index_copy_(0, rows, key.to(k.dtype))
        v.index_copy_(0, rows, value.to(v.dtype))

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of block tables `blocks` ([B, nb] long) as [B, KVH, nb*bs, D] views.

        Whole blocks are copied (16 token rows at a time): 16x fewer indices than gathering
        token rows."""
        b, nb = blocks.shape
        flat = blocks.reshape(-1)
        out = []
        for pool in (self.keys[layer], self.values[layer]):
            by_block = pool.view(-1, self.block_size, *pool.shape[1:])  # [blocks, bs, KVH, D]
            picked = by_block.index_select(0, flat).view(b, nb * self.block_size, *pool.shape[1:])
            out.append(picked.to(self.compute).transpose(1, 2))
        return out[0], out[1]

    def rows(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of cache rows start..end-1 as [1, KVH, end-start, D] views (no
        copy, unless widened to `compute`): a sequence whose blocks are consecutive lies there
        in order."""
        return (
            self.keys[layer][start:end].to(self.compute).transpose(0, 1)[None],
            self.values[layer][start:end].to(self.compute).transpose(0, 1)[None],
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
