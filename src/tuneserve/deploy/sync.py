"""Workspace -> share sync: upload only what changed (by size and SHA-256), with a progress bar.

The share keeps a manifest (`.tuneserve/manifest.json`: path -> size, sha256 and the share's own
modification stamp after upload), so a remote file is re-uploaded when its size, hash or stamp
differ from what we last wrote.

What is synced ("the inference code"): every file of the workspace except local state and
caches (EXCLUDED_DIRS, EXCLUDED_FILES) and the patterns of a `.tuneserveignore` file (one
fnmatch pattern per line, matched against the relative path and the file name), plus the
tuneserve build deploy adds under `.tuneserve-build/`.

Deletion: a file that an earlier sync uploaded (it is in the manifest) and that the workspace no
longer has is deleted from the share; files the share got some other way (the fine-tuning
step's adapters) are kept unless `prune=True`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

log = logging.getLogger(__name__)

MANIFEST = ".tuneserve/manifest.json"
EXCLUDED_DIRS = frozenset(
    {
        ".tuneserve",
        "infra",
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        "__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        "node_modules",
        ".ipynb_checkpoints",
        ".idea",
        ".vscode",
    }
)
EXCLUDED_FILES = frozenset({".DS_Store", "Thumbs.db", ".tuneserveignore"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".swp", ".tmp")
IGNORE_FILE = ".tuneserveignore"

Progress_ = Callable[[int], None]


@dataclass(frozen=True)
class RemoteFile:
    size: int
    stamp: str  # the share's modification stamp (mtime_ns locally, last-write time on Azure)


class SyncTarget(Protocol):
    """A file share. Paths are POSIX, relative to the share's root."""

    def describe(self) -> str: ...
    def list_files(self, under: str = "") -> dict[str, RemoteFile]: ...
    def read_text(self, rel: str) -> str | None: ...
    def upload(self, src: Path, rel: str, advance: Progress_) -> RemoteFile: ...
    def write_text(self, rel: str, text: str) -> None: ...
    def delete(self, rel: str) -> None: ...
    def delete_empty_dirs(self, rel: str) -> None: ...
    def rename_dir(self, rel: str, new_rel: str) -> None: ...


@dataclass
class SyncResult:
    uploaded: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0

    def summary(self) -> str:
        text = (
            f"{len(self.uploaded)} file(s) uploaded ({human_size(self.bytes_uploaded)}), "
            f"{self.unchanged} unchanged"
        )
        return text + (f", {len(self.deleted)} deleted" if self.deleted else "")


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --- what to sync ----------------------------------------------------------------------------


def _ignore_patterns(workspace: Path) -> list[str]:
    path = workspace / IGNORE_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def workspace_files(workspace: Path) -> dict[str, Path]:
    """The workspace's files that deploy syncs, as {relative posix path: path}."""
    patterns = _ignore_patterns(workspace)

    def ignored(rel: str, name: str) -> bool:
        return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)

    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(workspace, followlinks=True):
        here = Path(root)
        rel_root = here.relative_to(workspace).as_posix()
        prefix = "" if rel_root == "." else rel_root + "/"
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not ignored(prefix + d, d))
        for name in sorted(files):
            rel = prefix + name
            if name in EXCLUDED_FILES or name.endswith(EXCLUDED_SUFFIXES) or ignored(rel, name):
                continue
            if (here / name).is_file():
                found[rel] = here / name
    return found


# --- hashing, with a cache keyed by (size, mtime) --------------------------------------------


class HashCache:
    """SHA-256 of local files, remembered by (size, mtime_ns) in a JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._data: dict[str, list[object]] = {}
        if path is not None and path.exists():
            try:
                self._data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._data = {}

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        hit = self._data.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return str(hit[2])
        digest = file_sha256(path)
        self._data[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._data), encoding="utf-8")
        os.replace(tmp, self.path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- the sync --------------------------------------------------------------------------------


def sync(
    sources: dict[str, Path],
    target: SyncTarget,
    *,
    hash_cache: HashCache | None = None,
    prune: bool = False,
    keep: Iterable[str] = (),
    console: Console | None = None,
) -> SyncResult:
    """Upload the files of `sources` ({share path: local file}) that differ on `target`."""
    cache = hash_cache or HashCache(None)
    remote = target.list_files()
    manifest = _read_manifest(target)
    result = SyncResult()
    todo: list[tuple[str, Path, int, str]] = []
    for rel, path in sorted(sources.items()):
        size = path.stat().st_size
        digest = cache.sha256(path)
        have, known = remote.get(rel), manifest.get(rel)
        same = (
            have is not None
            and known is not None
            and have.size == size
            and known.get("size") == size
            and known.get("sha256") == digest
            and known.get("stamp") == have.stamp
        )
        if same:
            result.unchanged += 1
        else:
            todo.append((rel, path, size, digest))
    total = sum(size for _, _, size, _ in todo)
    console = console or Console(stderr=True)
    with Progress(
        TextColumn("[bold]sync[/] {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal or not todo,
        transient=True,
    ) as progress:
        task = progress.add_task(f"-> {target.describe()}", total=total or 1)
        for rel, path, size, digest in todo:
            progress.update(task, description=rel[-40:])
            stat = target.upload(path, rel, lambda n: progress.advance(task, n))
            manifest[rel] = {"size": size, "sha256": digest, "stamp": stat.stamp}
            result.uploaded.append(rel)
            result.bytes_uploaded += size
            log.debug("uploaded %s (%d bytes)", rel, size)
    # files we uploaded before that the workspace no longer has; with prune, any other file too
    stale = set(remote) - set(sources) - {MANIFEST}
    if not prune:
        stale &= set(manifest)
    for rel in sorted(stale):
        if any(rel == k or rel.startswith(k.rstrip("/") + "/") for k in keep):
            continue
        target.delete(rel)
        manifest.pop(rel, None)
        result.deleted.append(rel)
    for rel in list(manifest):
        if rel not in sources and rel not in remote:
            manifest.pop(rel)
    target.write_text(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    cache.save()
    return result


def _read_manifest(target: SyncTarget) -> dict[str, dict[str, object]]:
    text = target.read_text(MANIFEST)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        log.warning("ignoring a malformed %s on the share", MANIFEST)
        return {}
    return data if isinstance(data, dict) else {}


# --- a directory as the share (the local provider) -------------------------------------------


class LocalDirTarget:
    """A folder standing in for the file share. Files are replaced atomically (write to a
    temporary file, then rename), so hard-linked revision snapshots never see a change."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def list_files(self, under: str = "") -> dict[str, RemoteFile]:
        """Every file (or those below the folder `under`), by path relative to the share."""
        out: dict[str, RemoteFile] = {}
        top = self.root / under if under else self.root
        if not top.is_dir():
            return out
        for root, _dirs, files in os.walk(top):
            for name in files:
                path = Path(root) / name
                st = path.stat()
                rel = path.relative_to(self.root).as_posix()
                out[rel] = RemoteFile(st.st_size, str(st.st_mtime_ns))
        return out

    def read_text(self, rel: str) -> str | None:
        try:
            return (self.root / rel).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def upload(self, src: Path, rel: str, advance: Progress_) -> RemoteFile:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
                while chunk := inp.read(1 << 20):
                    out.write(chunk)
                    advance(len(chunk))
            shutil.copymode(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        st = dest.stat()
        return RemoteFile(st.st_size, str(st.st_mtime_ns))

    def write_text(self, rel: str, text: str) -> None:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, dest)

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def rename_dir(self, rel: str, new_rel: str) -> None:
        """Move a folder (new_rel must not exist; its parent must)."""
        os.rename(self.root / rel, self.root / new_rel)

    def delete_empty_dirs(self, rel: str) -> None:
        """Remove the folder `rel` and its subfolders where they hold no file."""
        top = self.root / rel
        if not top.is_dir():
            return
        for root, _dirs, _files in os.walk(top, topdown=False):
            with contextlib.suppress(OSError):  # not empty: a file is left there
                Path(root).rmdir()
