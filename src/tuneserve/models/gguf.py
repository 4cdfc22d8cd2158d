"""GGUF bases: what Ollama and llama.cpp users already have, served like any other base.

A `.gguf` file (or a folder holding exactly one) is converted once into a transformers folder in
the cache — weights dequantized to float32 safetensors, the tokenizer and chat template read from
the file — keyed by the file's SHA-256, so a changed file is converted again and an unchanged one
loads in about a second. transformers does the reading (`from_pretrained(..., gguf_file=...)`,
with the `gguf` package); PEFT adapters trained on the same base apply to the converted model as
to any other.

    <cache_dir>/gguf/<sha256[:16]>/   config.json, model.safetensors, tokenizer files, source.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneserve.errors import ModelLoadError

logger = logging.getLogger(__name__)

SUFFIX = ".gguf"
SOURCE_FILE = "source.json"  # what was converted: the file's name, size and SHA-256
_HASH_CHUNK = 1 << 20
_EXPECTED = "expected a GGUF model file as llama.cpp or Ollama write it"
# llama.cpp's names for architectures transformers spells otherwise (its GGUF loader maps them
# the same way before checking its list).
_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one `.gguf` in a folder that is not
    already a transformers model folder. None when `path` is no GGUF base."""
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelLoadError(
            f"base model folder {path} holds several GGUF files ({names}); pass one of them "
            f"with --base {path}/<file>.gguf"
        )
    return found[0] if found else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def converted_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where the conversion of `gguf` lives (it may not exist yet)."""
    return _converted_dir(file_sha256(gguf), cache_dir)


def _converted_dir(sha256: str, cache_dir: Path) -> Path:
    return Path(cache_dir).expanduser() / "gguf" / sha256[:16]


def ensure_converted(
    gguf: Path,
    cache_dir: Path,
    *,
    on_stage: Callable[[str], None] | None = None,
) -> Path:
    """The transformers folder of `gguf`, converting it first if the cache has none.

    `on_stage` hears each stage of a conversion ("reading the tokenizer and chat template"...).
    Raises ModelLoadError naming the file when it is not a GGUF transformers can read (empty,
    corrupt, truncated, or of an architecture transformers does not support)."""
    gguf = gguf.expanduser().absolute()
    try:
        sha256 = file_sha256(gguf)
    except OSError as exc:
        raise ModelLoadError(f"cannot read the GGUF file {gguf}: {exc}") from None
    dest = _converted_dir(sha256, cache_dir)  # hashed once: the file may be gigabytes
    if (dest / SOURCE_FILE).is_file():
        return dest
    logger.info("converting %s (once) into %s", gguf, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _convert(gguf, work, on_stage or (lambda stage: None))
        source = {"file": gguf.name, "size": gguf.stat().st_size, "sha256": sha256}
        (work / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(work, dest)  # atomic: a half-converted folder is never found
        except OSError:  # another process converted it meanwhile
            if not (dest / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("converted %s into %s", gguf, dest)
    return dest


def check_header(gguf: Path) -> None:
    """Read the file's header and tensor table so that an empty, corrupt or truncated file, or
    one of an architecture transformers does not read, is reported as such.

    Called once transformers has failed on the file, to say why in the user's terms: not
    before, since reading the header costs seconds on a good file (the tokenizer's arrays are
    parsed one item at a time) and transformers reads it again anyway."""
    if gguf.stat().st_size == 0:
        raise ModelLoadError(f"{gguf} is empty (0 bytes): {_EXPECTED}")
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelLoadError(
            f"{gguf}: reading GGUF files needs the 'gguf' package: pip install gguf ({exc})"
        ) from None
    try:
        reader = GGUFReader(str(gguf))
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... alike
        raise ModelLoadError(
            f"{gguf} is not a readable GGUF file (corrupt or truncated?): {_EXPECTED} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    architecture = _architecture(reader)
    supported = _supported_architectures()
    if supported is not None and _ALIASES.get(architecture, architecture) not in supported:
        raise ModelLoadError(
            f"{gguf}: transformers cannot load GGUF models of architecture {architecture!r}; "
            f"it reads {', '.join(sorted(supported))}. Serve the original (safetensors) model "
            "folder instead"
        )


def _architecture(reader: Any) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        return "(none given)"
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _supported_architectures() -> set[str] | None:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # another transformers layout: its own error message has to do
        return None
    # The list is the keys of transformers' config mapping: two of them are no architecture.
    return set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}


def _convert(gguf: Path, dest: Path, on_stage: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        on_stage("reading the tokenizer and chat template")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        on_stage("dequantizing the weights")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises ValueError, KeyError, struct.error... alike
        check_header(gguf)  # raises the clearer error when the file itself is the cause
        raise ModelLoadError(
            f"cannot convert {gguf}: transformers could not read it ({type(exc).__name__}: {exc})"
        ) from exc
    on_stage("saving the converted model")
    # The weights are plain floats now: saved as such, with no trace of the GGUF quantizer
    # (save_pretrained refuses a model "quantized with gguf", and llama.cpp's converters refuse
    # a config that still names it).
    model.hf_quantizer = None  # type: ignore[assignment]  # typed as a module attribute
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
