"""The provision/deploy workflow the CLI drives: read infra/, pick the provider, write the config.

deploy/ never imports engine/ or server/: the replicas it starts run `tuneserve serve`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from tuneserve.deploy.base import Provider, ProvisionRequest, stderr_console
from tuneserve.deploy.infra import (
    InferenceConfig,
    InfraPaths,
    load_complete_config,
    load_finetuning_config,
    load_finetuning_names,
    load_parameters,
    write_text_atomic,
)
from tuneserve.deploy.infra import (
    Provider as ProviderName,
)
from tuneserve.deploy.keys import EndpointKeys, keys_path, provision_keys
from tuneserve.errors import DeployError, NotProvisionedError

Ask = Callable[[str, str | None], str]  # (question, default) -> answer


def open_provider(
    paths: InfraPaths,
    name: ProviderName,
    config: InferenceConfig | None,
    console: Console | None = None,
) -> Provider:
    console = console or stderr_console()
    if name == "local":
        from tuneserve.deploy.local import LocalProvider

        return LocalProvider(paths, config, console)
    from tuneserve.deploy.azure import AzureProvider

    return AzureProvider(paths, config, console)


def provider_for(paths: InfraPaths, console: Console | None = None) -> Provider:
    """The provider of a provisioned (or hand-filled) workspace."""
    config = load_complete_config(paths.config, shown=paths.rel(paths.config))
    return open_provider(paths, config.provider, config, console)


def _pick(
    flag: str | None,
    fallback: str | None,
    *,
    question: str,
    option: str,
    ask: Ask | None,
) -> str:
    if flag:
        return flag
    if ask is not None:
        return ask(question, fallback)
    if fallback:
        return fallback
    raise DeployError(f"{question} is needed: pass {option} (no terminal to ask on)")


def provision(
    paths: InfraPaths,
    *,
    provider: ProviderName,
    subscription: str | None = None,
    resource_group: str | None = None,
    location: str | None = None,
    port: int | None = None,
    share_dir: Path | None = None,
    api_key: str | None = None,
    admin_key: str | None = None,
    ask: Ask | None = None,
    console: Console | None = None,
) -> tuple[InferenceConfig, EndpointKeys, bool]:
    """Create or update the resources; returns the config, the endpoint's keys, and whether
    the keys are new (the caller shows new keys once)."""
    console = console or stderr_console()
    if not paths.parameters.exists():
        raise NotProvisionedError(
            f"{paths.rel(paths.parameters)} not found: run 'tuneserve init' first"
        )
    parameters = load_parameters(paths.parameters, shown=paths.rel(paths.parameters))
    finetuning = load_finetuning_config(paths.finetuning_config)
    ft_sub = finetuning.SUBSCRIPTION_ID if finetuning else None
    ft_rg = finetuning.RESOURCE_GROUP_NAME if finetuning else None
    if provider == "local":
        sub = subscription or "local"
        rg = resource_group or "local"
    else:
        sub = _pick(
            subscription, ft_sub, question="Azure subscription id", option="--subscription", ask=ask
        )
        rg = _pick(
            resource_group, ft_rg, question="Resource group", option="--resource-group", ask=ask
        )
    keys, new_keys = provision_keys(paths, api_key=api_key, admin_key=admin_key)
    request = ProvisionRequest(
        subscription_id=sub,
        resource_group=rg,
        parameters=parameters,
        finetuning=finetuning,
        finetuning_names=load_finetuning_names(
            paths.finetuning_parameters, shown=paths.rel(paths.finetuning_parameters)
        ),
        location=location,
        port=port,
        share_root=share_dir,
        keys=keys,
    )
    derived = sorted(set(request.resolved_names()) - set(request.explicit_names()))
    if provider == "local" and derived:
        console.print(
            f"note: {', '.join(derived)} derived as the template does (prefix + first 5 "
            "characters of uniqueString(resourceGroup().id), reimplemented: an approximation "
            "of Azure's)"
        )
    config = open_provider(paths, provider, None, console).provision(request)
    write_text_atomic(paths.config, config.to_json())
    if new_keys:
        console.print(f"Keys kept in {paths.rel(keys_path(paths))} (readable by you only).")
    return config, keys, new_keys
