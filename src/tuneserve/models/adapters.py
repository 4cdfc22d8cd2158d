"""Check a PEFT LoRA adapter folder against the base model before anything tries to serve it.

Everything is read from the files (adapter_config.json and the weights' headers), so a bad
adapter fails here with a message naming the adapter, the file and what was expected, instead
of deep inside PEFT or the engine.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneserve.errors import AdapterError
from tuneserve.models.gguf import SUFFIX as GGUF_SUFFIX
from tuneserve.models.types import AdapterSpec

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
# PEFT saves `<module>.lora_A.weight` / `<module>.lora_B.weight` (Linear, Conv1D) and
# `<module>.lora_embedding_A` / `<module>.lora_embedding_B` (Embedding), adapter name removed.
_KEY = re.compile(
    r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight"
    r"|(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)"
)


class LoraAdapterConfig(BaseModel):
    """The fields of adapter_config.json that decide whether we can serve it (others ignored)."""

    model_config = ConfigDict(extra="allow")

    peft_type: str
    r: int = Field(8, gt=0)
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: list[str] | None = None
    target_parameters: list[str] | None = None
    trainable_token_indices: Any = None
    base_model_name_or_path: str | None = None


@dataclass(frozen=True, slots=True)
class BaseLayers:
    """What validation needs of the base model, read from it once: its adaptable layers by full
    name, every module name, its class and where it came from.

    Engines wrap layers but never change their shapes, so one snapshot serves every later
    validation, without walking a model that the engine thread may be rewrapping at that moment.
    """

    # full name -> (in, out) of each Linear / Conv1D / Embedding a LoRA can wrap (sizes only:
    # holding the modules would keep weights alive that an engine replaces, e.g. when packing)
    modules: dict[str, tuple[int, int]]
    names: frozenset[str]  # every submodule's full name
    class_name: str
    name_or_path: str

    @classmethod
    def of(cls, model: Any) -> BaseLayers:
        get_base_model = getattr(model, "get_base_model", None)  # an engine's PeftModel wrapper
        if callable(get_base_model):
            model = get_base_model()
        return cls(
            modules=_adaptable_modules(model),
            names=frozenset(name for name, _ in model.named_modules()),
            class_name=type(model).__name__,
            name_or_path=str(getattr(model, "name_or_path", "") or ""),
        )


def validate_adapter(name: str, path: Path, model: Any) -> AdapterSpec:
    """Validate the adapter folder `path` against `model`: the bare transformers base model
    (or one an engine wrapped), or its `BaseLayers` taken once for many validations.

    Raises AdapterError naming the adapter and the offending file.
    """
    path = Path(path).expanduser()
    base = model if isinstance(model, BaseLayers) else BaseLayers.of(model)
    refusal = gguf_refusal(path)
    if refusal is not None:
        raise AdapterError(name, refusal)
    if not path.is_dir():
        what = f"{path} is not a folder" if path.exists() else f"folder {path} does not exist"
        raise AdapterError(
            name,
            f"{what}; pass the folder PeftModel.save_pretrained wrote (it holds {CONFIG_FILE} "
            f"and {WEIGHT_FILES[0]})",
        )
    raw, config = read_adapter_config(name, path / CONFIG_FILE)
    _check_supported(name, path / CONFIG_FILE, config)
    _check_targets(name, path / CONFIG_FILE, config, base)
    weights = _weights_file(name, path)
    _check_weights(name, weights, _read_shapes(name, weights), config, base)
    _check_base_hint(name, path / CONFIG_FILE, config, base)
    targets = config.target_modules
    return AdapterSpec(
        name=name,
        path=path,
        rank=config.r,
        alpha=config.lora_alpha,
        target_modules=(targets,) if isinstance(targets, str) else tuple(targets or ()),
        config=raw,
    )


def gguf_refusal(path: Path) -> str | None:
    """Why `path` is refused when it is a GGUF file, or a folder holding one instead of a PEFT
    adapter: llama.cpp's LoRA format, which the engines do not read. None otherwise."""
    if path.is_file():
        found = [path] if path.suffix.lower() == GGUF_SUFFIX else []
    elif path.is_dir() and not (path / CONFIG_FILE).is_file():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX)
    else:
        return None
    if not found:
        return None
    return (
        f"{found[0]} is a GGUF file: GGUF adapters are not supported. Serve the PEFT adapter "
        f"folder instead ({CONFIG_FILE} and {WEIGHT_FILES[0]}, as PeftModel.save_pretrained "
        "writes them)"
    )


# -- adapter_config.json -------------------------------------------------------------------


def read_adapter_config(name: str, file: Path) -> tuple[dict[str, Any], LoraAdapterConfig]:
    if not file.is_file():
        present = ", ".join(sorted(p.name for p in file.parent.iterdir())) or "nothing"
        raise AdapterError(
            name,
            f"{file} is missing (the folder holds: {present}); a PEFT adapter folder holds "
            f"{CONFIG_FILE} and {WEIGHT_FILES[0]} as written by PeftModel.save_pretrained",
        )
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(name, f"cannot read {file}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise AdapterError(
            name, f"{file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    if not isinstance(raw, dict):
        raise AdapterError(name, f"{file} must hold a JSON object, not {type(raw).__name__}")
    try:
        return raw, LoraAdapterConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"field {'.'.join(map(str, e['loc']))!r}"
            + (f" = {e['input']!r}" if e["type"] != "missing" else "")
            + f": {e['msg']}"
            for e in exc.errors()
        )
        raise AdapterError(name, f"{file}: {problems}") from exc


def _check_supported(name: str, file: Path, config: LoraAdapterConfig) -> None:
    if config.peft_type.upper() != "LORA":
        raise AdapterError(
            name,
            f'{file}: peft_type is {config.peft_type!r}; only LoRA adapters ("LORA") are served',
        )
    refusals = {
        "use_dora": (config.use_dora, "DoRA adapters are not supported; retrain as plain LoRA"),
        "bias": (config.bias != "none", 'trained biases are not supported (only "none")'),
        "lora_bias": (config.lora_bias, "LoRA biases are not supported (only false)"),
        "modules_to_save": (
            bool(config.modules_to_save),
            "adapters that replace whole modules are not supported (only null or [])",
        ),
        "target_parameters": (
            bool(config.target_parameters),
            "LoRA on raw parameters is not supported, only on target_modules (only null)",
        ),
        "trainable_token_indices": (
            bool(config.trainable_token_indices),
            "trained token embeddings are not supported (only null)",
        ),
    }
    for field, (refused, why) in refusals.items():
        if refused:
            value = json.dumps(getattr(config, field))
            raise AdapterError(name, f"{file}: {field} is {value}: {why}")


def _adaptable_modules(model: Any) -> dict[str, tuple[int, int]]:
    """Layers a LoRA can wrap, by full name: every Linear (incl. quantized), Conv1D, Embedding.

    Also right when an engine has already injected PEFT layers into the model in place: such a
    layer counts as the layer it wraps, and its own lora_A/lora_B/base_layer parts are skipped.
    """
    import torch

    kinds: tuple[type, ...] = (torch.nn.Linear, torch.nn.Embedding)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds = (*kinds, Conv1D)
    except ImportError:  # pragma: no cover - a transformers without it
        pass
    found: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if not name or "base_layer" in parts or any(p.startswith("lora_") for p in parts):
            continue
        layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(layer, kinds):
            found[name] = _in_out(layer)
    return found


def _check_targets(name: str, file: Path, config: LoraAdapterConfig, base: BaseLayers) -> None:
    targets = config.target_modules
    if targets is None or targets == "all-linear" or targets == ["all-linear"]:
        return
    modules = list(base.modules)
    if isinstance(targets, str):
        if any(re.fullmatch(targets, module) for module in modules):
            return
        missing = [targets]
    else:
        missing = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in modules)]
    if missing:
        available = sorted({m.rsplit(".", 1)[-1] for m in modules})
        raise AdapterError(
            name,
            f"{file}: target_modules {missing} match no layer of the base model "
            f"({base.class_name}); its layers are named: {', '.join(available)}. "
            "Was the adapter trained for a different base model?",
        )


def _check_base_hint(name: str, file: Path, config: LoraAdapterConfig, layers: BaseLayers) -> None:
    """base_model_name_or_path is only a hint: the base may have moved or been renamed."""
    hint = (config.base_model_name_or_path or "").rstrip("/")
    base = layers.name_or_path.rstrip("/")
    if not hint or not base or _same_model(hint, base):
        return
    logger.warning(
        "adapter %r: %s says it was trained on %r but the base model is %r; serving it anyway "
        "since its shapes fit",
        name,
        file,
        hint,
        base,
    )


def _same_model(hint: str, base: str) -> bool:
    if hint == base or base.endswith(f"/{hint}") or hint.endswith(f"/{base}"):
        return True
    hint_path, base_path = Path(hint).expanduser(), Path(base).expanduser()
    if hint_path.exists() and base_path.exists():
        return hint_path.resolve() == base_path.resolve()
    return hint_path.name == base_path.name


# -- weights ---------------------------------------------------------------------------------


def _weights_file(name: str, folder: Path) -> Path:
    for candidate in WEIGHT_FILES:
        if (folder / candidate).is_file():
            return folder / candidate
    raise AdapterError(
        name,
        f"no weights in {folder}: expected {WEIGHT_FILES[0]} (or the older {WEIGHT_FILES[1]})",
    )


def _read_shapes(name: str, file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, reading only the header where the format allows."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as weights:
                return {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}
        import torch

        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}, not a dict of tensors")
        return {k: tuple(v.shape) for k, v in state.items()}
    except Exception as exc:  # every reader error means the same to the user: a bad file
        raise AdapterError(
            name, f"cannot read {file}: {exc}. The file is corrupt or not a PEFT weights file"
        ) from exc


@dataclass(frozen=True, slots=True)
class _Expected:
    shape: tuple[int, int]
    module: str
    rank: int
    is_a: bool  # lora_A [r, in]; else lora_B [out, r]


def _check_weights(
    name: str,
    file: Path,
    shapes: dict[str, tuple[int, ...]],
    config: LoraAdapterConfig,
    base: BaseLayers,
) -> None:
    if not shapes:
        raise AdapterError(name, f"{file} holds no tensors")
    seen: dict[str, set[str]] = {}
    hint = config.base_model_name_or_path
    trained_on = f" (adapter_config.json says it was trained on {hint!r})" if hint else ""
    for key, shape in shapes.items():
        expected = _expected_shape(name, file, key, config, base, trained_on)
        if shape != expected.shape:
            rank_at = 0 if expected.is_a else 1
            only_rank_differs = (
                len(shape) == 2 and shape[1 - rank_at] == expected.shape[1 - rank_at]
            )
            why = (
                f"its rank is {shape[rank_at]} but {CONFIG_FILE} says r={expected.rank} "
                "(see r and rank_pattern)"
                if only_rank_differs
                else f"the adapter was trained for a different base model{trained_on}"
            )
            raise AdapterError(
                name,
                f"{file}: {key} has shape {list(shape)} but the base model's {expected.module} "
                f"with rank {expected.rank} needs {list(expected.shape)}; {why}",
            )
        module, _, kind = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        seen.setdefault(module, set()).add(kind.split(".")[0].replace("embedding_", ""))
    for module, kinds in seen.items():
        if kinds != {"A", "B"}:
            lacking = "lora_B" if "A" in kinds else "lora_A"
            raise AdapterError(name, f"{file}: {module} has no {lacking} weight")


def _expected_shape(
    name: str,
    file: Path,
    key: str,
    config: LoraAdapterConfig,
    base: BaseLayers,
    trained_on: str,
) -> _Expected:
    match = _KEY.fullmatch(key.removeprefix(_PEFT_PREFIX)) if key.startswith(_PEFT_PREFIX) else None
    if match is None:
        raise AdapterError(
            name,
            f"{file}: unexpected tensor {key!r}; a LoRA adapter holds only "
            f"'{_PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' tensors",
        )
    module_name = match["module"] or match["emodule"]
    kind = match["kind"] or match["ekind"]
    sizes = base.modules.get(module_name)
    if sizes is None:
        exists = module_name in base.names
        what = "is not a Linear or Embedding layer" if exists else "does not exist"
        raise AdapterError(
            name,
            f"{file}: {key} is for the module {module_name!r}, which {what} in the base model "
            f"({base.class_name}); the adapter was trained for a different base model"
            f"{trained_on}",
        )
    rank = _pattern_value(config.rank_pattern, module_name, config.r)
    n_in, n_out = sizes
    is_a = kind.endswith("A")
    shape = (rank, n_in) if is_a else (n_out, rank)
    return _Expected(shape, f"{module_name} ({n_in} -> {n_out})", rank, is_a)


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern/alpha_pattern keys: the key, as a regex, ends the name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def _in_out(module: Any) -> tuple[int, int]:
    import torch

    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features"):  # Linear, quantized Linear
        return int(module.in_features), int(module.out_features)
    n_in, n_out = module.weight.shape  # transformers' Conv1D stores [in, out]
    return int(n_in), int(n_out)


def lora_scale(config: dict[str, Any], module_name: str) -> float:
    """The factor PEFT multiplies `B @ A @ x` by for `module_name`: alpha/r, or alpha/sqrt(r)."""
    parsed = LoraAdapterConfig.model_validate(config)
    rank = _pattern_value(parsed.rank_pattern, module_name, parsed.r)
    alpha = _pattern_value(parsed.alpha_pattern, module_name, parsed.lora_alpha)
    return float(alpha / (rank**0.5 if parsed.use_rslora else rank))
