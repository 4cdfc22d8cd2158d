"""Workspace -> share sync: upload only what changed (by size and SHA-256), with a progress bar.

The share keeps a manifest (`.tuneserve/manifest.json`: path -> size, sha256 and the share's own
modification stamp after upload). A share file is *ours* while the manifest has it and the share
still holds those bytes (same size and stamp; when only the stamp moved, the share's SHA-256 is
compared). Only our files are overwritten or deleted.

What is synced ("the inference code"): every file of the workspace except local state and
caches (EXCLUDED_DIRS, EXCLUDED_FILES) and the patterns of a `.tuneserveignore` file (one
fnmatch pattern per line, matched against the relative path and the file name), plus the
tuneserve build deploy adds under `.tuneserve-build/`.

Files the share got some other way (the fine-tuning step writes its adapters to models/ on the
same share; `tuneserve adapters push`; a hand upload) are never overwritten or deleted unless
`force=True`: where the workspace has a different file at the same path, the share's is kept
and the sync says so. Where the workspace's file is byte-identical (the same adapter downloaded),
it is adopted into the manifest silently.

model-cache/ (the base model in the AI Toolkit layout, gigabytes) is not uploaded, overwritten or
deleted unless `include_model_cache=True`; the sync says how much it left out, and refuses when
the share has no base model at all while the workspace has one (the replicas could not start).
By default (`include_model_cache=None`) a first deploy to a share without a base model uploads
the workspace's when it is at most AUTO_MODEL_CACHE_BYTES (a demo, a small model: the simplest
path works), saying so with its size; a larger one must be asked for.

Deletion: a file that an earlier sync uploaded and that the workspace no longer has is deleted
from the share; every other file is kept unless `prune=True`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tuneserve.deploy.atomic import write_atomic
from tuneserve.deploy.shares import HashingTarget, RemoteFile, SyncTarget, file_sha256
from tuneserve.deploy.transfer import transfer_progress
from tuneserve.errors import DeployError
from tuneserve.models.workspace import MODEL_CACHE

log = logging.getLogger(__name__)

MANIFEST = ".tuneserve/manifest.json"
# model-cache/ up to this size is uploaded unasked to a share that has no base model yet.
AUTO_MODEL_CACHE_BYTES = 1 << 30
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


@dataclass
class SyncResult:
    uploaded: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    # share files deploy did not upload (or that changed there since), left as they are
    kept: list[str] = field(default_factory=list)
    # share files identical to the workspace's that deploy had not uploaded: now in the manifest
    adopted: list[str] = field(default_factory=list)
    # share files deploy had not uploaded, overwritten or deleted because of force=True
    replaced: list[str] = field(default_factory=list)
    # model-cache/ files not uploaded (include_model_cache=False) and their size
    held_back: list[str] = field(default_factory=list)
    bytes_held_back: int = 0

    def summary(self) -> str:
        text = (
            f"{len(self.uploaded)} file(s) uploaded ({human_size(self.bytes_uploaded)}), "
            f"{self.unchanged} unchanged"
        )
        if self.deleted:
            text += f", {len(self.deleted)} deleted"
        if self.kept:
            text += f", {len(self.kept)} kept on the share (--force replaces them)"
        if self.held_back:
            text += f", {MODEL_CACHE}/ not uploaded ({human_size(self.bytes_held_back)})"
        return text


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
        write_atomic(self.path, json.dumps(self._data))


# --- the sync --------------------------------------------------------------------------------


def sync(
    sources: dict[str, Path],
    target: SyncTarget,
    *,
    hash_cache: HashCache | None = None,
    prune: bool = False,
    keep: Iterable[str] = (),
    force: bool = False,
    include_model_cache: bool | None = None,
    console: Console | None = None,
) -> SyncResult:
    """Upload the files of `sources` ({share path: local file}) that differ on `target`.

    force: also overwrite (and delete) share files that deploy did not upload itself.
    include_model_cache: also upload model-cache/ (False: nothing under it is touched; None:
    uploaded when the share has no base model and it is at most AUTO_MODEL_CACHE_BYTES).
    Raises DeployError, before anything is uploaded, when model-cache/ is left out but the share
    has no base model there and the workspace has one."""
    cache = hash_cache or HashCache(None)
    console = console or Console(stderr=True)
    remote = target.list_files()
    manifest = _read_manifest(target)
    owner = _Ownership(target, remote, manifest)
    result = SyncResult()
    refuse = include_model_cache is None  # left out by default, not by the user's choice
    if include_model_cache is None:
        include_model_cache = _first_small_base_model(sources, remote, console)
    held = {} if include_model_cache else {r: p for r, p in sources.items() if _in_model_cache(r)}
    if held:
        _hold_back_model_cache(held, target, remote, owner, cache, result, console, refuse)
    kept: list[tuple[str, str]] = []  # (path, why)
    todo: list[tuple[str, Path, int, str]] = []
    for rel, path in sorted(sources.items()):
        if rel in held:
            continue
        size = path.stat().st_size
        digest = cache.sha256(path)
        have = remote.get(rel)
        if have is None:  # new on the share
            todo.append((rel, path, size, digest))
        elif owner.ours(rel):
            known = manifest[rel]
            if (
                not known.get("pending")
                and known.get("size") == size
                and known.get("sha256") == digest
            ):
                result.unchanged += 1
            else:
                todo.append((rel, path, size, digest))
        elif have.size == size and owner.remote_sha256(rel) == digest:
            # the very file the workspace has (an adapter downloaded from the share): ours now
            manifest[rel] = {"size": size, "sha256": digest, "stamp": have.stamp}
            result.adopted.append(rel)
            result.unchanged += 1
            log.debug("adopted %s: the share's copy equals the workspace's", rel)
        elif force:
            todo.append((rel, path, size, digest))
            result.replaced.append(rel)
        else:
            manifest.pop(rel, None)  # whatever we once uploaded there is gone: not ours now
            kept.append(
                (rel, f"share {human_size(have.size)}, workspace {human_size(size)}")
                if have.size != size
                else (rel, "same size, other content")
            )

    total = sum(size for _, _, size, _ in todo)
    if todo:
        models = sum(size for rel, _, size, _ in todo if _in_model_cache(rel))
        console.print(
            f"  uploading {len(todo)} file(s) ({human_size(total)}"
            + (f", {MODEL_CACHE}/ {human_size(models)} of it" if models else "")
            + ")"
        )
        # mark them first: a sync cut short leaves files that the next one knows are its own
        for rel, _path, size, digest in todo:
            manifest[rel] = {"size": size, "sha256": digest, "stamp": None, "pending": True}
        _write_manifest(target, manifest)
    with transfer_progress(console, total, "[bold]sync[/]", show=bool(todo)) as transfer:
        for rel, path, size, digest in todo:
            transfer.moving(rel[-40:])
            stat = target.upload(path, rel, transfer.advance)
            manifest[rel] = {"size": size, "sha256": digest, "stamp": stat.stamp}
            result.uploaded.append(rel)
            result.bytes_uploaded += size
            log.debug("uploaded %s (%d bytes)", rel, size)

    # files we uploaded before that the workspace no longer has; with prune, any other file too
    kept_prefixes = [k.rstrip("/") + "/" for k in keep]
    for rel in sorted(set(remote) - set(sources) - {MANIFEST}):
        if any(rel == k[:-1] or rel.startswith(k) for k in kept_prefixes):
            continue
        if _in_model_cache(rel) and not include_model_cache:
            continue  # the base model on the share is not ours to change unless asked
        if prune or owner.ours(rel):
            pass
        elif rel not in manifest:
            continue  # never ours: the fine-tuning step's, a pushed adapter, ...
        elif force:
            result.replaced.append(rel)
        else:
            # left in the manifest, so the next deploy says it again and --force still deletes it
            kept.append((rel, "changed on the share since deploy uploaded it; not deleted"))
            continue
        target.delete(rel)
        manifest.pop(rel, None)
        result.deleted.append(rel)
    for rel in list(manifest):
        if rel not in sources and rel not in remote:
            manifest.pop(rel)
    _write_manifest(target, manifest)
    cache.save()
    result.kept = [rel for rel, _ in kept]
    _report(result, kept, target, console)
    return result


def _in_model_cache(rel: str) -> bool:
    return rel == MODEL_CACHE or rel.startswith(MODEL_CACHE + "/")


def base_models(paths: Iterable[str]) -> list[str]:
    """The folders under model-cache/ that hold a base model (config.json, no
    adapter_config.json), up to 3 levels deep as the workspace discovery looks."""
    files = set(paths)
    found: set[str] = set()
    for rel in files:
        parts = rel.split("/")
        if parts[0] != MODEL_CACHE or parts[-1] != "config.json" or not 3 <= len(parts) <= 5:
            continue
        if any(p.startswith(".") for p in parts[1:-1]):
            continue
        folder = "/".join(parts[:-1])
        if f"{folder}/adapter_config.json" not in files:
            found.add(folder)
    return sorted(found)


class _Ownership:
    """Which share files deploy uploaded itself (and still holds the bytes it uploaded)."""

    def __init__(
        self,
        target: SyncTarget,
        remote: dict[str, RemoteFile],
        manifest: dict[str, dict[str, object]],
    ) -> None:
        self.target, self.remote, self.manifest = target, remote, manifest
        self._hashes: dict[str, str | None] = {}

    def remote_sha256(self, rel: str) -> str | None:
        """The share's SHA-256 of `rel`, None where the target cannot tell."""
        if rel not in self._hashes:
            digest = None
            if isinstance(self.target, HashingTarget):
                digest = self.target.sha256(rel)
            self._hashes[rel] = digest
        return self._hashes[rel]

    def ours(self, rel: str, *, read: bool = True) -> bool:
        """True where the manifest has `rel` and the share still holds what deploy uploaded
        (read=False: without reading the share's bytes when only the stamp moved)."""
        known, have = self.manifest.get(rel), self.remote.get(rel)
        if known is None or have is None:
            return False
        if known.get("pending"):  # an upload of ours that was cut short
            return True
        if known.get("size") != have.size:
            return False
        if known.get("stamp") == have.stamp:
            return True
        # the stamp moved: a touch or a copy that kept the bytes, or someone else's new file
        digest = self.remote_sha256(rel) if read else None
        if digest is not None and digest == known.get("sha256"):
            known["stamp"] = have.stamp
            return True
        return False


def _first_small_base_model(
    sources: dict[str, Path], remote: dict[str, RemoteFile], console: Console
) -> bool:
    """Whether to upload model-cache/ unasked: the share has no base model, the workspace has
    one, and it is small enough that uploading it is the expected thing."""
    mine = {rel: path for rel, path in sources.items() if _in_model_cache(rel)}
    bases = base_models(mine)
    if not bases or base_models(remote):
        return False
    size = sum(path.stat().st_size for path in mine.values())
    if size > AUTO_MODEL_CACHE_BYTES:
        return False
    console.print(
        f"  the share has no base model yet: uploading {', '.join(bases)} ({human_size(size)}; "
        f"--no-model-cache leaves {MODEL_CACHE}/ out)",
        markup=False,
        highlight=False,
    )
    return True


def _hold_back_model_cache(
    held: dict[str, Path],
    target: SyncTarget,
    remote: dict[str, RemoteFile],
    owner: _Ownership,
    cache: HashCache,
    result: SyncResult,
    console: Console,
    refuse: bool,
) -> None:
    """model-cache/ is left out: say how much; where the share has no base model, refuse (or,
    when the user chose to leave it out, warn)."""
    for rel, path in sorted(held.items()):
        have, size = remote.get(rel), path.stat().st_size
        known = owner.manifest.get(rel)
        same = (
            have is not None
            and have.size == size
            and known is not None
            and not known.get("pending")
            and owner.ours(rel, read=False)  # no download of gigabytes for a message
            and known.get("sha256") == cache.sha256(path)
        )
        if not same:
            result.held_back.append(rel)
            result.bytes_held_back += size
    if not result.held_back:
        return
    shown = human_size(result.bytes_held_back)
    share_bases, workspace_bases = base_models(remote), base_models(held)
    if workspace_bases and not share_bases:
        problem = (
            f"the share {target.describe()} has no base model under {MODEL_CACHE}/, so the "
            f"replicas would not find one. The workspace's {', '.join(workspace_bases)} "
            f"({MODEL_CACHE}/: {shown})"
        )
        if refuse:
            raise DeployError(
                f"{problem} is uploaded only when asked (unasked up to "
                f"{human_size(AUTO_MODEL_CACHE_BYTES)}): run 'tuneserve deploy "
                f"--include-model-cache' (or add '{MODEL_CACHE}' to {IGNORE_FILE} if the "
                "replicas get the base model some other way)"
            )
        console.print(f"[yellow]warning:[/] {problem} is left out (--no-model-cache)")
        return
    where = (
        f"the share already has {', '.join(share_bases)}"
        if share_bases
        else "the workspace has no base model there either"
    )
    console.print(
        f"  {MODEL_CACHE}/ ({shown}, {len(result.held_back)} file(s) not on the share as they "
        f"are here) not uploaded: {where}; pass --include-model-cache to upload it",
        markup=False,
        highlight=False,
    )


def _report(
    result: SyncResult, kept: list[tuple[str, str]], target: SyncTarget, console: Console
) -> None:
    """Say what was kept on the share (a warning: the replicas serve the share's file, not the
    workspace's) and what force replaced."""
    if kept:
        # escaped: a path like models/[v2]/... is not Rich markup
        shown = [escape(f"    {rel} ({why})") for rel, why in kept[:_LIST_AT_MOST]]
        if len(kept) > _LIST_AT_MOST:
            shown.append(f"    ... and {len(kept) - _LIST_AT_MOST} more")
        console.print(
            f"[yellow]warning:[/] kept {len(kept)} file(s) on {escape(target.describe())} that "
            "deploy "
            "did not upload (the fine-tuning step's outputs, 'tuneserve adapters push', or "
            "changed on the share since); the replicas use the share's copies, not the "
            "workspace's:\n" + "\n".join(shown) + "\n  'tuneserve deploy --force' replaces them "
            "with the workspace's (and deletes those the workspace no longer has).",
            markup=True,
            highlight=False,
        )
        log.info("kept %d share file(s) that deploy did not upload", len(kept))
    if result.replaced:
        listed = ", ".join(result.replaced[:_LIST_AT_MOST])
        more = len(result.replaced) - _LIST_AT_MOST
        console.print(
            f"  --force: replaced {len(result.replaced)} share file(s) that deploy had not "
            f"uploaded: {listed}" + (f" and {more} more" if more > 0 else ""),
            markup=False,
            highlight=False,
        )


_LIST_AT_MOST = 10


def _write_manifest(target: SyncTarget, manifest: dict[str, dict[str, object]]) -> None:
    target.write_text(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


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
