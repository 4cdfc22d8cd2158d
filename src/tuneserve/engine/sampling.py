"""Pick the next token for every row of a batch, each row with its own parameters.

Engine-independent: an engine keeps one `SamplingState` per request and calls
`sample(logits, states, eos_token_ids)` once per step. The order of the processors:
logit_bias, repetition penalty (Hugging Face's), frequency and presence penalties (OpenAI's,
over the generated tokens), min_tokens (EOS masked), the row's constraint (tokens its grammar
forbids masked), then temperature, top-k, top-p. Temperature 0 is greedy (argmax of the
processed logits).

Logprobs are those of the processed distribution: after biases, penalties, masks and
temperature, before top-k/top-p truncation (vLLM's "processed_logprobs"). Greedy rows use
temperature 1, so their logprobs are the model's own when no penalty is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from llguidance import LLMatcher

from tuneserve.engine.structured import GrammarCompiler, allowed_tokens
from tuneserve.engine.types import SamplingParams, TokenLogprob


@dataclass(slots=True)
class SamplingState:
    """One request's sampling state: its parameters, its own RNG, the tokens seen so far,
    and the matcher of its constraint."""

    params: SamplingParams
    generator: torch.Generator
    # prompt + generated: HF's repetition penalty sees both
    token_ids: list[int] = field(default_factory=list)
    num_generated: int = 0
    matcher: LLMatcher | None = None

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        device: str | torch.device = "cpu",
        grammars: GrammarCompiler | None = None,
    ) -> SamplingState:
        """Raises ConstraintError when the request's constraint cannot be compiled."""
        generator = torch.Generator(device=device)
        if params.seed is None:
            generator.seed()  # a fresh nondeterministic seed
        else:
            generator.manual_seed(params.seed)
        matcher = None
        if params.constraint is not None:
            if grammars is None:
                raise ValueError("a constrained request needs the engine's GrammarCompiler")
            matcher = grammars.matcher(params.constraint)
        return cls(params=params, generator=generator, token_ids=list(prompt_ids), matcher=matcher)

    def record(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.num_generated += 1
        if self.matcher is not None:
            self.matcher.consume_token(token_id)

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_generated :]

    @property
    def constraint_done(self) -> bool:
        """The constraint is complete: its grammar allows nothing more."""
        return self.matcher is not None and self.matcher.is_stopped()

    @property
    def constraint_error(self) -> str | None:
        if self.matcher is not None and self.matcher.is_error():
            return str(self.matcher.get_error())
        return None


@dataclass(frozen=True, slots=True)
class Sampled:
    """One step's choice per row, and its logprobs for the rows that asked (else None)."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None]


def apply_logit_bias(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """OpenAI's logit_bias: each listed token's logit moved by its bias."""
    # logits: [B, V]
    entries = [(i, t, b) for i, s in enumerate(states) for t, b in s.params.logit_bias]
    if not entries:
        return logits
    rows, tokens, biases = zip(*entries, strict=True)
    device = logits.device
    bias = torch.zeros_like(logits)
    bias[torch.tensor(rows, device=device), torch.tensor(tokens, device=device)] = torch.tensor(
        biases, device=device, dtype=logits.dtype
    )
    return logits + bias


def apply_frequency_presence(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """OpenAI's penalties over the generated tokens: frequency per occurrence, presence once."""
    # logits: [B, V]
    rows = [
        i
        for i, s in enumerate(states)
        if (s.params.frequency_penalty or s.params.presence_penalty) and s.num_generated
    ]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:
        params = states[i].params
        ids = torch.tensor(states[i].generated_ids, device=logits.device)
        counts = torch.bincount(ids, minlength=vocab)[:vocab].to(logits.dtype)  # [V]
        logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def apply_constraints(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Tokens a row's grammar forbids get -inf."""
    # logits: [B, V]
    rows = [i for i, s in enumerate(states) if s.matcher is not None]
    if not rows:
        return logits
    matchers = [m for m in (states[i].matcher for i in rows) if m is not None]
    allowed = allowed_tokens(matchers, logits.shape[-1]).to(logits.device)  # [R, V]
    index = torch.tensor(rows, device=logits.device)
    logits = logits.clone()
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


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
    """EOS cannot be drawn until a row has generated its min_tokens (a constrained row's
    grammar decides where it ends)."""
    # logits: [B, V]
    if not eos_token_ids:
        return logits
    blocked = [s.num_generated < s.params.min_tokens and s.matcher is None for s in states]
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
) -> Sampled:
    """The next token of every row, and the logprobs of the rows that asked for them."""
    # logits: [B, V]
    logits = logits.float()
    logits = apply_logit_bias(logits, states)
    logits = apply_repetition_penalty(logits, states)
    logits = apply_frequency_presence(logits, states)
    logits = mask_eos(logits, states, eos_token_ids)
    logits = apply_constraints(logits, states)
    device = logits.device
    temperature = torch.tensor(
        [s.params.temperature or 1.0 for s in states], device=device
    )  # [B]: greedy rows keep their logits
    tokens = logits.argmax(dim=-1)  # [B]
    sampled_rows = [i for i, s in enumerate(states) if s.params.temperature > 0]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=device)
        picked = [states[i].params for i in sampled_rows]
        scaled = logits[rows] / temperature[rows, None]  # [S, V]
        if any(p.top_k > 0 for p in picked):
            scaled = apply_top_k(scaled, torch.tensor([p.top_k for p in picked], device=device))
        if any(p.top_p < 1.0 for p in picked):
            scaled = apply_top_p(scaled, torch.tensor([p.top_p for p in picked], device=device))
        drawn = draw(scaled.softmax(dim=-1), [states[i].generator for i in sampled_rows])  # [S]
        tokens = tokens.index_copy(0, rows, drawn)
    chosen = tokens.tolist()
    return Sampled(chosen, logprobs_of(logits, temperature, chosen, states))


def logprobs_of(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    tokens: Sequence[int],
    states: Sequence[SamplingState],
) -> list[TokenLogprob | None]:
    """Each asking row's chosen-token logprob and its top alternatives; only those rows pay."""
    # logits: [B, V] processed, temperature: [B]
    asking = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(states)
    if not asking:
        return result
    index = torch.tensor(asking, device=logits.device)
    logprobs = (logits[index] / temperature[index, None]).log_softmax(dim=-1)  # [A, V]
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[index, None])[:, 0]
    most = max(states[i].params.logprobs or 0 for i in asking)
    top_values, top_ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0],) * 2
    chosen_list, values, ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    for row, i in enumerate(asking):
        k = states[i].params.logprobs or 0
        top = tuple(zip(ids[row][:k], values[row][:k], strict=True))
        result[i] = TokenLogprob(tokens[i], chosen_list[row], top)
    return result
