"""How the demo is made: a tokenizer, a tiny Llama trained from scratch, LoRA adapters on it.

Private to models/demo.py. Everything is seeded and runs on one CPU thread, so two builds
give identical files. Training memorises a fixed set of chats; it
stops as soon as greedy decoding reproduces every answer with a safe logit margin, so the
first `tuneserve serve` stays fast.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Example = tuple[Messages, str]  # the chat so far -> the assistant's next answer
Encoded = tuple[list[int], list[int]]  # token ids, labels (-100 = not learnt)

BOS, EOS, PAD = "<s>", "<|end|>", "<pad>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

# One token per role marker keeps sequences short (training time is per token). "developer" is
# OpenAI's newer name for the system role.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'developer'] %}{{ '<|system|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% else %}{{ raise_exception('the demo chat template accepts the roles system, developer, "
    "user and assistant, not ' + message['role']) }}{% endif %}"
    "{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class TrainPlan:
    """Hyperparameters of one training run. Stops early once every answer is reproduced."""

    max_steps: int
    lr: float
    min_margin: float = 3.0  # logit gap top-1 minus top-2 at every answer token
    warmup: int = 10


@contextmanager
def training_threads() -> Iterator[None]:
    """Train on one thread: identical results on any machine, whatever its core count.

    Measured on a 2-core machine shared with other work: a step of this tiny model took 0.1 s
    on one thread and 0.47 s on two, which spin and wait for each other when cores are busy.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """Byte-level BPE trained on `texts`, as a transformers tokenizer with the demo template.

    Byte-level so any input encodes; the corpus is small enough that every word of the training
    chats ends up a single token (names included), which is what lets the model copy a name.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, *ROLE_TOKENS.values()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Plain-text prompts (/v1/completions) get the BOS the model was trained with.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
        padding_side="left",
    )
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    return tokenizer


def build_base_model(tokenizer: Any, *, hidden: int, layers: int, seed: int) -> Any:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in real models
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], -100 outside assistant answers
    scored: torch.Tensor  # [B] bool: rows whose answers greedy decoding must reproduce


def encode_chat(tokenizer: Any, messages: Messages, answer: str) -> Encoded:
    """Token ids of the whole chat and its labels: only the assistant turns (and their EOS) count.

    Rendered through the chat template exactly as the server renders a request, so the model is
    trained on the very ids it will be served.
    """

    def render(turns: Messages, prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
        return list(tokenizer.encode(text, add_special_tokens=False))

    chat = [*messages, {"role": "assistant", "content": answer}]
    ids = render(chat, prompt=False)
    labels = [-100] * len(ids)
    for i, turn in enumerate(chat):
        if turn["role"] != "assistant":
            continue
        start, through = len(render(chat[:i], prompt=True)), render(chat[: i + 1], prompt=False)
        if ids[: len(through)] != through:
            raise RuntimeError(f"the chat template does not render prefixes stably: {chat}")
        labels[start : len(through)] = through[start:]
    return ids, labels


def encode_text(tokenizer: Any, text: str) -> Encoded:
    """Plain text, learnt whole: `BOS text EOS`, every token after BOS a label."""
    ids = [*tokenizer.encode(text), tokenizer.eos_token_id]  # encode() adds the BOS
    return ids, [-100, *ids[1:]]


def make_batch(tokenizer: Any, encoded: Sequence[Encoded], texts: Sequence[Encoded] = ()) -> Batch:
    """All sequences as one right-padded batch: one optimizer step sees every example.

    `texts` are learnt too but need not be reproduced exactly (see `greedy_margin`).
    """
    import torch

    scored = torch.tensor([True] * len(encoded) + [False] * len(texts))
    encoded = [*encoded, *texts]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.tensor(labs)
    return Batch(input_ids, attention_mask, labels, scored)


def greedy_margin(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Smallest (target logit - best other logit) over all answer tokens; > 0 means greedy
    decoding reproduces every answer exactly, token by token, and stops at its EOS."""

    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != -100
    picked = logits[mask]  # [N, V]
    target = targets[mask]
    target_logit = picked.gather(1, target[:, None]).squeeze(1)
    others = picked.scatter(1, target[:, None], float("-inf"))
    return float((target_logit - others.max(dim=1).values).min())


def train(
    model: Any,
    batch: Batch,
    plan: TrainPlan,
    *,
    label: str,
    on_step: Callable[[], None] | None = None,
) -> tuple[int, float]:
    """Full-batch AdamW on the trainable parameters of `model`; returns (steps, final margin)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / plan.warmup)
    )
    model.train()
    margin = float("-inf")
    step = 0
    for step in range(plan.max_steps + 1):
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
        margin = greedy_margin(out.logits.detach()[batch.scored], batch.labels[batch.scored])
        if margin >= plan.min_margin or step == plan.max_steps:
            break
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step:
            on_step()
    model.eval()
    log = logger.info if margin >= plan.min_margin else logger.warning
    log("%s: %d steps, loss %.4f, greedy margin %.2f", label, step, out.loss.item(), margin)
    return step, margin


def lora_model(base: Any, config: Any) -> Any:
    """A PEFT model over a private copy of `base` (PEFT injects layers into the model it wraps)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        # peft 0.21 calls an API transformers 5 deprecated; not ours to fix, and pytest's
        # filterwarnings=error would turn it into a failed build.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        return get_peft_model(copy.deepcopy(base), config)
