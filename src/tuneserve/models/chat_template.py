"""A chat template for tokenizers that ship none, so every served model can take `messages`."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# ChatML: the de facto generic format (transformers' own old class default). BOS is written only
# when it differs from EOS: Llama-style models need it, and the server encodes the rendered text
# with add_special_tokens=False; GPT-2-style tokenizers (BOS == EOS) would only get noise.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> None:
    """Give `tokenizer` DEFAULT_CHAT_TEMPLATE when it has no chat template of its own."""
    if getattr(tokenizer, "chat_template", None):
        return
    logger.info(
        "tokenizer %s has no chat template; using the generic ChatML template",
        getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
