"""Pick the next token for every row of a batch, each row with its own parameters.

Engine-independent: an engine keeps one `SamplingState` per request and calls
`sample(logits, states, eos_token_ids)` once per step. The order of the processors is
Hugging Face `generate`'s: repetition penalty, min_tokens (EOS masked), then temperature,
top-k, top-p. Temperature 0 is greedy (argmax of the penalised logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tuneserve.engine.types import SamplingParams


@dataclass(slots=True)
class SamplingState:
    """One request's sampling state: its parameters, its own RNG, the tokens seen so far."""

    params: SamplingParams
    generator: torch.Generator
    # prompt + generated: HF's repetition penalty sees both
    token_ids: list[int] = field(default_factory=list)
    num_generated: int = 0

    @classmethod
    def create(
        cls, params: SamplingParams, prompt_ids: Sequence[int], device: str | torch.device = "cpu"
    ) -> SamplingState:
        generator = torch.Generator(device=device)
        if params.seed is None:
            generator.seed()  # a fresh nondeterministic seed
        else:
            generator.manual_seed(params.seed)
        return cls(params=params, generator=generator, token_ids=list(prompt_ids))

    def record(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.num_generated += 1


def apply_repetition_penalty(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """HF semantics: a seen token's logit is divided by the penalty if > 0, else multiplied."""
    # logits: [B, V]
    penalties = [s.params.repetition_penalty for s in states]
    if all(p == 1.0 for p in penalties):
        return logits
    width = max(len(s.token_ids) for s in states)
    # Pad each row with its own first token: a repeated index scatters the same value back.
    ids = torch.tensor(
        [s.token_ids + s.token_ids[:1] * (width - len(s.token_ids)) for s in states],
        device=logits.device,
    )  # [B, L]
    penalty = torch.tensor(penalties, device=logits.device, dtype=logits.dtype)[:, None]  # [B, 1]
    seen = logits.gather(1, ids)  # [B, L]
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, ids, seen)


def mask_eos(
    logits: torch.Tensor, states: Sequence[SamplingState], eos_token_ids: Sequence[int]
) -> torch.Tensor:
    """EOS cannot be drawn until a row has generated its min_tokens."""
    # logits: [B, V]
    if not eos_token_ids:
        return logits
    blocked = [s.num_generated < s.params.min_tokens for s in states]
    if not any(blocked):
        return logits
    rows = torch.tensor(blocked, device=logits.device)[:, None]  # [B, 1]
    eos = torch.tensor(list(eos_token_ids), device=logits.device)  # [E]
    logits = logits.clone()
    logits[:, eos] = logits[:, eos].masked_fill(rows, float("-inf"))
    return logits


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (ties with the k-th kept); k == 0 keeps all."""
    # logits: [B, V], top_k: [B] int
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)  # [B]
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (HF's rule)."""
    # logits: [B, V], top_p: [B] float
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    remove = cumulative <= (1 - top_p)[:, None]
    remove[:, -1] = False  # the most likely token always stays
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row from `probs`, each row from its own generator."""
    # probs: [B, V] -> [B]
    # argmax(p / Exp(1)) is an exact draw from p and needs no device sync (gpt-fast).
    noise = torch.stack(
        [torch.empty_like(probs[0]).exponential_(generator=g) for g in generators]
    )  # [B, V]
    return (probs / noise).argmax(dim=-1)


def sample(
    logits: torch.Tensor, states: Sequence[SamplingState], eos_token_ids: Sequence[int] = ()
) -> torch.Tensor:
    """The next token of every row."""
    # logits: [B, V] -> tokens: [B] long
    logits = logits.float()
    logits = apply_repetition_penalty(logits, states)
    logits = mask_eos(logits, states, eos_token_ids)
    greedy = logits.argmax(dim=-1)  # [B]
    sampled_rows = [i for i, s in enumerate(states) if s.params.temperature > 0]
    if not sampled_rows:
        return greedy

    rows = torch.tensor(sampled_rows, device=logits.device)
    picked = [states[i].params for i in sampled_rows]
    temperature = torch.tensor([p.temperature for p in picked], device=logits.device)
    scaled = logits[rows] / temperature[:, None]  # [S, V]
    if any(p.top_k > 0 for p in picked):
        scaled = apply_top_k(scaled, torch.tensor([p.top_k for p in picked], device=logits.device))
    if any(p.top_p < 1.0 for p in picked):
        scaled = apply_top_p(scaled, torch.tensor([p.top_p for p in picked], device=logits.device))
    drawn = draw(scaled.softmax(dim=-1), [states[i].generator for i in sampled_rows])  # [S]
    return greedy.index_copy(0, rows, drawn)
