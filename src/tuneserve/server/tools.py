"""Tool calls: the tools into the prompt, forced calls constrained, calls read from the output.

The prompt: a chat template that knows tools gets them (`tools=`) and renders calls and results
its own way. For a template that does not (SmolLM2's, the toy demo's), the Hermes format, which
Qwen2.5, Hermes and many fine-tunes are trained on, is written around it: the tools as JSON in
<tools></tools> in the system message, calls as <tool_call>{"name", "arguments"}</tool_call>
in the assistant turn, results as <tool_response></tool_response> in a user turn.

The answer, by tool_choice:
- "none" (or no tools): text; the tools stay in the prompt (as OpenAI and vLLM do).
- a named function: the output is its arguments, constrained to its parameters' schema.
- "required": the output is a JSON list of {"name", "arguments"} objects, constrained to the
  tools' schemas (one item at most when parallel_tool_calls is false).
- "auto": free text; <tool_call> blocks that parse become calls, the rest stays content.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tuneserve.engine.types import Constraint
from tuneserve.server.protocol import (
    ChatCompletionRequest,
    ChatTool,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
)

CALL_START, CALL_END = "<tool_call>", "</tool_call>"

_HERMES_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def template_knows_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in str(template)


def tool_schemas(tools: list[ChatTool]) -> list[dict[str, Any]]:
    return [tool.model_dump(exclude_none=True) for tool in tools]


def hermes_messages(messages: list[dict[str, Any]], tools: list[ChatTool]) -> list[dict[str, Any]]:
    """`messages` (template dicts) with the tools, calls and results written in Hermes' words."""
    listing = "\n".join(json.dumps(tool.function.model_dump(exclude_none=True)) for tool in tools)
    system = _HERMES_SYSTEM.format(tools=listing)
    out: list[dict[str, Any]] = []
    if messages and messages[0]["role"] == "system":
        out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{system}"})
        messages = messages[1:]
    else:
        out.append({"role": "system", "content": system})
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = [
                f"{CALL_START}\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                )
                + f"\n{CALL_END}"
                for c in message["tool_calls"]
            ]
            text = "\n".join(filter(None, [message.get("content") or "", *calls]))
            out.append({"role": "assistant", "content": text})
        elif message["role"] == "tool":
            response = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out[-1]["role"] == "user" and out[-1].get("tool_responses"):
                out[-1]["content"] += "\n" + response  # results of one turn's calls together
            else:
                out.append({"role": "user", "content": response, "tool_responses": True})
        else:
            out.append(message)
    return [{k: v for k, v in m.items() if k != "tool_responses"} for m in out]


def _call_schema(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def forced_call_constraint(request: ChatCompletionRequest) -> Constraint | None:
    """The constraint of a named or required tool choice; None for "auto"/"none"."""
    tools = request.tools or []
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return Constraint("json_schema", json.dumps(_call_schema(tool)))
    if choice == "required":
        item = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": tool.function.name},
                        "arguments": _call_schema(tool),
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for tool in tools
            ]
        }
        schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
        if request.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return Constraint("json_schema", json.dumps(schema))
    return None


def _new_call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=text)
    )


def _whole_call_deltas(calls: list[ToolCall], start: int = 0) -> list[DeltaToolCall]:
    return [
        DeltaToolCall(
            index=start + i,
            id=call.id,
            type="function",
            function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments),
        )
        for i, call in enumerate(calls)
    ]


class ToolCallReader:
    """One choice's output read as it streams: content to send, call fragments to send.

    `feed(text)` and then `end()` each return (content, call deltas); after `end()`, `calls`
    holds the whole calls. Non-streamed answers feed their whole text once.
    """

    def __init__(self, request: ChatCompletionRequest) -> None:
        choice = request.tool_choice
        self._named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        self._required = choice == "required"
        self._auto = bool(request.tools) and choice in (None, "auto")
        self._single = request.parallel_tool_calls is False
        self._buffer = ""
        self._in_call = False
        self._raw_calls: list[str] = []
        self.calls: list[ToolCall] = []

    @property
    def forced(self) -> bool:
        return self._named is not None or self._required

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        if self._named is not None:
            if not self.calls:
                self.calls.append(_new_call(self._named, ""))
                first = self.calls[0]
                self._buffer += text
                return "", [
                    DeltaToolCall(
                        index=0,
                        id=first.id,
                        type="function",
                        function=DeltaFunctionCall(name=self._named, arguments=text),
                    )
                ]
            self._buffer += text
            return "", [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))]
        if self._required:
            self._buffer += text
            return "", []
        if not self._auto:
            return text, []
        return self._scan(text), []

    def _scan(self, text: str) -> str:
        """Content outside <tool_call> blocks; a possible start tag at the end is held back."""
        self._buffer += text
        content: list[str] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(CALL_START)
                if start < 0:
                    keep = next(
                        (
                            n
                            for n in range(len(CALL_START) - 1, 0, -1)
                            if self._buffer.endswith(CALL_START[:n])
                        ),
                        0,
                    )
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return "".join(content)
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(CALL_START) :]
                self._in_call = True
            end = self._buffer.find(CALL_END)
            if end < 0:
                return "".join(content)
            self._raw_calls.append(self._buffer[:end])
            self._buffer = self._buffer[end + len(CALL_END) :]
            self._in_call = False

    def end(self) -> tuple[str, list[DeltaToolCall]]:
        if self._named is not None:
            if not self.calls:  # nothing generated: an empty argument text
                return "", self.feed("")[1]
            self.calls[0].function.arguments = self._buffer
            return "", []
        if self._required:
            try:
                items = json.loads(self._buffer)
            except ValueError:  # cut off by max_tokens: the text is all there is
                return self._buffer, []
            self.calls = [_new_call(item["name"], item["arguments"]) for item in items]
            return "", _whole_call_deltas(self.calls)
        if not self._auto:
            return "", []
        leftover = ""
        if self._in_call:  # a model that stopped before its closing tag
            self._raw_calls.append(self._buffer)
        else:
            leftover = self._buffer
        self._buffer = ""
        unparsed: list[str] = []
        for raw in self._raw_calls:
            call = self._parse(raw)
            if call is None:
                unparsed.append(f"{CALL_START}{raw}{CALL_END}")
            elif not (self._single and self.calls):
                self.calls.append(call)
        return leftover + "".join(unparsed), _whole_call_deltas(self.calls)

    @staticmethod
    def _parse(raw: str) -> ToolCall | None:
        try:
            item = json.loads(raw.strip())
        except ValueError:
            return None
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        return _new_call(item["name"], arguments)
