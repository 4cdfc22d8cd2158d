"""`tuneserve adapters list | push | remove`: adapters at runtime, on running servers or on a
deployment, without a restart or a deploy.

The target is `--url` (running servers, repeat it for several replicas) or else the workspace's
deployment (infra/inference.config.json). Results go to stdout; progress and notes to stderr.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from tuneserve.cli._common import stderr, stdout, workspace_option
from tuneserve.cli.deploy import _errors  # the same one-line errors as the deploy commands
from tuneserve.deploy.sync import human_size
from tuneserve.errors import NotProvisionedError
from tuneserve.server.protocol import AdapterList

Urls = Annotated[
    list[str] | None,
    typer.Option(
        "--url",
        help="A running server (http://HOST:PORT); repeat for several replicas. "
        "Default: the workspace's deployment.",
    ),
]
Workspace = Annotated[
    Path,
    workspace_option(
        "A provisioned workspace (infra/inference.config.json): its deployment is the target "
        "when no --url is given."
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar=["TUNESERVE_ADMIN_KEY", "TUNESERVE_API_KEY"],
        help="The servers' admin key (their --admin-key, else their --api-key). Default for a "
        "deployment: the workspace's admin key (.tuneserve/keys.json, made by provision).",
    ),
]

app = typer.Typer(
    name="adapters",
    help="List, push and remove LoRA adapters on running servers or a deployment, at runtime."
    "\n\nExamples:\n\n"
    "  tuneserve adapters list\n\n"
    "  tuneserve adapters push support ./out/adapter\n\n"
    "  tuneserve adapters push support ./out/adapter --url http://127.0.0.1:7860\n\n"
    "  tuneserve adapters remove support",
    no_args_is_help=True,
)


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="adapters")


def _deployment(workspace: Path) -> Any:
    from tuneserve.deploy.adapters import deployment
    from tuneserve.deploy.infra import InfraPaths, load_complete_config
    from tuneserve.deploy.workflow import open_provider

    paths = InfraPaths(workspace.expanduser().resolve())
    if not paths.config.exists():
        raise NotProvisionedError(
            f"{paths.config} not found: pass --url for a running server, or run this in a "
            "provisioned workspace (or pass --workspace DIR)"
        )
    config = load_complete_config(paths.config, shown=paths.rel(paths.config))
    provider = open_provider(paths, config.provider, config, stderr)
    return deployment(provider, config.endpoint_url)


def _key(api_key: str | None, url: list[str] | None, workspace: Path) -> str | None:
    """The key given, else (for the workspace's deployment) the admin key provision made."""
    if api_key or url:
        return api_key
    from tuneserve.deploy.infra import InfraPaths
    from tuneserve.deploy.keys import resolve_key

    return resolve_key(InfraPaths(workspace.expanduser().resolve()), admin=True)


def _urls(urls: list[str] | None) -> list[str]:
    from tuneserve.deploy.adapters import normalize_url

    return list(dict.fromkeys(normalize_url(u) for u in urls or []))


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, now - when)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


@app.command("list", help="The adapters a server (the first --url, or the endpoint) serves.")
@_errors
def list_adapters(
    url: Urls = None,
    workspace: Workspace = Path("."),
    api_key: ApiKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the server's JSON.")] = False,
) -> None:
    from tuneserve.deploy.adapters import AdminClient

    target = _urls(url)[0] if url else _deployment(workspace).endpoint
    with AdminClient(_key(api_key, url, workspace)) as client:
        body = client.listing(target)
    listing = _typed_listing(target, body)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    table = Table(title=f"adapters at {target}", title_justify="left", box=None, pad_edge=False)
    table.add_column("name", no_wrap=True)
    for column in ("state", "rank", "targets", "size", "last used", "source"):
        table.add_column(column, justify="right" if column in ("rank", "size") else "left")
    now = time.time()
    for adapter in sorted(listing.data, key=lambda a: a.name):
        table.add_row(
            adapter.name,
            adapter.state,
            str(adapter.rank),
            ", ".join(adapter.target_modules),
            human_size(adapter.size_bytes),
            _ago(adapter.last_used, now),
            adapter.source,
        )
    if listing.data:
        stdout.print(table)
    else:
        stdout.print(f"no adapters at {target}")
    stdout.print(f"root: {listing.root or '(none: adapters cannot be pushed)'}")
    for problem in listing.errors:
        where = f" ({problem.path})" if problem.path else ""
        stdout.print(f"not served: {problem.name}{where}: {problem.message}")


def _typed_listing(target: str, body: dict[str, Any]) -> AdapterList:
    from tuneserve.deploy.adapters import ReplicaError

    try:
        return AdapterList.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ReplicaError(
            f"{target}/v1/adapters answered a listing this tuneserve cannot read ({where}: "
            f"{first['msg']}; {exc.error_count()} problem(s)): is the server a different "
            "tuneserve version?"
        ) from None


def _print_report(report: Any, verb: str) -> None:
    for note in report.notes:
        stderr.print(f"note: {escape(note)}")
    for replica in report.replicas:
        detail = f"  {replica.detail}" if replica.detail else ""
        stdout.print(f"  {replica.url}  {replica.outcome}{detail}")
    if report.failed:
        failed = sum(r.outcome == "failed" for r in report.replicas)
        stderr.print(
            f"[bold red]error:[/] {failed} of {len(report.replicas)} replica(s) could not {verb} "
            f"{escape(report.name)!r}"
        )
        raise typer.Exit(1)


@app.command(
    "push",
    help="Copy an adapter folder to where the servers load adapters from (the share's "
    "models/NAME, or the --url server's adapter root) and load it on each replica, replacing "
    "one of the same name.",
)
@_errors
def push(
    name: Annotated[str, typer.Argument(help="The adapter's name (the model id in requests).")],
    path: Annotated[
        Path,
        typer.Argument(help="The adapter folder (adapter_config.json, adapter_model.safetensors)."),
    ],
    url: Urls = None,
    workspace: Workspace = Path("."),
    api_key: ApiKey = None,
) -> None:
    from tuneserve.deploy.adapters import AdminClient, push_to_deployment, push_to_urls

    with AdminClient(_key(api_key, url, workspace)) as client:
        if url:
            report = push_to_urls(client, _urls(url), name, path, stderr)
        else:
            report = push_to_deployment(client, _deployment(workspace), name, path, stderr)
    what = "replaced" if report.replaced else "copied to"
    stdout.print(f"{name}: {what} {report.folder}")
    _print_report(report, "load")


@app.command(
    "remove",
    help="Delete an adapter's folder (the share's models/NAME, or NAME in the --url server's "
    "adapter root) and unload it on each replica.",
)
@_errors
def remove(
    name: Annotated[str, typer.Argument(help="The adapter's name.")],
    url: Urls = None,
    workspace: Workspace = Path("."),
    api_key: ApiKey = None,
) -> None:
    from tuneserve.deploy.adapters import (
        AdaptersError,
        AdminClient,
        found,
        remove_from_deployment,
        remove_from_urls,
    )

    with AdminClient(_key(api_key, url, workspace)) as client:
        if url:
            report = remove_from_urls(client, _urls(url), name)
        else:
            report = remove_from_deployment(client, _deployment(workspace), name)
    if not found(report):
        for note in report.notes:
            stderr.print(f"note: {escape(note)}")
        raise AdaptersError(f"no adapter {name!r}: no replica serves it and no folder holds it")
    stdout.print(
        f"{name}: deleted {report.folder}"
        if report.folder
        else f"{name}: no folder of it in the adapter root to delete"
    )
    _print_report(report, "remove")
