"""Adapters at runtime, the client side: put an adapter folder where the servers look for one, or
take it away, and tell each replica through its admin API (`/v1/adapters`).

Where the folder goes:
- a deployment (`--workspace`): the provider's file share, at `models/NAME/` (the replicas'
  adapter root: /mount/models on Azure; the local provider points its replicas at the live
  share's models/ folder);
- running servers (`--url`): `ROOT/NAME`, ROOT being the adapter root the first server reports,
  when that folder is on this machine.

Servers list every folder holding adapter_config.json under their root, on a timer too, so the
folder is swapped in and out whole (the share's install_dir / remove_dir, deploy/shares.py). A
replaced adapter keeps serving during the upload; a rescan landing between the two renames of
the swap unloads it until the load each replica is told to do right after.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlparse

import httpx
from rich.console import Console

from tuneserve.deploy.base import Provider
from tuneserve.deploy.shares import LocalDirTarget, SyncTarget, session
from tuneserve.deploy.transfer import Advance, transfer_progress
from tuneserve.errors import AdapterError, DeployError
from tuneserve.models.adapter_root import check_adapter_name
from tuneserve.models.adapters import CONFIG_FILE, WEIGHT_FILES, read_adapter_config
from tuneserve.models.workspace import MODELS as ADAPTERS_DIR

DEFAULT_TIMEOUT_S = 120.0  # loading an adapter is a disk read plus a check; a cold replica is slow


class AdaptersError(DeployError):
    """`tuneserve adapters` cannot do what was asked (bad name, URL, nowhere to put a folder)."""


class ReplicaError(AdaptersError):
    """A replica did not answer, or refused a call of its admin API."""


# --- the adapter folder ----------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterFolder:
    path: Path
    files: list[tuple[str, Path]]  # (posix path inside the folder, file); adapter_config.json last
    size: int


def check_name(name: str) -> str:
    try:
        return check_adapter_name(name)
    except ValueError as exc:
        raise AdaptersError(str(exc)) from None


def check_adapter_folder(name: str, path: Path) -> AdapterFolder:
    """The files to copy, or AdapterError when `path` is not a PEFT LoRA adapter folder."""
    path = Path(path).expanduser()
    wanted = f"{CONFIG_FILE} and {WEIGHT_FILES[0]}, as PeftModel.save_pretrained writes them"
    if not path.is_dir():
        raise AdapterError(name, f"{path} is not a folder; pass an adapter folder holding {wanted}")
    present = sorted(p.name for p in path.iterdir())
    if len(present) > 8:
        present = [*present[:8], f"... ({len(present) - 8} more)"]
    missing = [f for f in (CONFIG_FILE,) if not (path / f).is_file()]
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        missing.append(WEIGHT_FILES[0])
    if missing:
        raise AdapterError(
            name,
            f"{path} is not an adapter folder: {' and '.join(missing)} missing (it holds: "
            f"{', '.join(present) or 'nothing'}); an adapter folder holds {wanted}",
        )
    config = path / CONFIG_FILE
    read_adapter_config(name, config)  # AdapterError naming the field, line or column
    files: list[tuple[str, Path]] = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for file_name in sorted(names):
            file = Path(root) / file_name
            rel = file.relative_to(path).as_posix()
            if not file_name.startswith(".") and file.is_file() and rel != CONFIG_FILE:
                files.append((rel, file))
    files.append((CONFIG_FILE, config))
    return AdapterFolder(path, files, sum(f.stat().st_size for _, f in files))


# --- where the folder goes ------------------------------------------------------------------


def _is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path != root and path.is_relative_to(root)


def share_folder(name: str) -> str:
    return f"{ADAPTERS_DIR}/{name}"


def share_has_adapter(target: SyncTarget, rel_folder: str) -> bool:
    return f"{rel_folder}/{CONFIG_FILE}" in target.list_files(under=rel_folder)


def install(target: SyncTarget, adapter: AdapterFolder, rel_folder: str, advance: Advance) -> bool:
    """Put the adapter at `rel_folder` of the share, swapped in whole; True when it replaced a
    previous one. A folder there that is not an adapter is refused, not replaced."""
    existing = target.list_files(under=rel_folder)
    if existing and f"{rel_folder}/{CONFIG_FILE}" not in existing:
        raise AdaptersError(
            f"{target.describe()}/{rel_folder} exists and is not an adapter folder (no "
            f"{CONFIG_FILE} in it): pushing would replace it; pick another name, or move that "
            "folder away first"
        )
    return target.install_dir(rel_folder, adapter.files, advance)


# --- the admin API ---------------------------------------------------------------------------


def normalize_url(url: str) -> str:
    """http://host:port (a trailing / or /v1, as the API's base URL is often written, is cut)."""
    text = url.strip().rstrip("/")
    text = text.removesuffix("/v1").rstrip("/")
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise AdaptersError(f"--url {url!r} is not a server URL like http://127.0.0.1:7860")
    return text


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return str(body["detail"])
    return json.dumps(body)[:300]


class AdminClient:
    """Calls the admin API (/v1/adapters) of servers, one URL at a time."""

    def __init__(self, api_key: str | None, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.api_key = api_key
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=timeout)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _call(self, method: str, url: str, path: str, body: Any = None) -> httpx.Response:
        try:
            return self._http.request(method, url + path, json=body)
        except httpx.TimeoutException:
            raise ReplicaError(
                f"{url}: no answer to {method} {path} within {self.timeout:.0f} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ReplicaError(f"cannot reach {url}: {exc or type(exc).__name__}") from None

    def _refused(self, url: str, what: str, response: httpx.Response) -> ReplicaError:
        code, message = response.status_code, _server_message(response)
        if code == 401:
            given = "no key was given" if not self.api_key else "the key given was refused"
            return ReplicaError(
                f"{url} refused {what} with 401 ({message}): {given}; pass the server's admin "
                "key (its --admin-key, else its --api-key) with --api-key or TUNESERVE_ADMIN_KEY"
            )
        if code in (404, 405) and what.startswith("GET"):
            return ReplicaError(
                f"{url} answered {code} to {what}: it has no admin API (a tuneserve older than "
                "runtime adapters, or not a tuneserve server)"
            )
        return ReplicaError(f"{url} refused {what} with {code}: {message}")

    def listing(self, url: str) -> dict[str, Any]:
        """GET /v1/adapters: {"object", "root", "data": [adapter], "errors": [...]}."""
        response = self._call("GET", url, "/v1/adapters")
        if response.status_code != 200:
            raise self._refused(url, "GET /v1/adapters", response)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise ReplicaError(f"{url}/v1/adapters did not answer a list of adapters")
        return body

    def add(self, url: str, name: str, path: str) -> dict[str, Any]:
        """POST /v1/adapters: the adapter object plus "replaced"."""
        response = self._call("POST", url, "/v1/adapters", {"name": name, "path": path})
        if response.status_code != 200:
            raise self._refused(url, f"loading {name!r}", response)
        body = response.json()
        return body if isinstance(body, dict) else {}

    def delete(self, url: str, name: str) -> bool:
        """DELETE /v1/adapters/NAME: True when it was loaded, False when it was not."""
        response = self._call("DELETE", url, f"/v1/adapters/{name}")
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise self._refused(url, f"removing {name!r}", response)
        return True


# --- push and remove -------------------------------------------------------------------------

Outcome = Literal["loaded", "replaced", "removed", "not loaded", "failed"]


@dataclass
class ReplicaResult:
    url: str
    outcome: Outcome
    detail: str = ""


@dataclass
class Report:
    name: str
    folder: str | None = None  # where the adapter's folder was put or deleted
    replaced: bool = False  # push: a folder of that name was there before
    replicas: list[ReplicaResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(r.outcome == "failed" for r in self.replicas)


@dataclass
class Deployment:
    """A provisioned workspace seen from `tuneserve adapters`."""

    provider: str
    share: SyncTarget
    replicas: list[str]  # the URLs to tell about a change
    endpoint: str
    each_replica: bool  # whether `replicas` are every replica (else the endpoint: one of them)
    # said when `replicas` is empty
    no_replica_note: str = (
        "no replica is serving: the share holds the adapter, and the next "
        "'tuneserve deploy' serves it"
    )


def deployment(provider: Provider, endpoint: str) -> Deployment:
    return Deployment(
        provider.name,
        provider.share_target(),
        provider.replica_urls(),
        endpoint,
        each_replica=provider.addresses_replicas,
        no_replica_note=provider.no_replica_note(),
    )


@contextlib.contextmanager
def _storage_errors(where: str, doing: str) -> Iterator[None]:
    """A refusal of the file system or of Azure Files -> one line naming the place."""
    try:
        yield
    except OSError as exc:
        raise AdaptersError(f"could not {doing} {where}: {exc}") from None
    except Exception as exc:
        if not type(exc).__module__.startswith("azure"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdaptersError(
            f"the share refused to {doing} {where}: {first} (Azure refuses to move or delete "
            "a file a replica holds open; try again in a moment)"
        ) from None


def _tell_load(client: AdminClient, urls: list[str], name: str) -> list[ReplicaResult]:
    results = []
    for url in urls:
        try:
            body = client.add(url, name, name)
        except ReplicaError as exc:
            results.append(ReplicaResult(url, "failed", str(exc)))
            continue
        targets = ", ".join(body.get("target_modules") or [])
        detail = f"rank {body.get('rank')}" + (f", {targets}" if targets else "")
        results.append(ReplicaResult(url, "replaced" if body.get("replaced") else "loaded", detail))
    return results


def _tell_remove(client: AdminClient, urls: list[str], name: str) -> list[ReplicaResult]:
    results = []
    for url in urls:
        try:
            removed = client.delete(url, name)
        except ReplicaError as exc:
            results.append(ReplicaResult(url, "failed", str(exc)))
            continue
        results.append(ReplicaResult(url, "removed" if removed else "not loaded"))
    return results


def _local_root(url: str, listing: dict[str, Any], name: str, verb: str) -> Path:
    root = listing.get("root")
    if not root:
        raise AdaptersError(
            f"{url} has no adapter root, so there is no folder to {verb} {name!r} in: start it "
            "with --adapter-root DIR (or --workspace DIR), or use --workspace for a deployment"
        )
    path = Path(str(root))
    if not path.is_absolute() or not path.is_dir():
        raise AdaptersError(
            f"{url} keeps its adapters in {root}, which is not a folder on this machine: run "
            f"'tuneserve adapters {verb}' on the server's machine (or where that folder is "
            "mounted), or pass --workspace DIR for a deployed endpoint (its share is reachable)"
        )
    return path


def _other_roots(root: Path, listings: dict[str, dict[str, Any]], name: str) -> list[str]:
    return [
        f"{url} keeps its adapters in {other}, not {root}: it loads {other}/{name}"
        for url, body in listings.items()
        if (other := body.get("root")) and Path(str(other)) != root
    ]


def push_to_urls(
    client: AdminClient, urls: list[str], name: str, path: Path, console: Console
) -> Report:
    """Copy the adapter into the first server's root (on this machine), then load it on each."""
    check_name(name)
    adapter = check_adapter_folder(name, path)
    listings = {url: client.listing(url) for url in urls}
    root = _local_root(urls[0], listings[urls[0]], name, "push")
    report = Report(name, folder=str(root / name))
    report.notes += _other_roots(root, listings, name)
    with (
        _storage_errors(str(root / name), "copy the adapter to"),
        transfer_progress(console, adapter.size, f"copy -> {root / name}") as transfer,
    ):
        report.replaced = install(LocalDirTarget(root), adapter, name, transfer.advance)
    report.replicas = _tell_load(client, urls, name)
    return report


def push_to_deployment(
    client: AdminClient, target: Deployment, name: str, path: Path, console: Console
) -> Report:
    """Upload the adapter to the share's models/NAME/, then load it on each known replica."""
    check_name(name)
    adapter = check_adapter_folder(name, path)
    for url in target.replicas:  # refuse a missing or wrong key before anything is uploaded
        client.listing(url)
    where = f"{target.share.describe()}/{share_folder(name)}"
    report = Report(name, folder=where)
    with (
        _storage_errors(where, "upload the adapter to"),
        transfer_progress(console, adapter.size, f"upload -> {where}") as transfer,
        session(target.share),
    ):
        report.replaced = install(target.share, adapter, share_folder(name), transfer.advance)
    report.replicas = _tell_load(client, target.replicas, name)
    if not target.replicas:
        report.notes.append(target.no_replica_note)
    elif not target.each_replica:
        report.notes.append(
            f"told the endpoint {target.endpoint} (one replica); the other replicas load "
            f"{name!r} on their next rescan of the share (every 10 s by default)"
        )
    return report


def _listed_path(listing: dict[str, Any], name: str) -> str | None:
    for adapter in listing.get("data", []):
        if isinstance(adapter, dict) and adapter.get("name") == name and adapter.get("path"):
            return str(adapter["path"])
    return None


def remove_from_urls(client: AdminClient, urls: list[str], name: str) -> Report:
    """Delete the adapter's folder from the first server's root (when on this machine), then
    unload it on each server."""
    check_name(name)
    listings = {url: client.listing(url) for url in urls}
    report = Report(name)
    first = listings[urls[0]]
    root_text = first.get("root")
    root = Path(str(root_text)) if root_text else None
    if root is not None and root.is_absolute() and root.is_dir():
        listed = _listed_path(first, name)
        candidates = [root / name] + ([Path(listed)] if listed else [])
        folder = next((c for c in candidates if _is_adapter_dir(c) and _inside(c, root)), None)
        if folder is not None:
            with _storage_errors(str(folder), "delete"):
                LocalDirTarget(folder.parent).remove_dir(folder.name)
            report.folder = str(folder)
    elif root_text:
        report.notes.append(
            f"{urls[0]} keeps its adapters in {root_text}, not on this machine: a folder of "
            f"{name!r} there stays (the servers skip it on rescans until its files change)"
        )
    report.replicas = _tell_remove(client, urls, name)
    return report


def remove_from_deployment(client: AdminClient, target: Deployment, name: str) -> Report:
    """Delete the share's models/NAME/ (or the folder the endpoint lists for NAME inside its
    root), then unload it on each known replica."""
    check_name(name)
    listings = {url: client.listing(url) for url in target.replicas}
    report = Report(name)
    candidates = [share_folder(name)]
    if target.replicas:
        first = listings[target.replicas[0]]
        listed, root = _listed_path(first, name), first.get("root")
        if listed and root:
            inner = PurePosixPath(listed)
            if inner != PurePosixPath(root) and inner.is_relative_to(PurePosixPath(root)):
                rel = inner.relative_to(PurePosixPath(root)).as_posix()
                candidates.append(f"{ADAPTERS_DIR}/{rel}")
    with session(target.share):
        with _storage_errors(target.share.describe(), "list the adapters of"):
            folder = next((c for c in candidates if share_has_adapter(target.share, c)), None)
        if folder is not None:
            report.folder = f"{target.share.describe()}/{folder}"
            with _storage_errors(report.folder, "delete"):
                target.share.remove_dir(folder)
    report.replicas = _tell_remove(client, target.replicas, name)
    if not target.each_replica and target.replicas:
        report.notes.append(
            f"told the endpoint {target.endpoint} (one replica); the other replicas drop "
            f"{name!r} on their next rescan of the share"
        )
    return report


def found(report: Report) -> bool:
    """Whether remove found anything: a folder, or a replica that had the adapter loaded."""
    return report.folder is not None or any(
        r.outcome in ("removed", "failed") for r in report.replicas
    )
