"""Per-row sampling checked against Hugging Face's own logits processors."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tuneserve.engine.sampling import (
    SamplingState,
    apply_frequency_presence,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    sample,
)
from tuneserve.engine.types import Constraint, SamplingParams

VOCAB = 50


def state(prompt: list[int] | None = None, **params: Any) -> SamplingState:
    params.setdefault("max_tokens", 16)
    return SamplingState.create(SamplingParams(**params), prompt or [1, 2, 3])


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_hf_per_row() -> None:
    logits = random_logits(3)
    histories = [[1, 2, 2, 7], [4, 9, 9, 9, 30, 1], [5]]
    penalties = [1.3, 0.8, 1.0]
    states = [state(h, repetition_penalty=p) for h, p in zip(histories, penalties, strict=True)]
    ours = apply_repetition_penalty(logits, states)
    for i, (history, penalty) in enumerate(zip(histories, penalties, strict=True)):
        hf = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), logits[i : i + 1])
        torch.testing.assert_close(ours[i], hf[0], rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [1, 5, 49, 50])
def test_top_k_matches_hf(top_k: int) -> None:
    logits = random_logits(2, seed=top_k)
    ours = apply_top_k(logits, torch.tensor([top_k, 0]))
    hf = TopKLogitsWarper(top_k)(torch.zeros(1, 1, dtype=torch.long), logits[:1])
    assert torch.equal(ours[0].isinf(), hf[0].isinf())
    assert not ours[1].isinf().any()  # k = 0 keeps every token


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(top_p: float) -> None:
    logits = random_logits(2, seed=int(top_p * 1000))
    ours = apply_top_p(logits, torch.tensor([top_p, 1.0]))
    hf = TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), logits[:1])
    assert torch.equal(ours[0].isinf(), hf[0].isinf())
    assert not ours[1].isinf().any()  # top_p = 1 keeps every token


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    logits = random_logits(4)
    states = [state(temperature=0.0), state(temperature=1.0, seed=1)] * 2
    tokens = sample(logits, states).tokens
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = random_logits(6)
    states = [state(temperature=2.0, top_k=1, seed=i) for i in range(3)]
    states += [state(temperature=2.0, top_p=1e-6, seed=i) for i in range(3)]
    assert sample(logits, states).tokens == logits.argmax(-1).tolist()


def test_min_tokens_masks_eos_until_reached() -> None:
    eos = 7
    logits = torch.zeros(1, VOCAB)
    logits[0, eos] = 100.0
    greedy = state(temperature=0.0, min_tokens=2)
    hot = state(temperature=5.0, min_tokens=2, seed=3)
    for _ in range(2):
        tokens = sample(logits.repeat(2, 1), [greedy, hot], eos_token_ids=[eos]).tokens
        assert eos not in tokens
        greedy.record(tokens[0])
        hot.record(tokens[1])
    assert sample(logits.repeat(2, 1), [greedy, hot], eos_token_ids=[eos]).tokens == [eos, eos]


def test_same_seed_same_draws_different_seed_different_draws() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: every draw is pure randomness

    def draws(seed: int | None) -> list[int]:
        s = state(temperature=1.0, seed=seed)
        return [sample(logits, [s]).tokens[0] for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert draws(None) != draws(None)


def test_rows_draw_from_their_own_generators() -> None:
    logits = torch.zeros(3, VOCAB)
    batch = [state(temperature=1.0, seed=s) for s in (1, 2, 1)]
    alone = state(temperature=1.0, seed=1)
    for _ in range(10):
        together = sample(logits, batch).tokens
        assert together[0] == together[2] == sample(logits[:1], [alone]).tokens[0]


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1, 0.0])
    logits = probs.log()[None, :]  # log 0 = -inf: never drawn
    s = state(temperature=1.0, seed=0)
    counts = torch.bincount(
        torch.tensor([sample(logits, [s]).tokens[0] for _ in range(3000)]), minlength=4
    ).float()
    freq = counts / counts.sum()
    assert freq[3] == 0
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_logit_bias_moves_only_the_listed_tokens_of_its_row() -> None:
    logits = random_logits(2)
    top = int(logits[0].argmax())
    states = [
        state(temperature=0.0, logit_bias=((5, 100.0),)),
        state(temperature=0.0, logit_bias=((int(logits[1].argmax()), -100.0),)),
    ]
    tokens = sample(logits, states).tokens
    assert tokens[0] == 5 != top
    second = logits[1].clone()
    second[second.argmax()] -= 100.0
    assert tokens[1] == int(second.argmax())


def test_frequency_and_presence_penalties_follow_openai_over_generated_tokens() -> None:
    logits = torch.zeros(1, VOCAB)
    s = state(prompt=[9, 9], temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25)
    for token in (3, 3, 4):
        s.record(token)
    penalised = apply_frequency_presence(logits, [s])[0]
    assert penalised[3] == -(0.5 * 2 + 0.25)
    assert penalised[4] == -(0.5 * 1 + 0.25)
    assert penalised[9] == 0  # prompt tokens are not penalised (OpenAI, vLLM)
    assert (penalised[[i for i in range(VOCAB) if i not in (3, 4)]] == 0).all()


def test_logprobs_are_the_processed_distribution_for_the_rows_that_ask() -> None:
    logits = random_logits(3)
    greedy = state(temperature=0.0, logprobs=4)
    hot = state(temperature=0.5, seed=2, logprobs=0)
    silent = state(temperature=0.0)
    sampled = sample(logits, [greedy, hot, silent])
    first, second, third = sampled.logprobs
    assert third is None
    assert first is not None and second is not None
    reference = logits[0].log_softmax(-1)
    assert first.token_id == sampled.tokens[0]
    assert first.logprob == pytest.approx(float(reference.max()), abs=1e-6)
    assert [t for t, _ in first.top] == reference.topk(4).indices.tolist()
    values = [v for _, v in first.top]
    assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert first.top[0][0] == first.token_id  # greedy: the chosen token is the top-1
    scaled = (logits[1] / 0.5).log_softmax(-1)
    assert second.logprob == pytest.approx(float(scaled[sampled.tokens[1]]), abs=1e-6)
    assert second.top == ()


def test_a_constrained_row_only_draws_what_its_grammar_allows() -> None:
    from tests.engine.tiny import build_tokenizer
    from tuneserve.engine.structured import GrammarCompiler

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    grammars = GrammarCompiler(tokenizer, [tokenizer.eos_token_id], vocab)
    choice = Constraint("choice", json.dumps(["brown fox", "lazy dog"]))
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=0, constraint=choice)
    for seed in range(5):
        constrained = SamplingState.create(replace(params, seed=seed), [1], grammars=grammars)
        free = state(temperature=1.0, seed=seed)
        generated: list[int] = []
        while not constrained.constraint_done:
            logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(len(generated)))
            token, _ = sample(logits, [constrained, free]).tokens
            constrained.record(token)
            generated.append(token)
            assert len(generated) < 16
        assert tokenizer.decode(generated) in ("brown fox", "lazy dog")
