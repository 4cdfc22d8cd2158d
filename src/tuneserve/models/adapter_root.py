"""The adapter root: the one folder adapters may be loaded from at runtime.

On a deployment it is the share's `models/` folder (every replica mounts the same share), so
the set of adapter folders under it is the set every replica serves. A path given to the admin
API is resolved inside it; `..`, an absolute path elsewhere and a symlink that leads out are
refused, so an API key holder cannot make the server read arbitrary files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tuneserve.errors import TuneserveError
from tuneserve.models.adapters import CONFIG_FILE, WEIGHT_FILES, gguf_refusal
from tuneserve.models.workspace import find_adapters

# What an adapter name may be: it is a `model` id in requests and a folder name on the share.
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(NAME_PATTERN)

Fingerprint = tuple[tuple[str, int, int, int], ...]


class AdapterPathError(TuneserveError):
    """A path given for an adapter is not usable (outside the root, missing, not an adapter)."""


def check_adapter_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r} is not accepted: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter, digit or '_'"
        )
    return name


@dataclass(frozen=True)
class AdapterRoot:
    path: Path  # absolute and resolved

    @classmethod
    def at(cls, folder: Path) -> AdapterRoot:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise AdapterPathError(f"adapter root {folder} is not a folder")
        return cls(folder.resolve())

    def contains(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.path)

    def resolve(self, given: str) -> Path:
        """The adapter folder `given` names: relative to the root, or absolute inside it."""
        if not given.strip():
            raise AdapterPathError("the path is empty; give a folder inside the adapter root")
        raw = Path(given).expanduser()
        if ".." in raw.parts:
            raise AdapterPathError(
                f"path {given!r} contains '..'; give a folder inside the adapter root {self.path}"
            )
        candidate = raw if raw.is_absolute() else self.path / raw
        if not candidate.absolute().is_relative_to(self.path):
            raise AdapterPathError(f"path {given!r} is outside the adapter root {self.path}")
        # Resolving follows symlinks: one inside the root that leads out of it is refused too.
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.path):
            raise AdapterPathError(
                f"path {given!r} leads to {resolved}, outside the adapter root {self.path} "
                "(through a symlink)"
            )
        refusal = gguf_refusal(resolved)
        if refusal is not None:
            raise AdapterPathError(refusal)
        if not resolved.is_dir():
            raise AdapterPathError(
                f"no folder at {given!r} in the adapter root {self.path}; an adapter folder "
                f"holds {CONFIG_FILE} and {WEIGHT_FILES[0]}"
            )
        if not (resolved / CONFIG_FILE).is_file():
            raise AdapterPathError(
                f"{resolved} holds no {CONFIG_FILE}: it is not an adapter folder (written by "
                "PeftModel.save_pretrained)"
            )
        return resolved

    def scan(self) -> dict[str, Path]:
        """{name: folder} of every adapter folder under the root; a top-level folder NAME
        holding the adapter is named NAME. Folders reached through a symlink out of the root
        are left out."""
        if not self.path.is_dir():
            return {}
        found = find_adapters(self.path)
        return {name: folder for name, folder in found.items() if self.contains(folder)}


def fingerprint(folder: Path) -> Fingerprint:
    """Changes whenever the adapter's files are rewritten or replaced: size, modification time
    and change time (a folder copied in with its times kept, `cp -p` or `copytree`, may match
    the old one's sizes and modification times, and even reuse its freed inodes; the change
    time is the kernel's and cannot be set back)."""
    stamps = []
    for name in (CONFIG_FILE, *WEIGHT_FILES):
        try:
            stat = (folder / name).stat()
        except OSError:
            continue
        stamps.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
    return tuple(stamps)
