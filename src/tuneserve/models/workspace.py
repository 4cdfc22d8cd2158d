"""Find the base model and adapters in an AI Toolkit (VS Code) workspace.

The layout its fine-tuning template leaves on the share:

    <root>/model-cache/<org>/<model>/config.json             the base model (or <name>.gguf)
    <root>/models/qlora/qlora/gpu_model/adapter/adapter_config.json  an adapter (any depth)
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

from tuneserve.errors import WorkspaceError
from tuneserve.models.gguf import SUFFIX as GGUF_SUFFIX

logger = logging.getLogger(__name__)

MODEL_CACHE = "model-cache"
MODELS = "models"
# Path parts that say nothing about which adapter it is (Olive/AI Toolkit output folders).
GENERIC_PARTS = frozenset(
    {"adapter", "adapters", "gpu_model", "cpu_model", "model", "models", "output", "outputs"}
)
_MAX_BASE_DEPTH = 3  # model-cache/<org>/<model>, or a flat model-cache/<model>
_MAX_ADAPTER_DEPTH = 8  # models/qlora/qlora/gpu_model/adapter is 4 deep


def discover_workspace(root: Path) -> tuple[Path, dict[str, Path]]:
    """Return (base model folder, {adapter name: adapter folder}) found under `root`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise WorkspaceError(f"workspace folder {root} does not exist")
    base = _find_base(root)
    adapters = _find_adapters(root)
    logger.info(
        "workspace %s: base %s, adapters %s",
        root,
        base,
        ", ".join(f"{n}={p}" for n, p in adapters.items()) or "(none)",
    )
    return base, adapters


def _find_base(root: Path) -> Path:
    cache = root / MODEL_CACHE
    if not cache.is_dir():
        raise WorkspaceError(
            f"{root} is not an AI Toolkit workspace: it has no {MODEL_CACHE}/ folder (expected "
            f"the base model in {MODEL_CACHE}/<org>/<model>/). Pass the base model with --base."
        )
    candidates = sorted(_model_folders(cache, depth=_MAX_BASE_DEPTH))
    if not candidates:
        raise WorkspaceError(
            f"no base model in {cache}: expected a folder {MODEL_CACHE}/<org>/<model>/ holding "
            "config.json or a .gguf file. Pass the base model with --base."
        )
    if len(candidates) > 1:
        listed = "\n  ".join(str(c) for c in candidates)
        raise WorkspaceError(
            f"{cache} holds {len(candidates)} models; choose one with --base:\n  {listed}"
        )
    return candidates[0]


def _model_folders(folder: Path, depth: int) -> list[Path]:
    """Folders holding config.json (or a .gguf file: the loader converts it), not looking inside
    one once found (a model's subfolders)."""
    found: list[Path] = []
    for child in sorted(folder.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        holds_model = (child / "config.json").is_file() or any(
            p.suffix.lower() == GGUF_SUFFIX for p in child.iterdir()
        )
        if holds_model and not (child / "adapter_config.json").is_file():
            found.append(child)
        elif depth > 1:
            found.extend(_model_folders(child, depth - 1))
    return found


def _find_adapters(root: Path) -> dict[str, Path]:
    models = root / MODELS
    if not models.is_dir():
        logger.warning("workspace %s has no %s/ folder: serving the base model alone", root, MODELS)
        return {}
    found = find_adapters(models)
    if not found:
        logger.warning("no adapter (a folder holding adapter_config.json) under %s", models)
    return found


def find_adapters(folder: Path) -> dict[str, Path]:
    """{name: adapter folder} for every adapter folder under `folder` (named by adapter_names)."""
    folders = sorted(_adapter_folders(folder, depth=_MAX_ADAPTER_DEPTH))
    return adapter_names(folders, relative_to=folder)


def _adapter_folders(folder: Path, depth: int) -> list[Path]:
    """Folders holding adapter_config.json. Symlinks are followed (shares often use them);
    the depth limit guards against link cycles."""
    found = [folder] if (folder / "adapter_config.json").is_file() else []
    if depth > 0:
        try:
            children = sorted(folder.iterdir())
        except OSError:  # removed or unreadable while we walk a live share: not an adapter
            return found
        for child in children:
            if child.is_dir() and not child.name.startswith("."):
                found.extend(_adapter_folders(child, depth - 1))
    return found


def adapter_names(folders: list[Path], *, relative_to: Path) -> dict[str, Path]:
    """Readable, unique names from the adapters' paths: models/qlora/qlora/gpu_model/adapter
    -> "qlora". Names that clash fall back to the whole path, then get a number."""
    relative = {folder: folder.relative_to(relative_to).parts for folder in folders}
    short = {folder: _name(parts, drop_generic=True) for folder, parts in relative.items()}
    full = {folder: _name(parts, drop_generic=False) for folder, parts in relative.items()}
    short_counts = Counter(short.values())
    full_counts = Counter(full.values())
    named: dict[str, Path] = {}
    for folder in folders:
        name = short[folder]
        if short_counts[name] > 1 and full_counts[full[folder]] == 1:
            name = full[folder]
        unique, n = name, 2
        while unique in named:
            unique, n = f"{name}-{n}", n + 1
        named[unique] = folder
    return dict(sorted(named.items()))


def _name(parts: tuple[str, ...], *, drop_generic: bool) -> str:
    kept: list[str] = []
    for part in parts:
        if drop_generic and part.lower() in GENERIC_PARTS:
            continue
        if not kept or kept[-1] != part:  # qlora/qlora -> qlora
            kept.append(part)
    cleaned = [re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-") for part in kept]
    return "-".join(part for part in cleaned if part) or "adapter"
