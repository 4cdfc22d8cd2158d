"""Which adapters the server serves, changed at runtime: the admin API, on-demand loads by name,
and rescans of the adapter root that keep every replica on one share serving the same set.

The engine holds the live set and swaps weights atomically (engine/base.py); this registry
decides what goes in it and remembers where each adapter came from:

- `startup`: given at start (`--adapter`, the workspace's or the demo's adapters);
- `api`:     loaded by `POST /v1/adapters`;
- `share`:   found in the adapter root by a rescan (on a timer, on `POST /v1/adapters/rescan`,
             and when a request names a model that is not served).

A rescan serves every new adapter folder under the root, reloads an adapter whose files changed
(a push of a new version), and unloads one whose folder is gone. A folder that fails validation
is reported in `GET /v1/adapters` (errors) and, if an older version of it was serving, that one
keeps serving. `DELETE` hides a folder from rescans until its files change or it is loaded again.

Changes happen one at a time (one lock), so a name's load, replace and unload apply in the order
asked; a load is fast next to a request. A folder is read here (models/adapters.py) and checked
against the base by the engine (`validate_adapter`): only the engine knows the model it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tuneserve.engine.base import Engine
from tuneserve.engine.types import AdapterState
from tuneserve.errors import AdapterError, AdapterNotLoadedError, RegistryError
from tuneserve.models.adapter_root import (
    AdapterPathError,
    AdapterRoot,
    Fingerprint,
    check_adapter_name,
    fingerprint,
)
from tuneserve.models.adapters import CONFIG_FILE, WEIGHT_FILES, read_adapter_spec
from tuneserve.models.types import AdapterSpec, ServedModel
from tuneserve.server.protocol import AdapterSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Entry:
    path: Path
    source: AdapterSource
    fingerprint: Fingerprint
    loaded_at: float


@dataclass(frozen=True, slots=True)
class Problem:
    """An adapter folder in the root that cannot be served (as of `fingerprint`)."""

    path: Path
    message: str
    fingerprint: Fingerprint


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str
    path: Path
    source: AdapterSource
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    state: AdapterState
    last_used: float | None
    loaded_at: float


class AdapterRegistry:
    def __init__(
        self,
        engine: Engine,
        served: ServedModel,
        *,
        root: AdapterRoot | None = None,
        rescan_interval: float = 10.0,
    ) -> None:
        self.engine = engine
        self.served = served
        self.root = root
        self.rescan_interval = rescan_interval
        now = time.time()
        self._entries: dict[str, Entry] = {
            name: Entry(spec.path.resolve(), "startup", fingerprint(spec.path), now)
            for name, spec in engine.adapters.items()
        }
        self._problems: dict[str, Problem] = {}
        self._hidden: dict[Path, Fingerprint] = {}  # unloaded by DELETE, while unchanged
        self._lock = asyncio.Lock()
        self._scan: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        self.last_scan: float | None = None

    # -- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Serve what the root holds now, then keep rescanning it on the timer."""
        if self.root is None:
            return
        await self.rescan()
        if self.rescan_interval > 0:
            self._timer = asyncio.create_task(self._rescan_forever(), name="adapter-rescan")

    async def stop(self) -> None:
        for task in (self._timer, self._scan):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _rescan_forever(self) -> None:
        while True:
            await asyncio.sleep(self.rescan_interval)
            try:
                await self.rescan()
            except Exception:  # a share that hiccups must not end the timer
                logger.exception("rescan of the adapter root %s failed", self.root)

    # -- what is served --------------------------------------------------------------------
    def infos(self) -> list[AdapterInfo]:
        usage = self.engine.adapter_usage()
        infos = []
        for name, spec in self.engine.adapters.items():
            entry = self._entries.get(name) or Entry(spec.path, "startup", (), time.time())
            used = usage.get(name)
            infos.append(
                AdapterInfo(
                    name=name,
                    path=entry.path,
                    source=entry.source,
                    rank=spec.rank,
                    alpha=spec.alpha,
                    target_modules=spec.target_modules,
                    size_bytes=_weights_size(spec.path),
                    state=used.state if used else "disk",
                    last_used=used.last_used if used else None,
                    loaded_at=entry.loaded_at,
                )
            )
        return infos

    def problems(self) -> dict[str, Problem]:
        return dict(self._problems)

    def loaded_at(self, name: str) -> float | None:
        entry = self._entries.get(name)
        return entry.loaded_at if entry else None

    def where_looked(self, name: str) -> str:
        """For a 404: where an adapter of that name would have been found."""
        if self.root is None:
            return (
                "This server has no adapter root (--adapter-root), so adapters are not loaded "
                "by name on demand."
            )
        problem = self._problems.get(name)
        if problem is not None:
            return f"The adapter folder {problem.path} cannot be served: {problem.message}"
        return (
            f"No adapter folder named {name!r} was found under the adapter root {self.root.path} "
            f"(a folder holding {CONFIG_FILE})."
        )

    # -- changes asked for -----------------------------------------------------------------
    async def load(self, name: str, path: str) -> tuple[AdapterInfo, bool]:
        """Serve the adapter folder `path` (inside the root) as `name`; (info, replaced)."""
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise RegistryError(str(exc), param="name") from None
        if name == self.served.base_name:
            raise RegistryError(
                f"{name!r} is the base model's name; choose another name for the adapter",
                param="name",
            )
        if self.root is None:
            raise RegistryError(
                "This server has no adapter root, so it cannot load adapters at runtime: start "
                "it with --adapter-root DIR (or --workspace DIR, whose models/ folder is used).",
                param="path",
            )
        try:
            folder = self.root.resolve(path)
        except AdapterPathError as exc:
            raise RegistryError(str(exc), param="path") from None
        async with self._lock:
            replaced = name in self.engine.adapters
            try:
                await self._install(name, folder, "api")
            except AdapterError as exc:
                raise RegistryError(str(exc), param="path") from None
            self._hidden.pop(folder, None)
        info = next(i for i in self.infos() if i.name == name)
        return info, replaced

    async def unload(self, name: str) -> None:
        async with self._lock:
            entry = self._entries.get(name)
            if name not in self.engine.adapters:
                raise AdapterNotLoadedError(
                    f"adapter {name!r} is not loaded; loaded: "
                    f"{', '.join(self.engine.adapter_names) or '(none)'}",
                    param="name",
                )
            await self._uninstall(name)
            if entry is not None and self.root is not None and self.root.contains(entry.path):
                self._hidden[entry.path] = entry.fingerprint

    async def find(self, name: str) -> bool:
        """On demand: is `name` served after a rescan of the root? (a request named it)"""
        if name in self.engine.adapters:
            return True
        if self.root is None:
            return False
        try:
            await self.rescan()
        except Exception:  # the request then gets its 404; the log says why
            logger.exception("rescan of the adapter root %s failed", self.root.path)
        return name in self.engine.adapters

    async def rescan(self) -> None:
        """Rescan the root now. A scan already running may have listed the root before the
        caller's change, so the caller waits for it and then for one that starts after it."""
        if self.root is None:
            return
        previous = self._scan
        if previous is not None and not previous.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(previous)
        scan = self._scan
        if scan is None or scan is previous:  # nobody started a scan since this call began
            scan = self._scan = asyncio.create_task(self._rescan_once(), name="adapter-scan")
        # shield: a caller that goes away (a client disconnecting) must not stop the scan
        await asyncio.shield(scan)

    # -- the work --------------------------------------------------------------------------
    async def _rescan_once(self) -> None:
        root = self.root
        assert root is not None
        if not await asyncio.to_thread(root.path.is_dir):
            # A share that is briefly unreachable must not unload everything it served.
            logger.warning("adapter root %s is not reachable; the adapters stay as they are", root)
            return
        served_folders = [entry.path for entry in self._entries.values()]
        found, stamps = await asyncio.to_thread(_look, root, served_folders)
        async with self._lock:
            for name, entry in list(self._entries.items()):
                if not root.contains(entry.path):
                    continue  # given at startup from elsewhere: not the share's to change
                stamp = stamps.get(entry.path)
                if stamp is None:
                    logger.info(
                        "adapter %r: %s is gone from the share; unloading", name, entry.path
                    )
                    await self._uninstall(name)
                elif stamp != entry.fingerprint:
                    await self._try_install(name, entry.path, entry.source, stamp)
            claimed = {entry.path for entry in self._entries.values()}
            for name, folder in found.items():
                if name in self._entries or folder in claimed:
                    continue
                if self._hidden.get(folder) == stamps[folder]:
                    continue
                await self._try_install(name, folder, "share", stamps[folder])
            for name, problem in list(self._problems.items()):
                if problem.path not in stamps:
                    del self._problems[name]
            for folder in list(self._hidden):
                if folder not in stamps:
                    del self._hidden[folder]
        self.last_scan = time.time()

    async def _try_install(
        self, name: str, folder: Path, source: AdapterSource, stamp: Fingerprint
    ) -> None:
        """A rescan's install: a bad folder is reported once per version, not raised."""
        problem = self._problems.get(name)
        if problem is not None and problem.path == folder and problem.fingerprint == stamp:
            return
        try:
            await self._install(name, folder, source)
        except AdapterError as exc:
            self._problems[name] = Problem(folder, str(exc), stamp)
            if name in self.engine.adapters:
                logger.warning("%s; the previous version keeps serving", exc)
            else:
                logger.warning("%s", exc)

    async def _install(self, name: str, folder: Path, source: AdapterSource) -> None:
        """Validate and hand to the engine (which swaps atomically). Lock held."""
        stamp = fingerprint(folder)
        spec: AdapterSpec = await asyncio.to_thread(read_adapter_spec, name, folder)
        await asyncio.to_thread(self.engine.validate_adapter, spec)
        await asyncio.to_thread(self.engine.add_adapter, spec)
        self._entries[name] = Entry(folder, source, stamp, time.time())
        self._problems.pop(name, None)
        logger.info("adapter %r: serving %s (%s)", name, folder, source)

    async def _uninstall(self, name: str) -> None:
        await asyncio.to_thread(self.engine.remove_adapter, name)
        self._entries.pop(name, None)
        logger.info("adapter %r: unloaded", name)


def _look(
    root: AdapterRoot, served_folders: list[Path]
) -> tuple[dict[str, Path], dict[Path, Fingerprint]]:
    """(name -> folder of every adapter in the root, folder -> fingerprint) for those and for
    every served folder that still holds an adapter. Runs in a thread: a share can be slow."""
    found: dict[str, Path] = {}
    for name, folder in root.scan().items():
        try:
            found[check_adapter_name(name)] = folder.resolve()
        except ValueError as exc:
            logger.warning("adapter folder %s is not served: %s", folder, exc)
    folders = set(found.values()) | set(served_folders)
    stamps = {f: fingerprint(f) for f in folders if (f / CONFIG_FILE).is_file()}
    return found, stamps


def _weights_size(folder: Path) -> int:
    for file in WEIGHT_FILES:
        with contextlib.suppress(OSError):
            return (folder / file).stat().st_size
    return 0
