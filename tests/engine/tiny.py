"""Tiny random models, a locally trained tokenizer, random LoRA adapters, async helpers.

Every test loads a fresh copy of a model (engines wrap the model with PEFT in place, so two
engines never share one).
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from tuneserve.engine.base import RequestStream
from tuneserve.engine.types import GenerationRequest, SamplingParams, StreamDelta
from tuneserve.models.types import AdapterSpec, LoadedModel

T = TypeVar("T")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "User: hello there! Assistant: hi, how can I help you today?",
    "Stop strings end a request; the rest is never sent.",
    "Crème brûlée, naïve café, jalapeño — déjà vu.",
    "日本語のテキスト、中文文本，한국어 텍스트.",
    "Emoji too: 🙂 🚀 🎉 and symbols ∑ ∫ √ ≠ ≤.",
    "def add(a, b):\n    return a + b\n",
] * 3
SPECIALS = ["<pad>", "<s>", "</s>"]

# name -> (rank, alpha, target modules)
ADAPTERS: dict[str, tuple[int, float, tuple[str, ...]]] = {
    "alpha": (4, 8.0, ("q_proj", "v_proj")),
    "beta": (
        8,
        16.0,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    "gamma": (2, 32.0, ("o_proj", "down_proj")),
}


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning);
    peft 0.22's `load_adapter` of a second adapter on other modules lists the first adapter's
    keys in those modules as missing (a UserWarning: they were never part of it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        warnings.filterwarnings(
            "ignore", message="Found missing adapter keys", category=UserWarning
        )
        yield


def build_tokenizer() -> Any:
    """Byte-level BPE: small enough that emoji and CJK split into several tokens each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def tiny_config(family: str, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(family)


@dataclass
class TinyFamily:
    """One saved base model and its adapters."""

    family: str
    base: Path
    adapters: dict[str, AdapterSpec]
    tokenizer: Any
    _references: dict[str | None, Any] = field(default_factory=dict)

    def load_base(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32).eval()

    def served(self, adapters: Sequence[str] | None = None) -> LoadedModel:
        names = list(self.adapters) if adapters is None else list(adapters)
        return LoadedModel(
            base_name=f"tiny-{self.family}",
            base_path=str(self.base),
            model=self.load_base(),
            tokenizer=self.tokenizer,
            adapters={name: self.adapters[name] for name in names},
            max_model_len=512,
            eos_token_ids=(self.tokenizer.eos_token_id,),
        )

    def reference(self, adapter: str | None) -> Any:
        """A plain transformers (+ PEFT) model for one adapter: the oracle. Cached: never
        handed to an engine, so sharing it between tests is safe."""
        if adapter not in self._references:
            model = self.load_base()
            if adapter is not None:
                from peft import PeftModel

                with quiet_peft():
                    path = str(self.adapters[adapter].path)
                    model = PeftModel.from_pretrained(model, path).eval()
            self._references[adapter] = model
        return self._references[adapter]


def build_family(family: str, root: Path, tokenizer: Any) -> TinyFamily:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base_dir = root / family / "base"
    AutoModelForCausalLM.from_config(tiny_config(family, tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    specs: dict[str, AdapterSpec] = {}
    for seed, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank,
            # peft annotates lora_alpha as int but takes any number (scaling is alpha / r); the
            # float is what adapter_config.json records and what the tests read back
            lora_alpha=alpha,  # type: ignore[arg-type]
            target_modules=list(targets),
            init_lora_weights=False,  # random A and B: every adapter changes the output
            task_type="CAUSAL_LM",
        )
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        path = root / family / name
        with quiet_peft():
            get_peft_model(base, config).save_pretrained(str(path))
        specs[name] = AdapterSpec(
            name=name,
            path=path,
            rank=rank,
            alpha=alpha,
            target_modules=targets,
            config=config.to_dict(),
        )
    return TinyFamily(family=family, base=base_dir, adapters=specs, tokenizer=tokenizer)


# -- helpers for async tests ---------------------------------------------------------------
def run(coro_fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 60.0) -> T:
    """Run an async test body with a deadline (a hung engine fails instead of stalling CI)."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


def request(
    prompt_ids: Sequence[int],
    adapter: str | None = None,
    request_id: str = "r",
    **params: Any,
) -> GenerationRequest:
    params.setdefault("max_tokens", 8)
    params.setdefault("temperature", 0.0)
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=tuple(prompt_ids),
        params=SamplingParams(**params),
        adapter=adapter,
    )


async def collect(stream: RequestStream) -> list[StreamDelta]:
    return [delta async for delta in stream]


def token_ids(deltas: Sequence[StreamDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text_of(deltas: Sequence[StreamDelta]) -> str:
    return "".join(d.text for d in deltas)


async def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def first(stream: AsyncIterator[StreamDelta]) -> StreamDelta:
    return await stream.__anext__()
