"""Attention over the engine's KV cache for a packed batch, plugged into HF's modeling code.

One forward carries every scheduled token of every row as a single sequence `[1, N]`: prefill
chunks and decode tokens together, each token tagged with its row's cache slot and its position.
HF's layers compute q/k/v and RoPE (from the `position_ids` we pass); `packed_attention` (the
function registered with `transformers.AttentionInterface`) then

1. writes the new keys/values into the cache at (slot, position),
2. attends the decode rows (one token each) in one batched SDPA over the cache view `[:S]`
   (S = highest decode slot + 1; slots in between that do not decode get a dummy query),
3. attends each prefill chunk with its own SDPA over its slot's cache prefix, causal.

Masking is ours (HF hands us `attention_mask=None`): causal within a row, no attention across
rows, and `sliding_window` (passed by Mistral/Qwen2/Phi3 layers) honoured: a query at position p
sees keys at positions j with p - W < j <= p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tuneserve.engine.kv_cache import KVCache
from tuneserve.errors import EngineError

ATTENTION_NAME = "tuneserve_packed"
STEP_KWARG = "tuneserve_step"  # the model(...) keyword that carries the PackedStep to each layer


@dataclass(frozen=True, slots=True)
class RowChunk:
    """One row's share of a step: `num_tokens` tokens at positions start..start+num_tokens-1."""

    slot: int
    start: int
    num_tokens: int


@dataclass(slots=True)
class _Prefill:
    begin: int  # first token index in the packed batch
    end: int
    slot: int
    start: int  # position of the first token


@dataclass(slots=True)
class PackedStep:
    """Index tensors for one forward, built once per step and read by every layer."""

    cache: KVCache
    slots: torch.Tensor  # [N] long: cache slot of each packed token
    positions: torch.Tensor  # [N] long: position of each packed token in its sequence
    num_tokens: int
    # decode group (rows with exactly one token this step)
    decode_tokens: torch.Tensor | None  # [Bd] long: packed index of each decode token
    decode_slots: torch.Tensor | None  # [Bd] long: its slot
    decode_span: int  # S: the decode attention reads cache[:S]
    decode_contiguous: bool  # decode tokens are packed[0:S] in slot order 0..S-1
    decode_lengths: torch.Tensor | None  # [S] long: keys each slot's query may see (1 if idle)
    decode_max_len: int
    prefills: list[_Prefill]
    _masks: dict[Any, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, cache: KVCache, rows: list[RowChunk], device: torch.device | str) -> PackedStep:
        """Pack `rows` in the given order (put decode rows first, by slot, for the fast path)."""
        slots: list[int] = []
        positions: list[int] = []
        dec_tok: list[int] = []
        dec_slot: list[int] = []
        prefills: list[_Prefill] = []
        for row in rows:
            begin = len(slots)
            slots.extend([row.slot] * row.num_tokens)
            positions.extend(range(row.start, row.start + row.num_tokens))
            if row.num_tokens == 1:
                dec_tok.append(begin)
                dec_slot.append(row.slot)
            else:
                prefills.append(_Prefill(begin, len(slots), row.slot, row.start))
        n = len(slots)
        step = cls(
            cache=cache,
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            num_tokens=n,
            decode_tokens=None,
            decode_slots=None,
            decode_span=0,
            decode_contiguous=False,
            decode_lengths=None,
            decode_max_len=0,
            prefills=prefills,
        )
        if dec_tok:
            span = max(dec_slot) + 1
            lengths = [1] * span
            for tok, slot in zip(dec_tok, dec_slot, strict=True):
                lengths[slot] = positions[tok] + 1
            step.decode_span = span
            step.decode_contiguous = dec_slot == list(range(span)) and dec_tok == list(range(span))
            step.decode_tokens = torch.tensor(dec_tok, dtype=torch.long, device=device)
            step.decode_slots = torch.tensor(dec_slot, dtype=torch.long, device=device)
            step.decode_lengths = torch.tensor(lengths, dtype=torch.long, device=device)
            step.decode_max_len = max(lengths)
        return step

    # -- masks (bool, True = may attend), cached per step ---------------------------------
    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[S, 1, 1, L]: key j is visible to slot s's query iff len-W <= j < len."""
        key = ("decode", window)
        mask = self._masks.get(key)
        if mask is None:
            assert self.decode_lengths is not None
            lengths = self.decode_lengths[:, None]
            j = torch.arange(self.decode_max_len, device=lengths.device)[None, :]
            mask = j < lengths
            if window is not None:
                mask &= j >= lengths - window
            mask = mask[:, None, None, :]
            self._masks[key] = mask
        return mask

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor | None:
        """[T, start+T] for prefill chunk `index`; None when plain `is_causal` is exact."""
        chunk = self.prefills[index]
        length = chunk.end - chunk.begin
        if chunk.start == 0 and (window is None or window >= length):
            return None
        key = ("prefill", index, window)
        mask = self._masks.get(key)
        if mask is None:
            device = self.slots.device
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor, scale: float | None
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
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    cache = step.cache
    cache.write(layer, key, value, step.slots, step.positions)
    k_cache, v_cache = cache.keys[layer], cache.values[layer]
    num_heads, head_dim = query.shape[1], query.shape[3]
    out = query.new_empty(1, step.num_tokens, num_heads, head_dim)

    # Phase 1: decode rows, one batched SDPA over cache[:S]
    if step.decode_tokens is not None:
        span, length = step.decode_span, step.decode_max_len
        if step.decode_contiguous:
            q = query[0, :, :span].transpose(0, 1).unsqueeze(2)  # [S, H, 1, D]
        else:
            q = query.new_zeros(span, num_heads, 1, head_dim)
            q[step.decode_slots] = query[0, :, step.decode_tokens].transpose(0, 1).unsqueeze(2)
        o = _decode_sdpa(
            q,
            k_cache[:span, :, :length],
            v_cache[:span, :, :length],
            mask=step.decode_mask(sliding_window),
            scale=scaling,
        )  # [S, H, D]
        if step.decode_contiguous:
            out[0, :span] = o
        else:
            out[0, step.decode_tokens] = o[step.decode_slots]

    # Phase 2: prefill chunks, each over its own slot's prefix
    for i, chunk in enumerate(step.prefills):
        end_pos = chunk.start + chunk.end - chunk.begin
        mask = step.prefill_mask(i, sliding_window)
        o = _sdpa(
            query[:, :, chunk.begin : chunk.end],
            k_cache[chunk.slot : chunk.slot + 1, :, :end_pos],
            v_cache[chunk.slot : chunk.slot + 1, :, :end_pos],
            mask=mask,
            causal=mask is None,
            scale=scaling,
        )  # [1, H, T, D]
        out[0, chunk.begin : chunk.end] = o[0].transpose(0, 1)
    return out, None


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
