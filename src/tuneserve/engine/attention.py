"""Attention over the engine's KV cache for a packed batch, plugged into HF's modeling code.

One forward carries every scheduled token of every row as a single sequence `[1, N]`: prefill
chunks and decode tokens together, each token tagged with its cache row (from its sequence's
block table, kv_cache.py) and its position. The layers compute q/k/v and RoPE (HF's from the
`position_ids` we pass, or lean_forward.py's); `attend` (token-major; `packed_attention`, the
function registered with `transformers.AttentionInterface`, transposes HF's layout into it) then

1. writes the new keys/values into the cache rows of their tokens,
2. attends the decode rows (one token each, packed first): through our CPU kernel
   (cpu_kernels.py) where the step has it, reading every row's keys where they lie; else in one
   batched SDPA over their keys gathered from the cache block by block `[Bd, KVH, L, D]` (L = the
   longest rounded up to a block; shorter rows pad with the zero block, masked), a lone decode
   row whose blocks are consecutive reading its keys in place instead (`decode_span`),
3. attends each prefill chunk with its own SDPA: a first chunk over its own fresh keys, a later
   one over its prefix gathered from the cache; causal.

Masking is ours (HF hands us `attention_mask=None`): causal within a row, no attention across
rows, and `sliding_window` (passed by Mistral/Qwen2/Phi3 layers) honoured: a query at position p
sees keys at positions j with p - W < j <= p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tuneserve.engine.cpu_kernels import CpuKernels
from tuneserve.engine.kv_cache import KVCache
from tuneserve.errors import EngineError

ATTENTION_NAME = "tuneserve_packed"
STEP_KWARG = "tuneserve_step"  # the model(...) keyword that carries the PackedStep to each layer


@dataclass(frozen=True, slots=True)
class RowChunk:
    """One row's share of a step: `num_tokens` tokens at positions start..start+num_tokens-1
    of the sequence whose block table is `blocks` (holding at least start+num_tokens tokens)."""

    blocks: Sequence[int]
    start: int
    num_tokens: int


@dataclass(slots=True)
class _Prefill:
    begin: int  # first token index in the packed batch
    end: int
    start: int  # position of the first token
    blocks: torch.Tensor | None  # [1, nb] the blocks of its prefix (None when start == 0)


@dataclass(slots=True)
class PackedStep:
    """Index tensors for one forward, built once per step and read by every layer."""

    cache: KVCache
    write_rows: torch.Tensor  # [N] long: the cache row of each packed token
    positions: torch.Tensor  # [N] long: position of each packed token in its sequence
    num_tokens: int
    num_decodes: int  # Bd: the first Bd packed tokens are decode rows, one token each
    decode_blocks: torch.Tensor | None  # [Bd, nb] long: blocks each decode query reads
    decode_lengths: torch.Tensor | None  # [Bd] long: keys each decode query may see
    decode_uniform: bool  # every decode row has the same length
    prefills: list[_Prefill]
    # one decode row whose blocks are consecutive: its keys are the cache rows
    # [start, end) in order, read in place (no gather, no mask)
    decode_span: tuple[int, int] | None = None
    # our decode attention kernel: decode_blocks and decode_lengths then stay on the host
    kernels: CpuKernels | None = None
    _masks: dict[Any, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        cache: KVCache,
        rows: list[RowChunk],
        device: torch.device | str,
        kernels: CpuKernels | None = None,
    ) -> PackedStep:
        """Pack `rows` in order; one-token rows (decodes) must all come first. With `kernels`
        (for a float32 CPU cache) the decode rows go through its attention where it computes
        for the cache's head size."""
        bs = cache.block_size
        num_decodes = 0
        for row in rows:
            if row.num_tokens > 1:
                break
            num_decodes += 1
        if any(row.num_tokens == 1 for row in rows[num_decodes:]):
            raise ValueError("decode rows (one token) must come before prefill chunks")
        # index arithmetic on the host, then one copy each to the device (no device syncs)
        widest = max(len(row.blocks) for row in rows)
        # [R, widest] block tables, padded with the zero block
        tables = torch.tensor([[*row.blocks, *[0] * (widest - len(row.blocks))] for row in rows])
        positions = torch.cat([torch.arange(r.start, r.start + r.num_tokens) for r in rows])
        row_of_token = torch.repeat_interleave(
            torch.arange(len(rows)), torch.tensor([row.num_tokens for row in rows])
        )
        write_rows = tables[row_of_token, positions // bs] * bs + positions % bs

        def blocks_of(table: torch.Tensor, length: int) -> torch.Tensor:
            # past a row's end: the zero block, or rows the mask hides
            return table[..., : cache.blocks_for(length)].to(device)

        prefills: list[_Prefill] = []
        begin = num_decodes
        for index in range(num_decodes, len(rows)):
            row = rows[index]
            end_pos = row.start + row.num_tokens
            prefix = blocks_of(tables[index : index + 1], end_pos) if row.start > 0 else None
            prefills.append(_Prefill(begin, begin + row.num_tokens, row.start, prefix))
            begin += row.num_tokens
        step = cls(
            cache=cache,
            write_rows=write_rows.to(device),
            positions=positions.to(device),
            num_tokens=int(positions.shape[0]),
            num_decodes=num_decodes,
            decode_blocks=None,
            decode_lengths=None,
            decode_uniform=False,
            prefills=prefills,
        )
        if num_decodes:
            lengths = [row.start + 1 for row in rows[:num_decodes]]
            if kernels is not None and kernels.attends(cache.shape.head_dim):
                step.kernels = kernels
                step.decode_blocks = tables[:num_decodes, : cache.blocks_for(max(lengths))]
                step.decode_blocks = step.decode_blocks.contiguous()
                step.decode_lengths = torch.tensor(lengths, dtype=torch.long)
                return step
            first = list(rows[0].blocks[: cache.blocks_for(lengths[0])])
            if num_decodes == 1 and first == list(range(first[0], first[0] + len(first))):
                step.decode_span = (first[0] * bs, first[0] * bs + lengths[0])
                return step  # no gather tables: the keys are read in place
            step.decode_blocks = blocks_of(tables[:num_decodes], max(lengths))
            step.decode_lengths = torch.tensor(lengths, dtype=torch.long, device=device)
            span = step.decode_blocks.shape[1] * bs
            step.decode_uniform = min(lengths) == span  # every row fills every gathered key
        return step

    # -- masks (bool, True = may attend), cached per step ---------------------------------
    def decode_mask(self, window: int | None) -> torch.Tensor | None:
        """[Bd, 1, 1, L]: key j is visible to row b's query iff len-W <= j < len (None: all)."""
        assert self.decode_blocks is not None and self.decode_lengths is not None
        if window is None and self.decode_uniform:
            return None  # every row sees every key it gathered
        key = ("decode", window)
        if key not in self._masks:
            lengths = self.decode_lengths[:, None]
            span = self.decode_blocks.shape[1] * self.cache.block_size
            j = torch.arange(span, device=lengths.device)[None, :]
            mask = j < lengths
            if window is not None:
                mask &= j >= lengths - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor | None:
        """[T, start+T] for prefill chunk `index`; None when plain `is_causal` is exact."""
        chunk = self.prefills[index]
        length = chunk.end - chunk.begin
        if chunk.start == 0 and (window is None or window >= length):
            return None
        key = ("prefill", index, window)
        mask = self._masks.get(key)
        if mask is None:
            device = self.positions.device
            q_pos = torch.arange(chunk.start, chunk.start + length, device=device)[:, None]
            k_pos = torch.arange(chunk.start + length, device=device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            self._masks[key] = mask
        return mask


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """SDPA with grouped KV heads. q: [B,H,T,D], k/v: [B,KVH,L,D] -> [B,H,T,D]."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )


def _decode_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """One query token per row. q: [S,H,1,D], k/v: [S,KVH,L,D], mask [S,1,1,L] -> [S,H,D].

    The query heads sharing a KV head ride in the query-length dimension ([S,KVH,G,D]), so
    grouped-query attention reads the cache as it is, never expanded.
    """
    slots, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(slots, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
    return out.reshape(slots, heads, dim)


def attend(
    step: PackedStep,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """Attention of one layer over the cache, token-major: query [N,H,D], key/value [N,KVH,D]
    (RoPE applied) -> [N,H,D]. Writes the new keys/values into the cache first."""
    cache = step.cache
    cache.write(layer, key, value, step.write_rows)

    # Phase 1: decode rows (packed first), one batched SDPA over their keys
    decoded: torch.Tensor | None = None  # [Bd, H, D]
    if step.kernels is not None:
        assert step.decode_blocks is not None and step.decode_lengths is not None
        decoded = step.kernels.decode_attention(
            query[: step.num_decodes],
            cache.keys[layer],
            cache.values[layer],
            step.decode_blocks,
            step.decode_lengths,
            block_size=cache.block_size,
            window=sliding_window,
            scale=query.shape[-1] ** -0.5 if scaling is None else scaling,
        )
    elif step.decode_span is not None:  # one user: its keys in place, exactly its length
        start, end = step.decode_span
        if sliding_window is not None:
            start = max(start, end - sliding_window)
        k, v = cache.rows(layer, start, end)  # [1, KVH, L, D]
        decoded = _decode_sdpa(query[:1].unsqueeze(2), k, v, mask=None, scale=scaling)
    elif step.decode_blocks is not None:
        nd = step.num_decodes
        k, v = cache.gather(layer, step.decode_blocks)  # [Bd, KVH, nb * block_size, D]
        q = query[:nd].unsqueeze(2)  # [Bd, H, 1, D]
        decoded = _decode_sdpa(q, k, v, mask=step.decode_mask(sliding_window), scale=scaling)
    if not step.prefills and decoded is not None:
        return decoded  # a step of decodes only
    out = query.new_empty(query.shape)
    if decoded is not None:
        out[: step.num_decodes] = decoded

    # Phase 2: prefill chunks: a first chunk over its own keys, a later one over its prefix
    for i, chunk in enumerate(step.prefills):
        mask = step.prefill_mask(i, sliding_window)
        if chunk.blocks is None:
            k = key[chunk.begin : chunk.end].transpose(0, 1)[None]  # [1, KVH, T, D]
            v = value[chunk.begin : chunk.end].transpose(0, 1)[None]
        else:
            k, v = cache.gather(layer, chunk.blocks)  # [1, KVH, nb * block_size, D]
            end_pos = chunk.start + chunk.end - chunk.begin
            k, v = k[:, :, :end_pos], v[:, :, :end_pos]
        o = _sdpa(
            query[chunk.begin : chunk.end].transpose(0, 1)[None],  # [1, H, T, D]
            k,
            v,
            mask=mask,
            causal=mask is None,
            scale=scaling,
        )  # [1, H, T, D]
        out[chunk.begin : chunk.end] = o[0].transpose(0, 1)
    return out


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention. query: [1,H,N,D]; key/value: [1,KVH,N,D] -> ([1,N,H,D], None)."""
    step: PackedStep | None = kwargs.get(STEP_KWARG)
    if step is None:
        raise RuntimeError(
            f"attention {ATTENTION_NAME!r} needs the {STEP_KWARG}= keyword; this model is owned "
            "by a tuneserve engine and cannot be called directly"
        )
    out = attend(
        step,
        int(module.layer_idx),  # type: ignore[arg-type]
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        scaling=scaling,
        sliding_window=sliding_window,
    )
    return out[None], None


_registered = False


def check_supported(config: Any) -> None:
    """Refuse an architecture whose attention `packed_attention` does not compute: logit
    softcapping (Gemma 2) has no SDPA form."""
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        raise EngineError(
            f"{config.model_type} uses attention logit softcapping "
            f"(attn_logit_softcapping={softcap}), which the continuous engine does not compute; "
            "serve this model with --engine simple"
        )


def install_packed_attention(model: torch.nn.Module) -> None:
    """Register `packed_attention` once and switch `model` (all its sub-configs) to it."""
    check_supported(model.config)
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, packed_attention)
        _registered = True
    model.set_attn_implementation(ATTENTION_NAME)  # type: ignore[operator]
