"""The endpoint's keys: an API key for /v1 and the chat UI, an admin key that also changes what is
served (/v1/adapters, vLLM's load/unload routes).

`tuneserve provision` makes them (unless given), hands them to the platform as secrets (Container
Apps secrets; the local provider's replica environment), prints them once, and keeps them for the
user in the workspace's `.tuneserve/keys.json`, readable by the user only (0600), in a folder
that ignores itself in git. deploy never syncs `.tuneserve/`, so the keys do not reach the
share. Every command that talks to the endpoint (status, adapters, the readiness checks) reads
them from there unless a key is given.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from tuneserve.deploy.atomic import write_atomic
from tuneserve.deploy.infra import InfraPaths
from tuneserve.errors import InfraFileError

KEYS_FILE = "keys.json"
API_KEY_ENV = "TUNESERVE_API_KEY"
ADMIN_KEY_ENV = "TUNESERVE_ADMIN_KEY"


class EndpointKeys(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    api_key: str
    admin_key: str

    def env(self) -> dict[str, str]:
        """What `tuneserve serve` reads them from."""
        return {API_KEY_ENV: self.api_key, ADMIN_KEY_ENV: self.admin_key}


def new_key() -> str:
    # 32 random bytes, URL-safe: fits a header, a shell variable and an ARM secret as is.
    return "ts-" + secrets.token_urlsafe(32)


def keys_path(paths: InfraPaths) -> Path:
    return paths.state / KEYS_FILE


def load_keys(paths: InfraPaths) -> EndpointKeys | None:
    """The workspace's keys, or None when provision has not made any."""
    path = keys_path(paths)
    if not path.exists():
        return None
    shown = paths.rel(path)
    try:
        return EndpointKeys.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, ValidationError) as exc:
        raise InfraFileError(
            shown,
            f"not a keys file ({exc.__class__.__name__}): expected "
            '{"api_key": "...", "admin_key": "..."}; delete it and run \'tuneserve provision\' '
            "to make new keys",
        ) from None


def save_keys(paths: InfraPaths, keys: EndpointKeys) -> Path:
    """Write the keys file readable and writable by the user only (created so: never 0644)."""
    path = keys_path(paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    ignore = path.parent / ".gitignore"
    if not ignore.exists():  # a workspace is often a git repository: keep the keys out of it
        ignore.write_text("# tuneserve's local state and the endpoint's keys: not for git\n*\n")
    write_atomic(path, json.dumps(keys.model_dump(), indent=2) + "\n", mode=0o600)
    return path


def provision_keys(
    paths: InfraPaths, *, api_key: str | None = None, admin_key: str | None = None
) -> tuple[EndpointKeys, bool]:
    """The keys to provision with: given ones win, then the workspace's, then new ones.

    Returns the keys and whether they changed (then the caller shows them once)."""
    current = load_keys(paths)
    keys = EndpointKeys(
        api_key=api_key or (current.api_key if current else new_key()),
        admin_key=admin_key or (current.admin_key if current else new_key()),
    )
    if keys.api_key == keys.admin_key:
        raise InfraFileError(
            "--admin-key", "must differ from the API key (the API key must not change adapters)"
        )
    changed = keys != current
    if changed:
        save_keys(paths, keys)
    return keys, changed


def resolve_key(
    paths: InfraPaths | None, given: str | None = None, *, admin: bool = False
) -> str | None:
    """The key a command sends to the endpoint: the one given (flag or env), else the
    workspace's admin key (it opens /v1 too), else None."""
    if given:
        return given
    env = os.environ.get(ADMIN_KEY_ENV) if admin else None
    env = env or os.environ.get(API_KEY_ENV)
    if env:
        return env
    keys = load_keys(paths) if paths is not None else None
    return keys.admin_key if keys else None
