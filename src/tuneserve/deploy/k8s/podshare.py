"""A storage class's ReadWriteMany volume as a SyncTarget, reached the way `kubectl cp` reaches a
pod: a short-lived helper pod mounts the claim, and each share call is one command exec'd in it
over the API server's exec websocket (kubernetes.stream), files going in as tar streams.

    list_files    find + stat          (size, mtime) of every file under the mount
    upload        head -c N | tar x    one file as a tar stream under a hidden name, then mv
    read/write    cat / tar            small text files (the sync manifest)
    delete, rename_dir, delete_empty_dirs, sha256   rm, mv, find -empty -delete, sha256sum

Only POSIX tools the helper image has (busybox: sh, find, stat, tar, head, mv, sha256sum) are
used; `head -c N` ends the upload's stdin, which the exec protocol (v4) cannot close.
The pod is created by `opened()` and deleted when it ends, also on failure; its
activeDeadlineSeconds bounds it should this process die first.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from tuneserve.deploy.infra import MOUNT
from tuneserve.deploy.k8s.api import ExecResult, KubeApi
from tuneserve.deploy.shares import (
    Advance,
    FolderFiles,
    RemoteFile,
    hidden_beside,
    install_by_renames,
    remove_by_rename,
)
from tuneserve.errors import ProviderError

HELPER_IMAGE = "docker.io/library/busybox:1.36"
HELPER_DEADLINE_S = 3600  # the pod ends itself after this, should deploy never delete it
START_TIMEOUT_S = 300.0  # an image pull and a volume attach
CHUNK = 1 << 20
_BLOCK = 512


def helper_pod(name: str, namespace: str, claim: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**labels, "app.kubernetes.io/component": "sync"},
        },
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": HELPER_DEADLINE_S,
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "sync",
                    "image": HELPER_IMAGE,
                    "command": ["sleep", str(HELPER_DEADLINE_S)],
                    "volumeMounts": [{"name": "share", "mountPath": MOUNT}],
                }
            ],
            "volumes": [{"name": "share", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


def tar_stream(src: Path, arcname: str, advance: Advance) -> tuple[int, Iterator[bytes]]:
    """One file as a tar archive, streamed (never whole in memory): its size and its chunks."""
    info = tarfile.TarInfo(arcname)
    st = src.stat()
    info.size, info.mode, info.mtime = st.st_size, st.st_mode & 0o777, int(st.st_mtime)
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    padding = -info.size % _BLOCK
    total = len(header) + info.size + padding + 2 * _BLOCK

    def chunks() -> Iterator[bytes]:
        yield header
        with src.open("rb") as fh:
            while data := fh.read(CHUNK):
                yield data
                advance(len(data))
        yield b"\0" * (padding + 2 * _BLOCK)

    return total, chunks()


class PodShareTarget:
    def __init__(self, api: KubeApi, pod: str, claim: str, labels: dict[str, str]) -> None:
        self.api, self.pod, self.claim, self.labels = api, pod, claim, labels
        self.started = False

    def describe(self) -> str:
        return f"claim {self.claim} (through pod {self.pod})"

    @contextlib.contextmanager
    def opened(self, timeout: float = START_TIMEOUT_S) -> Iterator[PodShareTarget]:
        self.api.delete("Pod", self.pod)  # one left by a deploy that died
        self.api.apply(helper_pod(self.pod, self.api.namespace, self.claim, self.labels))
        try:
            self._wait_running(timeout)
            self.started = True
            yield self
        finally:
            self.started = False
            self.api.delete("Pod", self.pod)

    def _wait_running(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        phase = None
        while time.monotonic() < deadline:
            pod = self.api.get("Pod", self.pod) or {}
            phase = pod.get("status", {}).get("phase")
            if phase == "Running":
                return
            if phase in ("Failed", "Succeeded"):
                break
            time.sleep(1.0)
        raise ProviderError(
            f"the sync pod {self.pod!r} (mounting claim {self.claim!r}) is {phase or 'not started'}"
            f" after {timeout:.0f} s: is the claim bound (its storage class ReadWriteMany), and can"
            f" the node pull {HELPER_IMAGE}? 'kubectl -n {self.api.namespace} describe pod "
            f"{self.pod}' says why"
        )

    # -- one command per call -----------------------------------------------------------------

    def _sh(
        self,
        script: str,
        *args: str,
        stdin: Iterator[bytes] | None = None,
        check: bool = True,
    ) -> ExecResult:
        if not self.started:
            raise RuntimeError("PodShareTarget used outside opened()")
        argv = ["sh", "-c", f"cd {MOUNT} && {script}", "sh", *args]
        result = self.api.exec_in(self.pod, argv, stdin)
        if check and result.code != 0:
            why = result.stderr.decode("utf-8", "replace").strip()[-300:]
            raise ProviderError(
                f"on claim {self.claim!r} (pod {self.pod}): {script.split()[0]} "
                f"{shlex.join(args)} exited {result.code}: {why}"
            )
        return result

    def list_files(self, under: str = "") -> dict[str, RemoteFile]:
        top = under or "."
        found = self._sh(
            '[ -d "$1" ] || exit 0; find "$1" -type f -exec stat -c "%s %Y %n" {} +', top
        )
        out: dict[str, RemoteFile] = {}
        for line in found.stdout.decode("utf-8", "surrogateescape").splitlines():
            size, stamp, name = line.split(" ", 2)
            out[str(PurePosixPath(name))] = RemoteFile(int(size), stamp)
        return out

    def read_text(self, rel: str) -> str | None:
        found = self._sh('[ -f "$1" ] || exit 3; cat "$1"', rel, check=False)
        if found.code == 3:
            return None
        if found.code:
            self._sh('cat "$1"', rel)  # raises with the command's error
        return found.stdout.decode("utf-8")

    def upload(self, src: Path, rel: str, advance: Advance) -> RemoteFile:
        part = hidden_beside(rel, "part")
        size, chunks = tar_stream(src, part, advance)
        parent = str(PurePosixPath(rel).parent)
        done = self._sh(
            'mkdir -p "$3" && head -c "$1" | tar xf - -o && mv -f "$2" "$4" && '
            'stat -c "%s %Y" "$4"',
            str(size),
            part,
            parent,
            rel,
            stdin=chunks,
        )
        got_size, stamp = done.stdout.decode().split()
        return RemoteFile(int(got_size), stamp)

    def write_text(self, rel: str, text: str) -> None:
        data = text.encode("utf-8")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(hidden_beside(rel, "part"))
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
        archive = buf.getvalue()
        self._sh(
            'mkdir -p "$3" && head -c "$1" | tar xf - -o && mv -f "$2" "$4"',
            str(len(archive)),
            info.name,
            str(PurePosixPath(rel).parent),
            rel,
            stdin=iter([archive]),
        )

    def delete(self, rel: str) -> None:
        self._sh('rm -f "$1"', rel)

    def sha256(self, rel: str) -> str | None:
        found = self._sh('[ -f "$1" ] || exit 0; sha256sum "$1"', rel)
        text = found.stdout.decode().split()
        return text[0] if text else None

    def rename_dir(self, rel: str, new_rel: str) -> None:
        self._sh('mv "$1" "$2"', rel, new_rel)

    def delete_empty_dirs(self, rel: str) -> None:
        self._sh('[ -d "$1" ] || exit 0; find "$1" -depth -type d -empty -exec rmdir {} +', rel)

    def install_dir(self, rel: str, files: FolderFiles, advance: Advance) -> bool:
        return install_by_renames(self, rel, files, advance)

    def remove_dir(self, rel: str) -> None:
        remove_by_rename(self, rel)
