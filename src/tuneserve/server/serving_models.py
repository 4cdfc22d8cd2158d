"""GET /v1/models: the base model and every served adapter, as vLLM lists them.

The adapter set changes at runtime (server/adapter_registry.py), so each call lists what the
engine serves now; an adapter's `created` is when it was (last) loaded.
"""

from __future__ import annotations

import time

from tuneserve.server.adapter_registry import AdapterRegistry
from tuneserve.server.generation import GenerationService
from tuneserve.server.protocol import ModelCard, ModelList


class OpenAIServingModels:
    def __init__(self, service: GenerationService, registry: AdapterRegistry) -> None:
        self.service = service
        self.registry = registry
        self.created = int(time.time())  # when the server came up

    def list(self) -> ModelList:
        served = self.service.served
        cards = [
            ModelCard(
                id=served.base_name,
                created=self.created,
                root=served.base_path,
                max_model_len=served.max_model_len,
            )
        ]
        for name, spec in self.service.engine.adapters.items():
            loaded_at = self.registry.loaded_at(name)
            cards.append(
                ModelCard(
                    id=name,
                    created=int(loaded_at) if loaded_at else self.created,
                    root=str(spec.path),
                    parent=served.base_name,
                    max_model_len=served.max_model_len,
                )
            )
        return ModelList(data=cards)
