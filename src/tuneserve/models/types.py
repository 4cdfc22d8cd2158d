"""What is served (backend-neutral), and the transformers weights the torch engines run."""

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
    """What is served, whatever engine serves it: names, where the weights are, the tokenizer,
    the context length, EOS ids and the adapters read at start.

    No weights: each engine loads the model it runs from `source` (the registry in
    engine/registry.py decides how), so the server can work with any backend. `tokenizer`
    always has a chat template (a default one is set when the model ships none). `adapters`
    passed the checks that need no base; an engine drops those that do not fit its model into
    `adapter_errors` when it is built.
    """

    base_name: str  # the id clients use for "no adapter" (vLLM convention)
    base_path: str  # what the user gave: a folder, a .gguf file or a hub id
    tokenizer: Any  # transformers tokenizer
    source: str = ""  # where the weights load from: a folder (a GGUF's conversion) or a hub id
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)
    adapter_errors: dict[str, str] = field(default_factory=dict)  # name -> why it is not served
    max_model_len: int = 2048
    device: str = "cpu"
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()


@dataclass(slots=True, kw_only=True)
class LoadedModel(ServedModel):
    """A ServedModel with its transformers weights loaded: what the transformers engines run.

    `model` is the bare base model (eval mode, on `device`, no PEFT wrapper); the engine
    decides how adapters are applied.
    """

    model: Any  # transformers.PreTrainedModel
