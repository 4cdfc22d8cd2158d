"""The file shares deploy writes to: what every provider's share offers (SyncTarget), a folder on
this machine as one (the local provider's, and a server's adapter root), and whole folders
swapped in and out of a share.

Servers scan their adapter root on a timer and take every folder holding adapter_config.json,
so a folder must never be seen half-written or half-deleted (an Azure Files upload even creates
a file at its full size before writing its bytes). Folders are therefore written under a hidden
name beside their place (servers skip dot-folders) and moved into place by renames, and a
removed folder is renamed aside before its files go.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

from tuneserve.deploy.atomic import replacing, write_atomic
from tuneserve.deploy.transfer import copy_chunks

Advance = Callable[[int], None]
FolderFiles = list[tuple[str, Path]]  # (posix path inside the folder, local file), in upload order


@dataclass(frozen=True)
class RemoteFile:
    size: int
    stamp: str  # the share's modification stamp (mtime_ns locally, last-write time on Azure)


class SyncTarget(Protocol):
    """A file share. Paths are POSIX, relative to the share's root."""

    def describe(self) -> str: ...
    def list_files(self, under: str = "") -> dict[str, RemoteFile]: ...
    def read_text(self, rel: str) -> str | None: ...
    def upload(self, src: Path, rel: str, advance: Advance) -> RemoteFile: ...
    def write_text(self, rel: str, text: str) -> None: ...
    def delete(self, rel: str) -> None: ...
    def delete_empty_dirs(self, rel: str) -> None: ...
    def rename_dir(self, rel: str, new_rel: str) -> None: ...

    def install_dir(self, rel: str, files: FolderFiles, advance: Advance) -> bool:
        """Put `files` at the folder `rel`, swapped in whole (a folder there before is replaced
        and deleted); True when one was there."""
        ...

    def remove_dir(self, rel: str) -> None:
        """Delete the folder `rel` and what it holds; it vanishes from scans at once."""
        ...


@runtime_checkable
class HashingTarget(Protocol):
    """A share that can hash one of its files (reading it: a download on a remote share).

    Optional: without it a share file that deploy did not upload is never taken to equal the
    workspace's, so it is kept (and reported) rather than adopted."""

    def sha256(self, rel: str) -> str | None: ...


@runtime_checkable
class SessionTarget(Protocol):
    """A share reached only inside a session (the Kubernetes sync pod): opened() starts it and
    ends it. Optional: other shares are reached at once."""

    def opened(self) -> contextlib.AbstractContextManager[Any]: ...


def session(target: SyncTarget) -> contextlib.AbstractContextManager[Any]:
    return target.opened() if isinstance(target, SessionTarget) else contextlib.nullcontext()


def file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def hidden_beside(rel: str, what: str) -> str:
    """A fresh hidden name in the folder of `rel` (what: "part", "old", "deleted")."""
    path = PurePosixPath(rel)
    return str(path.with_name(f".{path.name}.{secrets.token_hex(4)}.{what}"))


# --- any share, through its file calls --------------------------------------------------------


def install_by_renames(target: SyncTarget, rel: str, files: FolderFiles, advance: Advance) -> bool:
    """install_dir for a share that can rename folders (the old one is moved aside, the new one
    in; the folder is missing for an instant, never partial)."""
    replaced = bool(target.list_files(under=rel))
    staging = hidden_beside(rel, "part")
    try:
        for inner, src in files:
            target.upload(src, f"{staging}/{inner}", advance)
        if replaced:
            old = hidden_beside(rel, "old")
            target.rename_dir(rel, old)
            try:
                target.rename_dir(staging, rel)
            except BaseException:
                target.rename_dir(old, rel)
                raise
            delete_tree(target, old)
        else:
            target.delete_empty_dirs(rel)  # an empty folder of that name would block the move
            target.rename_dir(staging, rel)
    except BaseException:
        delete_tree(target, staging)
        raise
    return replaced


def remove_by_rename(target: SyncTarget, rel: str) -> None:
    """remove_dir for a share that can rename folders."""
    trash = hidden_beside(rel, "deleted")
    target.rename_dir(rel, trash)
    delete_tree(target, trash)


def delete_tree(target: SyncTarget, rel: str) -> None:
    for inner in target.list_files(under=rel):
        target.delete(inner)
    target.delete_empty_dirs(rel)


# --- a folder on this machine ----------------------------------------------------------------


def _discard(path: Path) -> None:
    """Delete a folder; a symlink is unlinked, never followed (what it leads to stays)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


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

    def upload(self, src: Path, rel: str, advance: Advance) -> RemoteFile:
        dest = self.root / rel
        with replacing(dest, mode=stat.S_IMODE(src.stat().st_mode)) as out:
            copy_chunks(src, out, advance)
        st = dest.stat()
        return RemoteFile(st.st_size, str(st.st_mtime_ns))

    def write_text(self, rel: str, text: str) -> None:
        write_atomic(self.root / rel, text)

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def sha256(self, rel: str) -> str | None:
        """The SHA-256 of a share file (None if it is not there): see HashingTarget."""
        try:
            return file_sha256(self.root / rel)
        except FileNotFoundError:
            return None

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

    def install_dir(self, rel: str, files: FolderFiles, advance: Advance) -> bool:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = self.root / hidden_beside(rel, "part")
        staging.mkdir()
        try:
            for inner, src in files:
                out = staging / inner
                out.parent.mkdir(parents=True, exist_ok=True)
                with out.open("wb") as fh:
                    copy_chunks(src, fh, advance)
                shutil.copymode(src, out)
            replaced = dest.exists() or dest.is_symlink()
            if replaced:
                old = self.root / hidden_beside(rel, "old")
                os.rename(dest, old)
                os.rename(staging, dest)
                _discard(old)
            else:
                os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return replaced

    def remove_dir(self, rel: str) -> None:
        trash = self.root / hidden_beside(rel, "deleted")
        os.rename(self.root / rel, trash)
        _discard(trash)
