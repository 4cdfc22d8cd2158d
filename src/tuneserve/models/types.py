"""What is served: the loaded base model, its tokenizer, and the validated adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A PEFT LoRA adapter folder that passed validation against the base model."""

    name: str
    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    config: dict[str, Any]  # adapter_config.json as read


@dataclass(slots=True)
class ServedModel:
    """Everything the engine and server need about the model being served.

    `model` is the bare transformers base model (eval mode, on `device`, no PEFT wrapper);
    the engine decides how adapters are applied. `tokenizer` always has a chat template
    (a default one is set when the model ships none).
    """

    base_name: str  # the id clients use for "no adapter" (vLLM convention)
    base_path: str  # local path or hub id it came from
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)
    adapter_errors: dict[str, str] = field(default_factory=dict)  # name -> why it is not served
    max_model_len: int = 2048
    device: str = "cpu"
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
