"""GET /v1/models: the base model and every served adapter, as vLLM lists them."""

from __future__ import annotations

import time

from tuneserve.server.generation import GenerationService
from tuneserve.server.protocol import ModelCard, ModelList


class OpenAIServingModels:
    def __init__(self, service: GenerationService) -> None:
        self.service = service
        self.created = int(time.time())  # when the server came up: the models are fixed then

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
        for name in self.service.engine.adapter_names:
            spec = served.adapters.get(name)
            cards.append(
                ModelCard(
                    id=name,
                    created=self.created,
                    root=str(spec.path) if spec else None,
                    parent=served.base_name,
                    max_model_len=served.max_model_len,
                )
            )
        return ModelList(data=cards)
