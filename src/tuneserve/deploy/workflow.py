"""The provision/deploy workflow the CLI drives: read infra/, pick the provider, write the config.

deploy/ never imports engine/ or server/: the replicas it starts run `tuneserve serve`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console

from tuneserve.deploy.atomic import write_atomic
from tuneserve.deploy.base import Ask, Provider, stderr_console
from tuneserve.deploy.infra import (
    InferenceConfig,
    InfraPaths,
    load_complete_config,
    load_finetuning_config,
    load_finetuning_names,
    load_parameters,
)
from tuneserve.deploy.keys import EndpointKeys, keys_path, provision_keys
from tuneserve.deploy.registry import open_provider, provider_class
from tuneserve.errors import NotProvisionedError

__all__ = ["open_provider", "provider_for", "provision"]


def provider_for(paths: InfraPaths, console: Console | None = None) -> Provider:
    """The provider of a provisioned (or hand-filled) workspace."""
    config = load_complete_config(paths.config, shown=paths.rel(paths.config))
    return open_provider(paths, config.provider, config, console)


def provision(
    paths: InfraPaths,
    *,
    provider: str,
    subscription: str | None = None,
    resource_group: str | None = None,
    api_key: str | None = None,
    admin_key: str | None = None,
    options: Mapping[str, Any] | None = None,
    ask: Ask | None = None,
    console: Console | None = None,
) -> tuple[InferenceConfig, EndpointKeys, bool]:
    """Create or update the resources; returns the config, the endpoint's keys, and whether
    the keys are new (the caller shows new keys once). `options` are the provider's own
    (registry.provision_options); those of other providers, or None, are left out."""
    console = console or stderr_console()
    cls = provider_class(provider)
    if not paths.parameters.exists():
        raise NotProvisionedError(
            f"{paths.rel(paths.parameters)} not found: run 'tuneserve init' first"
        )
    parameters = load_parameters(paths.parameters, shown=paths.rel(paths.parameters))
    finetuning = load_finetuning_config(paths.finetuning_config)
    sub, rg = cls.scope(subscription, resource_group, finetuning, ask)
    keys, new_keys = provision_keys(paths, api_key=api_key, admin_key=admin_key)
    own = {opt.name for opt in cls.request_type.options()}
    for name, value in (options or {}).items():
        if value is not None and name not in own:
            flag = "--" + name.replace("_", "-")
            console.print(f"note: {flag} does not apply to the {provider} provider; ignored")
    request = cls.request_type(
        subscription_id=sub,
        resource_group=rg,
        parameters=parameters,
        finetuning=finetuning,
        finetuning_names=load_finetuning_names(
            paths.finetuning_parameters, shown=paths.rel(paths.finetuning_parameters)
        ),
        keys=keys,
        **{k: v for k, v in (options or {}).items() if k in own and v is not None},
    )
    config = cls(paths, None, console).provision(request)
    write_atomic(paths.config, config.to_json())
    if new_keys:
        console.print(f"Keys kept in {paths.rel(keys_path(paths))} (readable by you only).")
    return config, keys, new_keys
