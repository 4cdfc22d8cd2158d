"""`tuneserve init | provision | deploy | endpoint | status | logs | stop`: the remote workflow.

Results go to stdout (the endpoint is always the last line where one is printed); progress and
hints go to stderr.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.markup import escape

from tuneserve.cli._common import examples, stderr, stdout, workspace_option
from tuneserve.deploy import registry
from tuneserve.deploy.infra import DEFAULT_PROVIDER
from tuneserve.errors import TuneserveError

F = TypeVar("F", bound=Callable[..., Any])
Workspace = Annotated[
    Path, workspace_option("The AI Toolkit workspace (holds infra/, model-cache/, models/).")
]


def _errors(fn: F) -> F:
    """Our errors -> one message on stderr, exit 1 (TUNESERVE_DEBUG=1 shows the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TuneserveError as exc:
            if os.environ.get("TUNESERVE_DEBUG"):
                raise
            stderr.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def register(app: typer.Typer) -> None:
    app.command(
        "init",
        help="Scaffold infra/ (parameters, template, config) in a workspace."
        + examples("tuneserve init", "tuneserve init my-project --demo"),
    )(init)
    app.command(
        "provision",
        help="Create or update the inference resources; write "
        "infra/inference.config.json."
        + examples(
            "tuneserve provision --provider local",
            "tuneserve provision --subscription $SUB --resource-group my-rg",
        ),
    )(provision)
    app.command(
        "deploy",
        help="Sync the workspace to the share and roll out a new revision; "
        "the previous one serves until the new one is ready."
        + examples("tuneserve deploy", "tuneserve deploy --timeout 1800"),
    )(deploy)
    app.command(
        "endpoint",
        help="Print the inference endpoint's URL (or its key)."
        + examples(
            "tuneserve endpoint",
            'curl $(tuneserve endpoint)/v1/models -H "Authorization: Bearer '
            '$(tuneserve endpoint --show-key)"',
        ),
    )(endpoint)
    app.command("status", help="Provider, revision, replicas, readiness and adapters served.")(
        status
    )
    app.command(
        "logs",
        help="Print the replicas' logs."
        + examples("tuneserve logs --tail 50", "tuneserve logs --follow"),
    )(logs)
    app.command("stop", help="Stop the replicas (local: and the endpoint proxy).")(stop)


def _paths(workspace: Path) -> Any:
    from tuneserve.deploy.infra import InfraPaths

    return InfraPaths(workspace.expanduser().resolve())


@_errors
def init(
    directory: Annotated[Path, typer.Argument(help="The workspace folder.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
    demo: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="Also lay out the demo model (SmolLM2-135M-Instruct) and its two adapters "
            "(AI Toolkit layout).",
        ),
    ] = False,
    toy: Annotated[
        bool,
        typer.Option(
            "--toy",
            help="With --demo: the small toy model instead (a few MB; quick to deploy and test).",
        ),
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Where the demo is built and cached.", envvar="TUNESERVE_CACHE_DIR"),
    ] = None,
) -> None:
    from tuneserve.deploy.scaffold import init_workspace, lay_out_demo

    workspace = directory.expanduser().resolve()
    actions = init_workspace(workspace, force=force)
    if demo:
        from tuneserve.settings import default_cache_dir

        with stderr.status("Preparing the demo model (about a minute the first time)..."):
            actions += lay_out_demo(
                workspace, cache_dir or default_cache_dir(), force=force, toy=toy
            )
    for action in actions:
        stdout.print(f"{action.what:>10}  {_rel(action.path, workspace)}")
    stderr.print(
        "Next: fill in infra/provision/inference.parameters.json (see README.md), then "
        "'tuneserve provision' (add '--provider local' to try it on this machine)."
    )


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _ask() -> Callable[[str, str | None], str] | None:
    if not sys.stdin.isatty():
        return None

    def ask(question: str, default: str | None) -> str:
        return str(typer.prompt(question, default=default))

    return ask


def provision(
    workspace: Workspace = Path("."),
    provider: Annotated[
        str | None,
        typer.Option(
            help="; ".join(f"{name}: {cls.summary}" for name, cls in registry.PROVIDERS.items())
            + f" (default: the config's PROVIDER, else {DEFAULT_PROVIDER}).",
        ),
    ] = None,
    subscription: Annotated[
        str | None, typer.Option(help="Azure subscription id (default: the fine-tuning step's).")
    ] = None,
    resource_group: Annotated[
        str | None, typer.Option(help="Resource group (default: the fine-tuning step's).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="The endpoint's API key (default: the workspace's, else a new random one)."
        ),
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(
            help="The endpoint's admin key, which can also change adapters (default: the "
            "workspace's, else a new random one)."
        ),
    ] = None,
    **options: Any,
) -> None:
    from tuneserve.deploy.infra import load_config
    from tuneserve.deploy.workflow import provision as run_provision

    paths = _paths(workspace)
    if provider is None:
        provider = DEFAULT_PROVIDER
        if paths.config.exists():
            provider = load_config(paths.config, shown=paths.rel(paths.config)).provider
    config, keys, new_keys = run_provision(
        paths,
        provider=provider,
        subscription=subscription,
        resource_group=resource_group,
        api_key=api_key,
        admin_key=admin_key,
        options=options,
        ask=_ask(),
        console=stderr,
    )
    if new_keys:
        # shown once; later: `tuneserve endpoint --show-key`
        stderr.print(f"[bold]API key:[/]   {keys.api_key}", highlight=False, markup=True)
        stderr.print(f"[bold]Admin key:[/] {keys.admin_key}  (also loads/unloads adapters)")
    stderr.print(f"Wrote {paths.rel(paths.config)} ({provider}). Next: 'tuneserve deploy'.")
    stdout.print(config.to_json().rstrip())


def _with_providers(command: F) -> F:
    """The command with --provider choosing among the registry's providers and a flag for each
    provider's own provision option (deploy/registry.py), placed before --api-key; the command
    takes those as **options."""
    signature = inspect.signature(command, eval_str=True)
    shared = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    chosen = next(i for i, p in enumerate(shared) if p.name == "provider")
    [option_info] = shared[chosen].annotation.__metadata__
    choices = Literal[tuple(registry.names())]  # type: ignore[valid-type]
    shared[chosen] = shared[chosen].replace(annotation=Annotated[choices | None, option_info])
    at = next(i for i, p in enumerate(shared) if p.name == "api_key")
    own = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                takers[0][1].type,
                typer.Option(help="; ".join(f"{who}: {opt.help}" for who, opt in takers)),
            ],
        )
        for name, takers in registry.provision_options().items()
    ]
    keyword = [p.replace(kind=p.KEYWORD_ONLY) for p in shared]
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*keyword[:at], *own, *keyword[at:]]
    )
    return command


provision = _with_providers(_errors(provision))


@_errors
def deploy(
    workspace: Workspace = Path("."),
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds to wait for the new revision to be ready (default: "
            + ", ".join(
                f"{name} {cls.default_timeout_s:.0f}" for name, cls in registry.PROVIDERS.items()
            )
            + ")."
        ),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=", ".join(n for n, cls in registry.PROVIDERS.items() if cls.fixed_replicas)
            + ": replicas to start (at most maximumInstanceCount) (default: 1).",
        ),
    ] = None,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Also delete share files that "
            "deploy did not upload (e.g. the fine-tuning step's outputs).",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace share files that deploy did not upload itself (the fine-tuning "
            "step's adapters, pushed adapters) where the workspace has a different file at the "
            "same path; without it they are kept and listed.",
        ),
    ] = False,
    include_model_cache: Annotated[
        bool | None,
        typer.Option(
            "--include-model-cache/--no-model-cache",
            help="Upload model-cache/ (the base model; its size is shown first) or leave the "
            "share's as it is. Default: uploaded only when the share has no base model yet and "
            "it is at most 1 GiB.",
            show_default=False,
        ),
    ] = None,
) -> None:
    from tuneserve.deploy.workflow import provider_for

    result = provider_for(_paths(workspace), stderr).deploy(
        timeout=timeout,
        replicas=replicas,
        prune=prune,
        force=force,
        include_model_cache=include_model_cache,
    )
    stderr.print(
        f"[green]Deployed[/] revision {result.revision} ({result.replicas} replica(s) ready; "
        f"sync: {result.sync_summary})."
    )
    stdout.print(result.endpoint)


@_errors
def endpoint(
    workspace: Workspace = Path("."),
    show_key: Annotated[
        bool,
        typer.Option("--show-key", help="Print the API key (for scripts: KEY=$(... --show-key))."),
    ] = False,
    show_admin_key: Annotated[
        bool, typer.Option("--show-admin-key", help="Print the admin key.")
    ] = False,
) -> None:
    from tuneserve.deploy.infra import load_complete_config
    from tuneserve.deploy.keys import keys_path, load_keys

    paths = _paths(workspace)
    if show_key or show_admin_key:
        keys = load_keys(paths)
        if keys is None:
            raise TuneserveError(
                f"{paths.rel(keys_path(paths))} not found: 'tuneserve provision' makes the keys"
            )
        stdout.print(keys.admin_key if show_admin_key else keys.api_key)
        return
    config = load_complete_config(paths.config, shown=paths.rel(paths.config))
    stdout.print(config.endpoint_url)


@_errors
def status(
    workspace: Workspace = Path("."),
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TUNESERVE_API_KEY",
            help="The server's API key, to list its models (default: the workspace's keys).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    from tuneserve.deploy.keys import resolve_key
    from tuneserve.deploy.workflow import provider_for

    paths = _paths(workspace)
    report = provider_for(paths, stderr).status(api_key=resolve_key(paths, api_key))
    if as_json:
        stdout.print_json(json.dumps(report.as_dict()))
        return
    rows = [
        ("provider", report.provider),
        ("app", report.app),
        ("revision", report.revision or "(none)"),
        ("ready", "yes" if report.ready else "no"),
        ("replicas", str(len(report.replicas))),
        ("adapters", ", ".join(report.adapters) if report.adapters is not None else "(unknown)"),
    ]
    for key, value in rows:
        stdout.print(f"{key:>9}: {value}")
    for replica in report.replicas:
        flags = ", ".join(f"{k}={v}" for k, v in replica.items() if k not in ("name", "log"))
        stdout.print(f"           {replica.get('name')}  {flags}")
    for note in report.notes:
        stderr.print(f"note: {note}")
    stdout.print(f"{'endpoint':>9}: {report.endpoint}")


@_errors
def logs(
    workspace: Workspace = Path("."),
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    tail: Annotated[int, typer.Option(min=0, help="Lines to show first.")] = 100,
    revision: Annotated[
        str | None,
        typer.Option(help="A revision other than the serving one (e.g. a failed deploy's)."),
    ] = None,
) -> None:
    from tuneserve.deploy.workflow import provider_for

    provider = provider_for(_paths(workspace), stderr)
    try:
        for line in provider.logs(tail=tail, follow=follow, revision=revision):
            typer.echo(line)
    except KeyboardInterrupt:
        pass


@_errors
def stop(workspace: Workspace = Path(".")) -> None:
    from tuneserve.deploy.workflow import provider_for

    stdout.print(provider_for(_paths(workspace), stderr).stop())
