"""The PEFT LoRA adapter, in one place: what its folder holds, which variants are served, how its
weights are named, read and scaled, and whether it fits the base model.

Every engine and the server go through this module, so an adapter that passes `validate_adapter`
is one every engine can read: the same config schema, the same refusals (each naming the file,
the field, the value and what is accepted), the same weight keys and the same file policy.

Files: `adapter_config.json` and `adapter_model.safetensors`, or the older `adapter_model.bin`.
A `.bin` is a pickle, so it is read with `torch.load(weights_only=True)`, which refuses anything
but tensors and plain containers: a pickle that would run code fails as a corrupt file.

Validation reads only the files (the config and the weights' headers) and the base model's
layer sizes, so a bad adapter fails here, with a message naming the adapter and the file,
instead of deep inside PEFT or the engine. It has two halves because only an engine knows its
model: `read_adapter_spec` needs no base (the server reads folders with it), and
`check_against_base` is what an engine's `validate_adapter` runs against its layers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneserve.errors import AdapterError
from tuneserve.jsonfile import JsonFileProblem, read_json_object
from tuneserve.models.gguf import SUFFIX as GGUF_SUFFIX
from tuneserve.models.types import AdapterSpec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, BIN_FILE)  # the first one present is read
PEFT_PREFIX = "base_model.model."
_SAVED_BY = f"{CONFIG_FILE} and {SAFETENSORS_FILE}, as PeftModel.save_pretrained writes them"

T = TypeVar("T")


# -- adapter_config.json -------------------------------------------------------------------


class LoraAdapterConfig(BaseModel):
    """The fields of adapter_config.json that decide how (and whether) it is served; the
    others are kept (`extra="allow"`) and ignored."""

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

    @property
    def targets(self) -> tuple[str, ...]:
        targets = self.target_modules
        return (targets,) if isinstance(targets, str) else tuple(targets or ())

    def rank_for(self, module: str) -> int:
        return pattern_value(self.rank_pattern, module, self.r)

    def alpha_for(self, module: str) -> float:
        return float(pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale_for(self, module: str) -> float:
        """The factor PEFT multiplies `B @ A @ x` by at `module`: alpha/r, or alpha/sqrt(r)
        with rsLoRA, each of them after rank_pattern/alpha_pattern."""
        rank, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def pattern_value(patterns: Mapping[str, T], module: str, default: T) -> T:
    """PEFT's rule for rank_pattern/alpha_pattern keys (peft.utils.other.get_pattern_key): the
    first key that, as a regex, matches the end of the module's name after a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_adapter_config(name: str, file: Path) -> tuple[dict[str, Any], LoraAdapterConfig]:
    """adapter_config.json as read, and parsed; AdapterError naming the file, line or field."""
    if not file.is_file():
        present = ", ".join(sorted(p.name for p in file.parent.iterdir())) or "nothing"
        raise AdapterError(
            name,
            f"{file} is missing (the folder holds: {present}); a PEFT adapter folder holds "
            f"{_SAVED_BY}",
        )
    try:
        raw, _ = read_json_object(file)
    except JsonFileProblem as exc:
        raise AdapterError(name, f"{file}: {exc}") from None
    return raw, parse_adapter_config(name, file, raw)


def parse_adapter_config(name: str, file: Path, raw: Mapping[str, Any]) -> LoraAdapterConfig:
    """`raw` (the contents of `file`) as a LoraAdapterConfig; AdapterError naming each field."""
    try:
        return LoraAdapterConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"field {'.'.join(map(str, e['loc']))!r}"
            + (f" = {e['input']!r}" if e["type"] != "missing" else "")
            + f": {e['msg']}"
            for e in exc.errors()
        )
        raise AdapterError(name, f"{file}: {problems}") from exc


def served_config(spec: AdapterSpec) -> LoraAdapterConfig:
    """The config of a validated adapter, checked again: a spec may be built by hand."""
    file = Path(spec.path) / CONFIG_FILE
    config = parse_adapter_config(spec.name, file, spec.config)
    check_supported(spec.name, file, config)
    return config


# -- the variants that are refused ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Refusal:
    field: str
    refused: Callable[[LoraAdapterConfig], bool]
    why: str
    accepted: str


_REFUSALS = (
    _Refusal(
        "peft_type",
        lambda c: c.peft_type.upper() != "LORA",
        "only LoRA adapters are served",
        '"LORA"',
    ),
    _Refusal(
        "use_dora",
        lambda c: c.use_dora,
        "DoRA adapters are not supported; retrain as plain LoRA",
        "false",
    ),
    _Refusal("bias", lambda c: c.bias != "none", "trained biases are not supported", '"none"'),
    _Refusal("lora_bias", lambda c: c.lora_bias, "LoRA biases are not supported", "false"),
    _Refusal(
        "modules_to_save",
        lambda c: bool(c.modules_to_save),
        "adapters that replace whole modules cannot be applied per request",
        "null or []",
    ),
    _Refusal(
        "target_parameters",
        lambda c: bool(c.target_parameters),
        "LoRA on raw parameters is not supported, only on target_modules",
        "null or []",
    ),
    _Refusal(
        "trainable_token_indices",
        lambda c: bool(c.trainable_token_indices),
        "trained token embeddings are not supported",
        "null",
    ),
)


def check_supported(name: str, file: Path, config: LoraAdapterConfig) -> None:
    """Refuse the PEFT variants no engine serves: AdapterError naming the file, the field,
    its value and what is accepted."""
    for refusal in _REFUSALS:
        if refusal.refused(config):
            value = json.dumps(getattr(config, refusal.field))
            raise AdapterError(
                name,
                f"{file}: {refusal.field} is {value}: {refusal.why} (accepted: {refusal.accepted})",
            )


# -- the weights -----------------------------------------------------------------------------

# PEFT saves `<module>.lora_A.weight` / `.lora_B.weight` (Linear, Conv1D) and
# `<module>.lora_embedding_A` / `_B` (Embedding), under PEFT_PREFIX, the adapter name removed.
_KEY = re.compile(
    re.escape(PEFT_PREFIX)
    + r"(?P<module>.+)\.(?:lora_(?P<factor>[AB])\.weight|lora_embedding_(?P<efactor>[AB]))"
)


@dataclass(frozen=True, slots=True)
class LoraPair(Generic[T]):
    """One module's two LoRA tensors (or their shapes): A [r, in] and B [out, r]."""

    a: T
    b: T
    keys: tuple[str, str]  # A's and B's names in the file


def lora_pairs(name: str, file: Path, tensors: Mapping[str, T]) -> dict[str, LoraPair[T]]:
    """The file's tensors (or shapes) by module, prefix stripped; AdapterError for a tensor
    that is not a LoRA weight, a module with one half only, or a file with none."""
    halves: dict[str, dict[str, tuple[str, T]]] = {}
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(
                name,
                f"{file}: unexpected tensor {key!r}; a LoRA adapter holds only "
                f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' tensors",
            )
        module = match["module"]
        halves.setdefault(module, {})[match["factor"] or match["efactor"]] = (key, value)
    if not halves:
        raise AdapterError(name, f"{file} holds no tensors")
    pairs: dict[str, LoraPair[T]] = {}
    for module, found in halves.items():
        if len(found) < 2:
            lacking = "lora_B" if "A" in found else "lora_A"
            raise AdapterError(name, f"{file}: {module} has no {lacking} weight")
        (a_key, a), (b_key, b) = found["A"], found["B"]
        pairs[module] = LoraPair(a, b, (a_key, b_key))
    return pairs


def weights_file(name: str, folder: Path) -> Path:
    """The adapter's weights: adapter_model.safetensors, else adapter_model.bin."""
    for candidate in WEIGHT_FILES:
        if (folder / candidate).is_file():
            return folder / candidate
    raise AdapterError(
        name, f"no weights in {folder}: expected {SAFETENSORS_FILE} (or the older {BIN_FILE})"
    )


def read_shapes(name: str, file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape; a safetensors file's header only."""
    if file.suffix == ".safetensors":
        with _unreadable(name, file):
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as weights:
                return {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}
    return {k: tuple(v.shape) for k, v in read_tensors(name, file).items()}


def read_tensors(name: str, file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the weights file, on the CPU, as saved (keys unchanged)."""
    with _unreadable(name, file):
        import torch

        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}, not a dict of tensors")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"its {key!r} is a {type(value).__name__}, not a tensor")
        return state


@contextlib.contextmanager
def _unreadable(name: str, file: Path) -> Iterator[None]:
    """Any reader's error means the same to the user: a corrupt or foreign file."""
    try:
        yield
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(
            name, f"cannot read {file}: {exc}. The file is corrupt or not a PEFT weights file"
        ) from exc


# -- validation against the base model -------------------------------------------------------


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
    base = model if isinstance(model, BaseLayers) else BaseLayers.of(model)
    spec = read_adapter_spec(name, path)
    check_against_base(spec, base)
    return spec


def read_adapter_spec(name: str, path: Path) -> AdapterSpec:
    """The adapter folder `path` as a spec, checked without any base model: a PEFT LoRA folder
    whose config parses and asks for nothing refused. Whether it fits a base is for
    `check_against_base` (an engine's `validate_adapter`), since only the backend knows its model.

    Raises AdapterError naming the adapter and the offending file.
    """
    path = Path(path).expanduser()
    refusal = gguf_refusal(path)
    if refusal is not None:
        raise AdapterError(name, refusal)
    if not path.is_dir():
        what = f"{path} is not a folder" if path.exists() else f"folder {path} does not exist"
        raise AdapterError(name, f"{what}; pass the folder holding {_SAVED_BY}")
    config_file = path / CONFIG_FILE
    raw, config = read_adapter_config(name, config_file)
    check_supported(name, config_file, config)
    return AdapterSpec(
        name=name,
        path=path,
        rank=config.r,
        alpha=config.lora_alpha,
        target_modules=config.targets,
        config=raw,
    )


def check_against_base(spec: AdapterSpec, base: BaseLayers) -> None:
    """Raise AdapterError unless `spec`'s targets and weight shapes fit the base's layers."""
    config_file = Path(spec.path) / CONFIG_FILE
    config = served_config(spec)
    _check_targets(spec.name, config_file, config, base)
    weights = weights_file(spec.name, spec.path)
    _check_weights(spec.name, weights, read_shapes(spec.name, weights), config, base)
    _check_base_hint(spec.name, config_file, config, base)


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
        f"folder instead ({_SAVED_BY})"
    )


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


def _in_out(module: Any) -> tuple[int, int]:
    import torch

    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features"):  # Linear, quantized Linear
        return int(module.in_features), int(module.out_features)
    n_in, n_out = module.weight.shape  # transformers' Conv1D stores [in, out]
    return int(n_in), int(n_out)


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


def _check_weights(
    name: str,
    file: Path,
    shapes: Mapping[str, tuple[int, ...]],
    config: LoraAdapterConfig,
    base: BaseLayers,
) -> None:
    hint = config.base_model_name_or_path
    trained_on = f" ({CONFIG_FILE} says it was trained on {hint!r})" if hint else ""
    for module, pair in lora_pairs(name, file, shapes).items():
        sizes = base.modules.get(module)
        if sizes is None:
            what = (
                "is not a Linear or Embedding layer" if module in base.names else "does not exist"
            )
            raise AdapterError(
                name,
                f"{file}: {pair.keys[0]} is for the module {module!r}, which {what} in the "
                f"base model ({base.class_name}); the adapter was trained for a different base "
                f"model{trained_on}",
            )
        rank = config.rank_for(module)
        n_in, n_out = sizes
        for key, shape, expected, rank_at in (
            (pair.keys[0], pair.a, (rank, n_in), 0),
            (pair.keys[1], pair.b, (n_out, rank), 1),
        ):
            if shape == expected:
                continue
            only_rank_differs = len(shape) == 2 and shape[1 - rank_at] == expected[1 - rank_at]
            why = (
                f"its rank is {shape[rank_at]} but {CONFIG_FILE} says r={rank} "
                "(see r and rank_pattern)"
                if only_rank_differs
                else f"the adapter was trained for a different base model{trained_on}"
            )
            raise AdapterError(
                name,
                f"{file}: {key} has shape {list(shape)} but the base model's {module} "
                f"({n_in} -> {n_out}) with rank {rank} needs {list(expected)}; {why}",
            )
