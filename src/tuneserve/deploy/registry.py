"""The providers by name: `--provider`'s choices and help, the provision flags each provider
declares, and which class opens a workspace's infra/inference.config.json (its PROVIDER).

A new provider is a `Provider` subclass (deploy/base.py) added to PROVIDERS; nothing else names
providers."""

from __future__ import annotations

from rich.console import Console

from tuneserve.deploy.azure import AzureProvider
from tuneserve.deploy.base import Provider, ProvisionOption, stderr_console
from tuneserve.deploy.infra import InferenceConfig, InfraPaths
from tuneserve.deploy.k8s.provider import KubernetesProvider
from tuneserve.deploy.local import LocalProvider
from tuneserve.errors import ProviderError

PROVIDERS: dict[str, type[Provider]] = {
    cls.name: cls for cls in (LocalProvider, AzureProvider, KubernetesProvider)
}


def names() -> list[str]:
    return list(PROVIDERS)


def provider_class(name: str) -> type[Provider]:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise ProviderError(
            f"unknown provider {name!r}; the providers are: {', '.join(PROVIDERS)}"
        ) from None


def open_provider(
    paths: InfraPaths, name: str, config: InferenceConfig | None, console: Console | None = None
) -> Provider:
    return provider_class(name)(paths, config, console or stderr_console())


def provision_options() -> dict[str, list[tuple[str, ProvisionOption]]]:
    """Every provider's provision options by name, each with the providers that declare it
    (one flag serves them all, so they must agree on its type)."""
    merged: dict[str, list[tuple[str, ProvisionOption]]] = {}
    for cls in PROVIDERS.values():
        for opt in cls.request_type.options():
            takers = merged.setdefault(opt.name, [])
            if takers and takers[0][1].type != opt.type:
                raise TypeError(
                    f"provision option {opt.name!r} is {takers[0][1].type} for {takers[0][0]} "
                    f"but {opt.type} for {cls.name}: one flag takes one type"
                )
            takers.append((cls.name, opt))
    return merged
