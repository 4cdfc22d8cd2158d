"""The OpenAI wire format: request and response bodies as pydantic models.

Request fields follow OpenAI's API reference in its order
(https://platform.openai.com/docs/api-reference/chat/create); our extensions, the same as
vLLM's, are grouped below them. Unknown fields are ignored, as vLLM does, so SDK extras and
fields of newer API versions never break a request. `to_sampling_params()` is the only way
out to the engine: it never sees pydantic.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tuneserve.engine.types import SamplingParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def field_error(param: str, message: str) -> PydanticCustomError:
    """A cross-field rule's error that still names its field (the handler reads ctx["param"])."""
    return PydanticCustomError("invalid_field", "{message}", {"param": param, "message": message})


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- errors ------------------------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# -- /v1/models --------------------------------------------------------------------------
class ModelCard(OpenAIBaseModel):
    """vLLM's shape: `parent` is the base model's id for an adapter, None for the base."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tuneserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# -- shared request pieces ---------------------------------------------------------------
class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class SamplingFields(OpenAIBaseModel):
    """Fields both endpoints share, and their translation to the engine's SamplingParams."""

    frequency_penalty: float | None = Field(
        None,
        description="Accepted for compatibility; only 0 is supported (use repetition_penalty).",
    )
    presence_penalty: float | None = Field(
        None,
        description="Accepted for compatibility; only 0 is supported (use repetition_penalty).",
    )
    n: int = Field(1, ge=1, description="How many choices to generate for each prompt.")
    seed: int | None = Field(
        None, description="Makes sampling reproducible; choice i of n uses seed + i."
    )
    stop: str | list[str] | None = Field(
        None, description="Up to 4 strings (more are accepted) that end the text; not returned."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling; default 1.")
    user: str | None = None

    # -- extensions (vLLM's names) --
    top_k: int | None = Field(
        None, ge=-1, description="Sample from the k most likely tokens; 0 or -1 turns it off."
    )
    repetition_penalty: float | None = Field(
        None, gt=0.0, description="Divides the logits of tokens already seen (>1 discourages)."
    )
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    min_tokens: int = Field(0, ge=0, description="Generate at least this many tokens before EOS.")

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalty_unsupported(cls, value: float | None) -> float | None:
        if value not in (None, 0, 0.0):
            raise ValueError(
                "only 0 is supported; use repetition_penalty (> 1 discourages repeats)"
            )
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise field_error("stream_options", "may only be set when stream is true")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        # "" would end every completion at once; clients send it to mean "no stop".
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, max_tokens: int) -> list[SamplingParams]:
        """One SamplingParams per choice; a seeded request gives choice i the seed `seed + i`."""
        top_k = self.top_k if self.top_k is not None and self.top_k > 0 else 0
        return [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=top_k,
                repetition_penalty=self.repetition_penalty or 1.0,
                seed=None if self.seed is None else self.seed + i,
                stop=self.stop_strings(),
                ignore_eos=self.ignore_eos,
                min_tokens=min(self.min_tokens, max_tokens),
            )
            for i in range(self.n)
        ]


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Literal["stop", "length"]


# -- /v1/chat/completions ----------------------------------------------------------------
class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


Role = Literal["system", "developer", "user", "assistant"]


class ChatMessage(OpenAIBaseModel):
    role: Role
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # Only an assistant turn may omit content (OpenAI allows it next to tool calls).
        if self.content is None and self.role != "assistant":
            raise field_error("content", f"a {self.role!r} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            # vLLM's "string" content format: text parts joined by newlines.
            return "\n".join(part.text for part in self.content)
        return self.content or ""

    def to_template(self) -> dict[str, Any]:
        # "developer" is OpenAI's new name for "system"; chat templates only know the old one.
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingFields):
    # https://platform.openai.com/docs/api-reference/chat/create
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str
    logprobs: bool | None = Field(None, description="Not supported: only false is accepted.")
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Deprecated by OpenAI for max_completion_tokens."
    )

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported by this server")
        return value

    @model_validator(mode="after")
    def _min_tokens_within_max(self) -> ChatCompletionRequest:
        limit = self.requested_max_tokens
        if limit is not None and self.min_tokens > limit:
            raise field_error("min_tokens", f"{self.min_tokens} is more than max_tokens ({limit})")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens wins over the older max_tokens when both are sent."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    """A chunk's delta carries only what changed: {"content": "..."}, and {} in the last one."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# -- /v1/completions ---------------------------------------------------------------------
Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    # https://platform.openai.com/docs/api-reference/completions/create
    model: str
    prompt: Prompt
    best_of: int | None = Field(None, ge=1, description="Only best_of == n is supported.")
    echo: bool = Field(False, description="Put the prompt before each choice's text.")
    logprobs: int | None = Field(None, description="Not supported: only null is accepted.")
    max_tokens: int | None = Field(16, ge=1, description="null means up to the context length.")
    suffix: str | None = Field(None, description="Not supported: only null is accepted.")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("logprobs are not supported by this server")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported by this server")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: Prompt) -> Prompt:
        if isinstance(value, list) and (not value or any(p in ("", []) for p in value)):
            raise ValueError("must not be empty, nor hold an empty prompt")
        return value

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise field_error(
                "best_of", f"only best_of == n ({self.n}) is supported, got {self.best_of}"
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise field_error(
                "min_tokens", f"{self.min_tokens} is more than max_tokens ({self.max_tokens})"
            )
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: one entry (text or token ids) per prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# -- /v1/adapters (admin): not OpenAI's -------------------------------------------------------
# The server answers with these and `tuneserve adapters` reads its answers with them, so the
# two sides of the wire share one definition (server/routes_adapters.py has the routes).
AdapterSource = Literal["startup", "api", "share"]


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="The adapter's id in requests (`model`).", examples=["support-v2"]
    )
    path: str = Field(
        description="Its folder, relative to the adapter root (or absolute, inside it).",
        examples=["support-v2"],
    )


class AdapterCard(BaseModel):
    name: str
    object: Literal["adapter"] = "adapter"
    path: str
    source: AdapterSource
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    state: Literal["hot", "cpu", "disk"] = Field(
        description="hot: in an engine slot; cpu: in CPU memory; disk: read on first use."
    )
    last_used: float | None = Field(description="Unix time of the last request using it.")
    loaded_at: float


class AdapterLoaded(AdapterCard):
    replaced: bool = Field(description="True when it replaced an adapter of the same name.")


class AdapterProblem(BaseModel):
    name: str
    path: str | None
    message: str


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    root: str | None = Field(description="The adapter root; null when none is configured.")
    data: list[AdapterCard]
    errors: list[AdapterProblem]


class AdapterDeleted(BaseModel):
    name: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


class VLLMLoadRequest(BaseModel):
    lora_name: str
    lora_path: str


class VLLMUnloadRequest(BaseModel):
    lora_name: str
