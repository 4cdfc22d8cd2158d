"""Read what is served (tokenizer, config, adapter folders) and, for the transformers engines,
load the base model's weights: two steps, so an engine that loads its own model needs only the
first."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple

from tuneserve.errors import AdapterError, ModelLoadError
from tuneserve.models.adapters import BaseLayers, check_against_base, read_adapter_spec
from tuneserve.models.chat_template import ensure_chat_template
from tuneserve.models.gguf import SUFFIX, ensure_converted, find_gguf
from tuneserve.models.types import AdapterSpec, LoadedModel, ServedModel

logger = logging.getLogger(__name__)

MAX_CONTEXT_CAP = 32768  # a default beyond this only reserves memory no demo request needs
_FALLBACK_CONTEXT = 2048  # for configs that name no context length at all
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_SERVED_FIELDS = tuple(f.name for f in fields(ServedModel))


def read_served_model(
    base: str,
    adapters: dict[str, Path],
    *,
    dtype: str = "auto",
    device: str = "auto",
    max_model_len: int | None = None,
    served_model_name: str | None = None,
    cache_dir: Path | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ServedModel:
    """What `base` (a local folder, a .gguf file or a folder holding one, or a hub id) serves,
    without its weights: the tokenizer, the config's context length and EOS ids, and each
    adapter's folder read (an engine checks its shapes against the model it loads).

    A GGUF base is converted once into `cache_dir` (default: the user cache) and served from
    there, named after the file; `on_stage` hears what a conversion is doing. A broken adapter
    does not stop the others: it is logged and recorded in `ServedModel.adapter_errors`.
    Raises ModelLoadError when the base cannot be read and AdapterError when adapter names
    clash with the base's.
    """
    located = _locate(base, cache_dir, on_stage)
    source, is_local = located.source, located.is_local
    base_name = served_model_name or located.name
    _check_names(adapters, base_name)
    resolved_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, resolved_device)

    tokenizer = _load(source, is_local, "tokenizer", lambda: _tokenizer(source))
    config = _load(source, is_local, "model", lambda: _config(source))
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token_id is None:  # batching pads; the pad id never reaches the model
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right end of each row

    specs: dict[str, AdapterSpec] = {}
    errors: dict[str, str] = {}
    for name, path in adapters.items():
        try:
            specs[name] = read_adapter_spec(name, Path(path))
        except AdapterError as exc:
            _not_serving(exc, name, errors)

    return ServedModel(
        base_name=base_name,
        base_path=located.origin,
        tokenizer=tokenizer,
        source=source,
        adapters=specs,
        adapter_errors=errors,
        max_model_len=_context_length(config, max_model_len),
        device=resolved_device,
        dtype=str(torch_dtype).removeprefix("torch."),
        eos_token_ids=_eos_token_ids(_generation_config(source, config), tokenizer),
    )


def load_weights(served: ServedModel) -> LoadedModel:
    """`served` with its transformers model loaded from `served.source` onto its device and
    dtype. Adapters whose shapes do not fit the model move from `served.adapters` to
    `served.adapter_errors` (in place: the server reports them from the ServedModel it holds).

    Raises ModelLoadError when the weights cannot be loaded.
    """
    import torch

    is_local = Path(served.source).is_dir()
    dtype = getattr(torch, served.dtype)
    model = _load(
        served.source, is_local, "model", lambda: _model(served.source, dtype, served.device)
    )
    specs: dict[str, AdapterSpec] = {}
    errors = dict(served.adapter_errors)
    layers = BaseLayers.of(model)  # one walk of the model for every adapter
    for name, spec in served.adapters.items():
        try:
            check_against_base(spec, layers)
            specs[name] = spec
        except AdapterError as exc:
            _not_serving(exc, name, errors)
    served.adapters, served.adapter_errors = specs, errors
    loaded = LoadedModel(**{f: getattr(served, f) for f in _SERVED_FIELDS}, model=model)
    logger.info(
        "serving %s from %s on %s (%s, context %d) with adapters: %s",
        loaded.base_name,
        loaded.source,
        loaded.device,
        loaded.dtype,
        loaded.max_model_len,
        ", ".join(specs) or "(none)",
    )
    return loaded


def load_served_model(base: str, adapters: dict[str, Path], **options: Any) -> LoadedModel:
    """`read_served_model` then `load_weights`: what the transformers engines run (the same
    keyword options as `read_served_model`)."""
    return load_weights(read_served_model(base, adapters, **options))


def _not_serving(exc: AdapterError, name: str, errors: dict[str, str]) -> None:
    logger.error("not serving %s", exc)
    errors[name] = str(exc)


class _Located(NamedTuple):
    source: str  # where to load from: a folder or a hub id
    is_local: bool
    name: str  # the base's id in the API unless --served-model-name says otherwise
    origin: str  # what the user gave: the folder, the .gguf file or the hub id


def _locate(base: str, cache_dir: Path | None, on_stage: Callable[[str], None] | None) -> _Located:
    path = Path(base).expanduser()
    gguf = find_gguf(path)
    if gguf is not None:
        # The file's stem names it, not the cache's hash folder: "SmolLM2-135M-Instruct.Q4_1".
        folder = _converted(gguf, cache_dir, on_stage)
        return _Located(str(folder), True, gguf.stem, str(gguf.absolute()))
    if path.suffix.lower() == SUFFIX and not path.exists():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"base model folder {path} has no config.json; expected a transformers model "
                "folder (config.json, *.safetensors, tokenizer files) or a .gguf file"
            )
        # absolute() not resolve(): a symlinked model keeps the name the user gave it
        source = str(path.absolute())
        return _Located(source, True, _folder_name(source), source)
    if path.exists():
        raise ModelLoadError(
            f"base model {path} is a file; pass the folder that holds it (or a .gguf file)"
        )
    if not _HUB_ID.fullmatch(base):
        raise ModelLoadError(
            f"base model folder {path} does not exist (and {base!r} is not a hub id like "
            "'org/model')"
        )
    return _Located(base, False, base, base)


def _converted(gguf: Path, cache_dir: Path | None, on_stage: Callable[[str], None] | None) -> Path:
    """The transformers folder of a GGUF base, converted into the cache the first time."""
    from tuneserve.settings import default_cache_dir

    def stage(what: str) -> None:
        logger.info("converting %s (once): %s", gguf.name, what)
        if on_stage is not None:
            on_stage(f"converting {gguf.name} (once): {what}")

    folder = ensure_converted(gguf, cache_dir or default_cache_dir(), on_stage=stage)
    logger.info("base %s: serving its conversion in %s", gguf, folder)
    if on_stage is not None:
        on_stage(f"loading {gguf.name} (converted in {folder})")
    return folder


def _folder_name(source: str) -> str:
    path = Path(source)
    return path.name if path.name not in ("", ".", "..") else path.resolve().name


def _check_names(adapters: dict[str, Path], base_name: str) -> None:
    for name in adapters:
        if not name.strip():
            raise AdapterError(name, "an adapter name must not be empty; use NAME=PATH")
        if name == base_name:
            raise AdapterError(
                name,
                f"has the same name as the base model {base_name!r}; requests could not choose "
                "between them. Rename the adapter (NAME=PATH) or the base (--served-model-name)",
            )


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device 'cuda' was asked for but torch {torch.__version__} sees no CUDA GPU; "
            "use --device cpu or auto"
        )
    if device not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {device!r} is not one of auto, cpu, cuda")
    return device


def _resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(choices)}")
    if device == "cpu" and dtype == "float16":
        logger.warning("float16 on CPU is slow and lossy; float32 or bfloat16 serve better")
    return choices[dtype]


def _load(source: str, is_local: bool, what: str, load: Any) -> Any:
    try:
        return load()
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... alike
        if is_local:
            raise ModelLoadError(f"cannot load the base {what} from {source}: {exc}") from exc
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ModelLoadError(
            f"cannot load the base {what} {source!r}: it is not a local folder, and it was not "
            f"found in the Hugging Face cache ({HF_HUB_CACHE}) or could not be downloaded. "
            f"Download it first (`hf download {source}`) or pass a local folder with "
            f"--base /path/to/model. ({type(exc).__name__}: {exc})"
        ) from exc


def _tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _config(source: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source)


def _generation_config(source: str, config: Any) -> Any:
    """The generation config the model would load: its file, else one made from `config`."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: transformers derives one the same way
        return GenerationConfig.from_model_config(config)


def _model(source: str, torch_dtype: Any, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    # Any: transformers' decorated `to` confuses type checkers about its arguments
    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    model.to(device)
    model.eval()
    model.requires_grad_(False)  # inference only: no autograd bookkeeping
    return model


def _context_length(config: Any, requested: int | None) -> int:
    config = getattr(config, "text_config", None) or config
    native = next(
        (int(v) for f in _CONTEXT_FIELDS if isinstance(v := getattr(config, f, None), int)), None
    )
    if requested is not None:
        if native is not None and requested > native:
            logger.warning(
                "max_model_len %d exceeds the model's %d positions; output past them may degrade",
                requested,
                native,
            )
        return requested
    if native is None:
        logger.warning("model config names no context length; using %d", _FALLBACK_CONTEXT)
        return _FALLBACK_CONTEXT
    if native > MAX_CONTEXT_CAP:
        logger.info("capping the context at %d of the model's %d", MAX_CONTEXT_CAP, native)
        return MAX_CONTEXT_CAP
    return native


def _eos_token_ids(generation_config: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    for value in [*(configured if isinstance(configured, list) else [configured])]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    if isinstance(tokenizer.eos_token_id, int) and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)
