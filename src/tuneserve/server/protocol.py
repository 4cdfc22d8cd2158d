"""The OpenAI wire format: request and response bodies as pydantic models.

Request fields follow OpenAI's API reference in its order
(https://platform.openai.com/docs/api-reference/chat/create); our extensions, the same as
vLLM's, are grouped below them. Every field is honoured or refused by name: an unknown field
gets OpenAI's own 400 ("Unrecognized request argument supplied"), and a documented field this
server does not implement (`NOT_IMPLEMENTED`) is accepted only at a value that asks for
nothing. `to_sampling_params()` is the only way out to the engine: it never sees pydantic.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    Tag,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tuneserve.engine.grammar import ConstraintError, check_constraint
from tuneserve.engine.types import Constraint, SamplingParams

# choices per request (n, best_of): each one is a full generation; OpenAI allows 128
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20  # chat (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5  # completions (OpenAI's limit)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def field_error(param: str, message: str) -> PydanticCustomError:
    """A cross-field rule's error that still names its field (the handler reads ctx["param"])."""
    return PydanticCustomError("invalid_field", "{message}", {"param": param, "message": message})


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIBaseModel):
    """A request body or a part of one: a field we do not know is refused, not ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# Documented OpenAI fields this server does not implement: (values that ask for nothing, why).
# Sent with one of those values they are dropped; with anything else refused by name.
NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "audio": ((None,), "audio output is not supported: this server generates text"),
    "modalities": ((None, ["text"]), 'only ["text"] is supported'),
    "functions": ((None,), "deprecated by OpenAI and not supported: send 'tools'"),
    "function_call": ((None,), "deprecated by OpenAI and not supported: send 'tool_choice'"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "not supported: the served model has no reasoning setting"),
    "verbosity": ((None,), "not supported: the served model has no verbosity setting"),
    "web_search_options": ((None,), "web search is not available on this server"),
    "moderation": ((None,), "moderation is not available on this server"),
    "store": ((None, False), "this server does not store completions"),
    "metadata": ((None,), "metadata goes with stored completions, which this server does not keep"),
    "service_tier": ((None, "auto", "default"), "this server has one tier: 'auto' or 'default'"),
    "prompt_cache_key": ((None,), "prompt caching is not available on this server"),
    "prompt_cache_options": ((None,), "prompt caching is not available on this server"),
    "prompt_cache_retention": ((None,), "prompt caching is not available on this server"),
    "suffix": ((None, ""), "inserting text before a suffix is not supported"),
}


def refuse_not_implemented(data: Any, names: tuple[str, ...]) -> Any:
    """Drop the `names` of NOT_IMPLEMENTED that ask for nothing; refuse the others by name."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name in names:
        if name not in data:
            continue
        neutral, why = NOT_IMPLEMENTED[name]
        if data[name] not in neutral:
            raise field_error(name, why)
        del data[name]
    return data


# -- errors ------------------------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """FastAPI's `responses=` for routes that answer errors as ErrorResponse: one entry per
    status, and "default" for the rest (which also keeps FastAPI from documenting a 422 we
    never send: validation is a 400)."""
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": text}
        for status, text in descriptions.items()
    }
    responses["default"] = {
        "model": ErrorResponse,
        "description": "Any other error, in the same shape.",
    }
    return responses


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
class StreamOptions(RequestModel):
    include_usage: bool = False
    include_obfuscation: bool | None = Field(
        None, description="Only false: this server sends no obfuscation padding."
    )

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("this server sends no obfuscation padding; only false is accepted")
        return value


class JsonSchemaFormat(RequestModel):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = Field(
        None, description="Output always conforms to the schema (constrained decoding)."
    )


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise field_error("json_schema", "is required when type is 'json_schema'")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return Constraint("json_schema", '{"type": "object"}')
        if self.type == "json_schema" and self.json_schema is not None:
            return Constraint("json_schema", json.dumps(self.json_schema.schema_ or {}))
        return None


class SamplingFields(RequestModel):
    """Fields both endpoints share, and their translation to the engine's SamplingParams."""

    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Lowers a token's logit per time it was generated."
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias from -100 to 100 added to its logit."
    )
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Lowers a token's logit once it was generated."
    )
    n: int = Field(
        1, ge=1, le=MAX_CHOICES, description="How many choices to generate for each prompt."
    )
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
    user: str | None = Field(None, description="An end-user id; no effect on the output.")
    safety_identifier: str | None = Field(
        None, description="An end-user id; no effect on the output."
    )

    # -- extensions (vLLM's names) --
    top_k: int | None = Field(
        None, ge=-1, description="Sample from the k most likely tokens; 0 or -1 turns it off."
    )
    repetition_penalty: float | None = Field(
        None, gt=0.0, description="Divides the logits of tokens already seen (>1 discourages)."
    )
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    min_tokens: int = Field(0, ge=0, description="Generate at least this many tokens before EOS.")
    guided_json: dict[str, Any] | str | None = Field(
        None, description="vLLM's: the output follows this JSON schema."
    )
    guided_regex: str | None = Field(None, description="vLLM's: the output matches this regex.")
    guided_choice: list[str] | None = Field(
        None, min_length=1, description="vLLM's: the output is one of these strings."
    )

    @field_validator("logit_bias")
    @classmethod
    def _bias_by_token_id(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            # ASCII only: str.isdigit() also takes "³" (which int() refuses) and "٣".
            if not (token.isascii() and token.isdigit()):
                raise ValueError(f"keys are token ids written as strings, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases go from -100 to 100, got {bias} for token {token}")
        return value

    _constraint: Constraint | None = PrivateAttr(None)

    def constraint(self) -> Constraint | None:
        """What the output must match (response_format or a guided_* field)."""
        return self._constraint

    def _find_constraint(self) -> Constraint | None:
        asked: list[tuple[str, Constraint]] = []
        if self.guided_json is not None:
            schema = self.guided_json
            text = schema if isinstance(schema, str) else json.dumps(schema)
            asked.append(("guided_json", Constraint("json_schema", text)))
        if self.guided_regex is not None:
            asked.append(("guided_regex", Constraint("regex", self.guided_regex)))
        if self.guided_choice is not None:
            asked.append(("guided_choice", Constraint("choice", json.dumps(self.guided_choice))))
        response_format = getattr(self, "response_format", None)
        if isinstance(response_format, ResponseFormat):
            found = response_format.constraint()
            if found is not None:
                asked.append(("response_format", found))
        if len(asked) > 1:
            names = " and ".join(name for name, _ in asked)
            raise field_error(asked[1][0], f"only one output constraint at a time: got {names}")
        if not asked:
            return None
        name, constraint = asked[0]
        try:
            check_constraint(constraint)
        except ConstraintError as exc:
            raise field_error(name, f"cannot be enforced: {exc}") from None
        return constraint

    def logprob_count(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the k most likely."""
        return None

    @model_validator(mode="after")
    def _constraint_enforceable(self) -> SamplingFields:
        self._constraint = self._find_constraint()
        return self

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

    def to_sampling_params(
        self, max_tokens: int, constraint: Constraint | None = None
    ) -> list[SamplingParams]:
        """One SamplingParams per choice; a seeded request gives choice i the seed `seed + i`.
        `constraint` (tool calls) stands in for the request's own."""
        top_k = self.top_k if self.top_k is not None and self.top_k > 0 else 0
        bias = tuple((int(token), value) for token, value in (self.logit_bias or {}).items())
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
                frequency_penalty=self.frequency_penalty or 0.0,
                presence_penalty=self.presence_penalty or 0.0,
                logit_bias=bias,
                logprobs=self.logprob_count(),
                constraint=constraint or self.constraint(),
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


FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None


# -- /v1/chat/completions ----------------------------------------------------------------
class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str


Role = Literal["system", "developer", "user", "assistant", "tool"]


class FunctionCall(RequestModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON object's text.")


class ToolCall(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: Role
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant turn's calls.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")
    refusal: str | None = Field(None, description="Accepted in history (assistant turns).")

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # Only an assistant turn may omit content (OpenAI allows it next to tool calls).
        if self.content is None and self.role != "assistant":
            raise field_error("content", f"a {self.role!r} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise field_error("tool_calls", "only an assistant message carries tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise field_error("tool_call_id", "a 'tool' message names the call it answers")
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
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            # Hugging Face chat templates take the arguments as a mapping
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _json_or_text(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        return message


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema of the arguments (an object with no properties if null)."
    )
    strict: bool | None = Field(
        None, description="Forced calls always conform to the schema (constrained decoding)."
    )


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


def _tool_choice_kind(value: Any) -> str:
    return "NamedToolChoice" if isinstance(value, dict | NamedToolChoice) else "ToolChoiceMode"


# an object is a named function, anything else a mode: a malformed object is reported as that
# alone, not also as "not one of the modes" (the tags are type names: error paths skip them)
ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("ToolChoiceMode")]
    | Annotated[NamedToolChoice, Tag("NamedToolChoice")],
    Discriminator(_tool_choice_kind),
]


class ChatCompletionRequest(SamplingFields):
    # https://platform.openai.com/docs/api-reference/chat/create
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str
    logprobs: bool | None = Field(None, description="Return each token's log-probability.")
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Deprecated by OpenAI for max_completion_tokens."
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Whether one answer may hold several tool calls (default true)."
    )
    response_format: ResponseFormat | None = None
    tool_choice: ToolChoice | None = None
    tools: list[ChatTool] | None = None
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: the most likely tokens too."
    )

    @model_validator(mode="before")
    @classmethod
    def _not_implemented(cls, data: Any) -> Any:
        return refuse_not_implemented(
            data,
            (
                "audio",
                "modalities",
                "functions",
                "function_call",
                "prediction",
                "reasoning_effort",
                "verbosity",
                "web_search_options",
                "moderation",
                "store",
                "metadata",
                "service_tier",
                "prompt_cache_key",
                "prompt_cache_options",
                "prompt_cache_retention",
            ),
        )

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        limit = self.requested_max_tokens
        if limit is not None and self.min_tokens > limit:
            raise field_error("min_tokens", f"{self.min_tokens} is more than max_tokens ({limit})")
        if self.top_logprobs and not self.logprobs:
            raise field_error("top_logprobs", "needs logprobs set to true")
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise field_error("tool_choice", "needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names:
            raise field_error(
                "tool_choice",
                f"names {choice.function.name!r}, which is not among the tools "
                f"({', '.join(self.tool_names)})",
            )
        if self.forces_tool_call and self.constraint() is not None:
            raise field_error("tool_choice", "a forced tool call cannot have an output format too")
        return self

    @property
    def tool_names(self) -> list[str]:
        return [tool.function.name for tool in self.tools or []]

    @property
    def forces_tool_call(self) -> bool:
        """tool_choice "required" or a named function: the answer is a constrained call."""
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens wins over the older max_tokens when both are sent."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaFunctionCall(OpenAIBaseModel):
    name: str | None = None
    arguments: str = ""


class DeltaToolCall(OpenAIBaseModel):
    """A fragment of call `index`: its first fragment carries the id and the name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(OpenAIBaseModel):
    """A chunk's delta carries only what changed: {"content": "..."}, and {} in the last one."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
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
    best_of: int | None = Field(
        None, ge=1, le=MAX_CHOICES, description="Only best_of == n is supported."
    )
    echo: bool = Field(False, description="Put the prompt before each choice's text.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        description="Each token's log-probability and this many most likely tokens.",
    )
    max_tokens: int | None = Field(16, ge=1, description="null means up to the context length.")

    @model_validator(mode="before")
    @classmethod
    def _not_implemented(cls, data: Any) -> Any:
        return refuse_not_implemented(data, ("suffix",))

    def logprob_count(self) -> int | None:
        return self.logprobs

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
        if self.echo and self.logprobs is not None:
            raise field_error(
                "logprobs", "the prompt's logprobs (echo with logprobs) are not supported"
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
    logprobs: CompletionLogprobs | None = None
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
