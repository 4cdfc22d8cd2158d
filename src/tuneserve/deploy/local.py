"""The local provider: the whole provision/deploy workflow on this machine, on loopback only.

Stand-ins for the Azure resources, all under the workspace's `.tuneserve/`:

    storage/<fileShareName>/        the "file share" (STORAGE_ACCOUNT_NAME = "storage" folder)
    apps/<acaAppName>/app.json      the "container app": defaultCommands, max replicas, port
    apps/<acaAppName>/state.json    the revision serving, its replicas (pid, port), the proxy
    apps/<acaAppName>/routes.json   what the proxy on the endpoint port forwards to
    apps/<acaAppName>/revisions/<revision>/mount/       that revision's /mount (hard links)
    apps/<acaAppName>/revisions/<revision>/replica-N.log

A replica is `/bin/bash -c "<defaultCommands joined by '; '>"`, started detached
(start_new_session=True, so it outlives the CLI), with "/mount" in the commands replaced by the
revision's mount folder, `--port 7860` by the replica's loopback port and `--host 0.0.0.0` by
127.0.0.1, and the container's variables set (TUNESERVE_MOUNT, TUNESERVE_REVISION, PORT,
CONTAINER_APP_NAME, CONTAINER_APP_REVISION, CONTAINER_APP_REPLICA_NAME). The directory of the
running Python comes first on PATH, so `tuneserve` is the one that runs this CLI.

Adapters stay live: a replica runs from its revision's snapshot, but TUNESERVE_ADAPTER_ROOT points
it at the live share's models/ folder, as /mount/models is the live share on Azure. So
`tuneserve adapters push` (which writes there) reaches the serving replicas without a deploy.

Atomic deploy: sync the workspace to the share; snapshot the share into a new revision folder
(hard links: later syncs replace files by rename, so a snapshot never changes); start the new
revision's replicas on fresh ports; wait until every one answers /ready 200; only then replace
routes.json (the proxy on the stable endpoint port sends new connections to the new replicas),
confirm through the endpoint that /health reports the new revision, and stop the old replicas
(SIGTERM to their process group, SIGKILL after a grace period). If the new replicas exit or time
out, they are stopped and the old revision goes on serving, untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tuneserve.deploy.atomic import write_atomic
from tuneserve.deploy.base import DeployResult, Provider, ProvisionRequest, StatusReport, option
from tuneserve.deploy.http import free_port, get_json, is_ready, port_open
from tuneserve.deploy.infra import (
    DEFAULT_COMMANDS,
    DEFAULT_MAXIMUM_INSTANCE_COUNT,
    MOUNT,
    TARGET_PORT,
    TERMINATION_GRACE_S,
    InferenceConfig,
    load_parameters,
)
from tuneserve.deploy.keys import EndpointKeys, keys_path, load_keys, provision_keys
from tuneserve.deploy.processes import (
    log_lines,
    pid_alive,
    start_detached,
    tail_lines,
    terminate_group,
    terminate_groups,
)
from tuneserve.deploy.shares import LocalDirTarget
from tuneserve.deploy.waiting import wait_until
from tuneserve.errors import DeployFailedError, ProviderError
from tuneserve.models.workspace import MODELS as ADAPTERS_DIR

# A replica drains running requests after SIGTERM: it gets what the templates give it.
STOP_GRACE_S = float(TERMINATION_GRACE_S)
KEEP_REVISIONS = 3
LOCAL_STORAGE = ".tuneserve/storage"


@dataclass
class AppSpec:
    """app.json: the local "container app" (what provision sets, like the ARM resource)."""

    name: str
    commands: list[str]
    max_replicas: int
    port: int


@dataclass
class Replica:
    name: str
    pid: int
    port: int
    log: str


@dataclass
class AppState:
    seq: int = 0
    revision: str | None = None
    replicas: list[Replica] = field(default_factory=list)
    pending: list[Replica] = field(default_factory=list)  # a deploy's replicas, not yet serving
    proxy_pid: int | None = None
    last_failed: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AppState:
        return cls(
            seq=int(data.get("seq", 0)),
            revision=data.get("revision"),
            replicas=[Replica(**r) for r in data.get("replicas", [])],
            pending=[Replica(**r) for r in data.get("pending", [])],
            proxy_pid=data.get("proxy_pid"),
            last_failed=data.get("last_failed"),
        )


_PORT_FLAG = re.compile(rf"(--port(?:=|\s+))({TARGET_PORT})\b")
_HOST_FLAG = re.compile(r"(--host(?:=|\s+))(0\.0\.0\.0|::)(?=\s|;|$)")
_MOUNT_PATH = re.compile(rf"(?<![\w./-]){re.escape(MOUNT)}(?=$|[/\s;:'\"&|)])")


def localize_commands(commands: list[str], mount: Path, port: int) -> str:
    """The container's `/bin/bash -c` script, for a replica on this machine."""
    script = "; ".join(commands)
    where = str(mount) if re.fullmatch(r"[\w./-]+", str(mount)) else shlex.quote(str(mount))
    script = _MOUNT_PATH.sub(lambda _m: where, script)
    script = _PORT_FLAG.sub(lambda m: f"{m.group(1)}{port}", script)
    return _HOST_FLAG.sub(lambda m: f"{m.group(1)}127.0.0.1", script)


def snapshot(share: Path, dest: Path) -> None:
    """Copy the share's tree to `dest` as hard links (a copy where links are refused)."""
    for root, _dirs, files in os.walk(share):
        rel_root = Path(root).relative_to(share)
        if rel_root.parts[:1] == (".tuneserve",):
            continue
        (dest / rel_root).mkdir(parents=True, exist_ok=True)
        for name in files:
            src, dst = Path(root) / name, dest / rel_root / name
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


# --- the provider ----------------------------------------------------------------------------


@dataclass
class LocalProvisionRequest(ProvisionRequest):
    port: int | None = option("the endpoint's loopback port (default: the first free from 7861).")
    share_dir: Path | None = option(
        "the folder standing in for the storage account (default: .tuneserve/storage)."
    )


class LocalProvider(Provider):
    name = "local"
    summary = "processes on this machine"
    request_type = LocalProvisionRequest
    default_timeout_s = 300.0
    addresses_replicas = True
    fixed_replicas = True

    # -- layout --

    @property
    def app_name(self) -> str:
        return str(self._config().ACA_APP_NAME)

    @property
    def app_dir(self) -> Path:
        return self.paths.state / "apps" / self.app_name

    @property
    def share_dir(self) -> Path:
        config = self._config()
        root = Path(str(config.STORAGE_ACCOUNT_NAME)).expanduser()
        if not root.is_absolute():
            root = self.paths.workspace / root
        return root / str(config.FILE_SHARE_NAME)

    @property
    def port(self) -> int:
        url = urlparse(self.endpoint)
        if url.scheme != "http" or url.hostname not in ("127.0.0.1", "localhost") or not url.port:
            raise ProviderError(
                f"{self.paths.rel(self.paths.config)}: ACA_APP_ENDPOINT {self.endpoint!r} is not "
                "a loopback URL like http://127.0.0.1:7861, which the local provider needs"
            )
        return url.port

    def _spec_path(self) -> Path:
        return self.app_dir / "app.json"

    def _state_path(self) -> Path:
        return self.app_dir / "state.json"

    def _routes_path(self) -> Path:
        return self.app_dir / "routes.json"

    def load_spec(self) -> AppSpec:
        path = self._spec_path()
        if path.exists():
            return AppSpec(**json.loads(path.read_text(encoding="utf-8")))
        # a hand-filled config: the parameters file (or the defaults) tells what to run
        commands, max_replicas = list(DEFAULT_COMMANDS), DEFAULT_MAXIMUM_INSTANCE_COUNT
        if self.paths.parameters.exists():
            params = load_parameters(
                self.paths.parameters, shown=self.paths.rel(self.paths.parameters)
            )
            commands = params.parameters.defaultCommands.value
            max_replicas = params.parameters.maximumInstanceCount.value
        return AppSpec(self.app_name, commands, max_replicas, self.port)

    def load_state(self) -> AppState:
        path = self._state_path()
        if not path.exists():
            return AppState()
        return AppState.from_json(json.loads(path.read_text(encoding="utf-8")))

    def _save_state(self, state: AppState) -> None:
        write_atomic(self._state_path(), json.dumps(asdict(state), indent=2) + "\n")

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.app_dir.mkdir(parents=True, exist_ok=True)
        with (self.app_dir / "lock").open("w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ProviderError(
                    f"another tuneserve deploy/stop of {self.app_name!r} is running"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- provision --

    def provision(self, request: LocalProvisionRequest) -> InferenceConfig:
        names = request.resolved_names()
        derived = sorted(set(names) - set(request.explicit_names()))
        if derived:
            self.console.print(
                f"note: {', '.join(derived)} derived as the template does (prefix + first 5 "
                "characters of uniqueString(resourceGroup().id), reimplemented: an approximation "
                "of Azure's)"
            )
        share_root = request.share_dir or Path(LOCAL_STORAGE)
        port = request.port or _default_port()
        params = request.parameters.parameters
        self.config = InferenceConfig(
            SUBSCRIPTION_ID=request.subscription_id,
            RESOURCE_GROUP_NAME=request.resource_group,
            STORAGE_ACCOUNT_NAME=str(share_root),
            FILE_SHARE_NAME=names["fileShareName"],
            ACA_APP_NAME=names["acaAppName"],
            ACA_APP_ENDPOINT=f"http://127.0.0.1:{port}",
            PROVIDER=self.name,
        )
        self.share_dir.mkdir(parents=True, exist_ok=True)
        spec = AppSpec(
            name=self.app_name,
            commands=list(params.defaultCommands.value),
            max_replicas=params.maximumInstanceCount.value,
            port=port,
        )
        write_atomic(self._spec_path(), json.dumps(asdict(spec), indent=2) + "\n")
        return self.config

    # -- deploy --

    @contextlib.contextmanager
    def deploying(self, replicas: int | None) -> Iterator[None]:
        with self._lock():
            spec = self.load_spec()
            if (replicas or 1) > spec.max_replicas:
                raise ProviderError(
                    f"--replicas {replicas} is more than maximumInstanceCount "
                    f"({spec.max_replicas}); raise it in "
                    f"{self.paths.rel(self.paths.parameters)} and provision again"
                )
            state = self.load_state()
            self._stop_pending(state)
            self._save_state(state)
            yield

    def roll_out(self, sync_summary: str, *, timeout: float, replicas: int | None) -> DeployResult:
        # 1. (the sync, under deploying's lock) done: the share holds the workspace
        spec, state, count = self.load_spec(), self.load_state(), replicas or 1

        # 2. a new revision: its own snapshot of the share, its own replicas
        state.seq += 1
        revision = f"{self.app_name}--r{state.seq}"
        rev_dir = self.app_dir / "revisions" / revision
        if rev_dir.exists():
            shutil.rmtree(rev_dir)
        mount = rev_dir / "mount"
        snapshot(self.share_dir, mount)
        self._ensure_proxy(state, spec.port)
        procs = [self._start_replica(spec, revision, i, mount, rev_dir) for i in range(count)]
        state.pending = [replica for replica, _ in procs]
        self._save_state(state)

        # 3. wait until every new replica is ready; on failure the old revision serves on
        try:
            self._wait_ready(revision, procs, timeout)
        except (DeployFailedError, KeyboardInterrupt):
            terminate_groups([r.pid for r in state.pending], grace=2)
            state.pending = []
            state.last_failed = revision
            self._save_state(state)
            raise

        # 4. switch the endpoint, then retire the old revision: its replicas drain (they
        # finish what runs; new connections already reach the new revision) and exit
        new, old = state.pending, state.replicas
        write_atomic(
            self._routes_path(),
            json.dumps({"revision": revision, "ports": [r.port for r in new]}) + "\n",
        )
        state.revision, state.replicas, state.pending = revision, new, []
        self._save_state(state)
        self._confirm_switch(revision)
        if old:
            self.console.print(
                f"Retiring the previous revision: {len(old)} replica(s) finish their running "
                f"requests (up to {STOP_GRACE_S:.0f} s)"
            )
            started = time.monotonic()
            terminate_groups([r.pid for r in old], grace=STOP_GRACE_S)
            self.console.print(f"  retired in {time.monotonic() - started:.1f} s")
        self._prune_revisions(keep={revision, state.last_failed})
        return DeployResult(revision, self.endpoint, sync_summary, replicas=len(new))

    def _start_replica(
        self, spec: AppSpec, revision: str, index: int, mount: Path, rev_dir: Path
    ) -> tuple[Replica, subprocess.Popen[bytes]]:
        port = free_port()
        name = f"{revision}-{index}"
        log_path = rev_dir / f"replica-{index}.log"
        bin_dir = str(Path(sys.executable).parent)
        adapter_root = self.share_dir / ADAPTERS_DIR
        adapter_root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self._keys().env())  # as Container Apps passes its secrets
        env.update(
            PATH=bin_dir + os.pathsep + env.get("PATH", ""),
            TUNESERVE_ADAPTER_ROOT=str(adapter_root),
            TUNESERVE_MOUNT=str(mount),
            TUNESERVE_REVISION=revision,
            TUNESERVE_PORT=str(port),
            PORT=str(port),
            CONTAINER_APP_NAME=spec.name,
            CONTAINER_APP_REVISION=revision,
            CONTAINER_APP_REPLICA_NAME=name,
            GRADIO_ANALYTICS_ENABLED="False",
            PYTHONUNBUFFERED="1",
        )
        script = localize_commands(spec.commands, mount, port)
        proc = start_detached(
            ["/bin/bash", "-c", script],
            log=log_path,
            cwd=mount,
            env=env,
            banner=f"tuneserve: {name}: /bin/bash -c {shlex.quote(script)}",
        )
        return Replica(name=name, pid=proc.pid, port=port, log=str(log_path)), proc

    def _keys(self) -> EndpointKeys:
        """The workspace's keys; a hand-filled config (no provision) gets new ones here."""
        keys = load_keys(self.paths)
        if keys is None:
            keys, _ = provision_keys(self.paths)
            self.console.print(
                f"Made the endpoint's keys: {self.paths.rel(keys_path(self.paths))} "
                "('tuneserve endpoint --show-key' prints the API key)"
            )
        return keys

    def _wait_ready(
        self, revision: str, procs: list[tuple[Replica, subprocess.Popen[bytes]]], timeout: float
    ) -> None:
        replicas = [replica for replica, _ in procs]
        waiting = {replica.name: (replica, proc) for replica, proc in procs}

        def all_ready() -> bool:
            for replica, proc in list(waiting.values()):
                if (code := proc.poll()) is not None:
                    why = f"replica {replica.name} exited with code {code}"
                    raise self._not_ready(revision, why, replicas)
                if is_ready(f"http://127.0.0.1:{replica.port}", timeout=2):
                    del waiting[replica.name]
            return not waiting

        with self.console.status(f"Waiting for {revision} to be ready") as status:
            done = wait_until(
                all_ready,
                timeout=timeout,
                interval=0.5,
                on_wait=lambda s: status.update(f"Waiting for {revision} to be ready ({s:.0f} s)"),
            )
        if not done:
            why = f"{', '.join(sorted(waiting))} not ready after {timeout:.0f} s"
            raise self._not_ready(revision, why, replicas)

    def _not_ready(self, revision: str, why: str, replicas: list[Replica]) -> DeployFailedError:
        state = self.load_state()
        previous = state.revision if any(pid_alive(r.pid) for r in state.replicas) else None
        logs = [(f"Last lines of {r.log}:", tail_lines(Path(r.log), 15)) for r in replicas]
        return self.not_ready(revision, why, logs, previous)

    def _confirm_switch(self, revision: str) -> None:
        """Until /health through the endpoint reports the new revision (bounded)."""

        def switched() -> bool:
            health = get_json(self.endpoint + "/health", timeout=2)
            return isinstance(health, dict) and health.get("revision") in (revision, None)

        if not wait_until(switched, timeout=10, interval=0.1):
            self.console.print(
                f"[yellow]warning:[/] {self.endpoint}/health does not report {revision} yet"
            )

    def _ensure_proxy(self, state: AppState, port: int) -> None:
        if state.proxy_pid and pid_alive(state.proxy_pid) and port_open(port):
            return
        if state.proxy_pid:
            terminate_group(state.proxy_pid, grace=2)
        if port_open(port):
            raise ProviderError(
                f"the endpoint's port {port} is taken by another program; stop it, or run "
                "'tuneserve provision --provider local --port N' to pick another port"
            )
        log_path = self.app_dir / "proxy.log"
        argv = [sys.executable, "-m", "tuneserve.deploy.proxy", "--port", str(port)]
        proc = start_detached([*argv, "--routes", str(self._routes_path())], log=log_path)

        def listening() -> bool:
            if proc.poll() is not None:
                raise ProviderError(self._proxy_failed(port, log_path, proc.pid))
            return port_open(port)

        if not wait_until(listening, timeout=15, interval=0.05):
            raise ProviderError(self._proxy_failed(port, log_path, proc.pid))
        state.proxy_pid = proc.pid
        self._save_state(state)

    @staticmethod
    def _proxy_failed(port: int, log_path: Path, pid: int) -> str:
        terminate_group(pid, grace=1)
        tail = "\n".join(tail_lines(log_path, 10))
        return f"the endpoint proxy on port {port} did not start:\n{tail}"

    def _stop_pending(self, state: AppState) -> None:
        terminate_groups([r.pid for r in state.pending], grace=2)
        state.pending = []

    def _prune_revisions(self, keep: set[str | None]) -> None:
        root = self.app_dir / "revisions"
        dirs = sorted(
            (d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True
        )
        for old in dirs[KEEP_REVISIONS:]:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    # -- status, logs, stop --

    def status(self, *, api_key: str | None = None) -> StatusReport:
        state = self.load_state()
        replicas = []
        for r in state.replicas:
            alive = pid_alive(r.pid)
            ready = alive and is_ready(f"http://127.0.0.1:{r.port}")
            replicas.append(
                {
                    "name": r.name,
                    "pid": r.pid,
                    "port": r.port,
                    "alive": alive,
                    "ready": ready,
                    "log": r.log,
                }
            )
        report = StatusReport(
            provider=self.name,
            app=self.app_name,
            endpoint=self.endpoint,
            revision=state.revision,
            ready=False,
            replicas=replicas,
        )
        proxy_up = bool(state.proxy_pid and pid_alive(state.proxy_pid))
        if not proxy_up:
            report.notes.append("the endpoint proxy is not running ('tuneserve deploy' starts it)")
        if state.last_failed:
            report.notes.append(
                f"last failed deploy: {state.last_failed} "
                f"('tuneserve logs --revision {state.last_failed}')"
            )
        if proxy_up:
            report.ready = is_ready(self.endpoint)
            report.fill_models(self.endpoint, api_key)
        return report

    def log_files(self, revision: str | None = None) -> list[Path]:
        state = self.load_state()
        revision = revision or state.revision or state.last_failed
        if revision is None:
            return []
        return sorted((self.app_dir / "revisions" / revision).glob("replica-*.log"))

    def logs(
        self, *, tail: int = 100, follow: bool = False, revision: str | None = None
    ) -> Iterator[str]:
        files = self.log_files(revision)
        if not files:
            raise ProviderError(f"no logs yet for {self.app_name!r}: run 'tuneserve deploy'")
        return log_lines(files, tail=tail, follow=follow)

    # -- adapters at runtime (tuneserve adapters) --

    def share_target(self) -> LocalDirTarget:
        return LocalDirTarget(self.share_dir)

    def replica_urls(self) -> list[str]:
        """Each live replica of the serving revision, on its own port (the endpoint would reach
        only one of them per connection)."""
        return [
            f"http://127.0.0.1:{r.port}" for r in self.load_state().replicas if pid_alive(r.pid)
        ]

    def stop(self) -> str:
        with self._lock():
            state = self.load_state()
            replicas = [*state.replicas, *state.pending]
            stopped = sum(pid_alive(r.pid) for r in replicas)
            # the replicas drain first (the proxy still pipes their open connections)
            terminate_groups([r.pid for r in replicas], grace=STOP_GRACE_S)
            if state.proxy_pid:
                terminate_group(state.proxy_pid, grace=2)
            self._routes_path().unlink(missing_ok=True)
            revision = state.revision
            state.revision, state.replicas, state.pending, state.proxy_pid = None, [], [], None
            self._save_state(state)
        what = f"revision {revision}" if revision else "nothing was serving"
        return f"Stopped {self.app_name} ({what}; {stopped} replica(s) and the endpoint proxy)."


def _default_port() -> int:
    for port in range(TARGET_PORT + 1, TARGET_PORT + 100):
        if not port_open(port):
            return port
    return free_port()
