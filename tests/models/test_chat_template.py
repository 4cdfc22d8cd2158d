"""ensure_chat_template gives a template only to tokenizers that lack one."""

from __future__ import annotations

from typing import Any

import pytest

from tuneserve.models.chat_template import DEFAULT_CHAT_TEMPLATE, ensure_chat_template


@pytest.fixture
def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(special_tokens=["<unk>", "<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["hello there"], trainer=trainer)
    # GPT-2 style: one token serves as both BOS and EOS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def test_sets_chatml_without_a_bos_that_is_also_the_eos(tokenizer: Any) -> None:
    assert getattr(tokenizer, "chat_template", None) is None
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_keeps_a_template_the_model_ships(tokenizer: Any) -> None:
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.chat_template = own
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == own
