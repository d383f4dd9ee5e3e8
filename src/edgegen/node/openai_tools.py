"""Tool calls on `/v1/chat/completions`: the request's `tools` and `tool_choice`, the grammar that forces a
call, and the calls read back out of an answer.

How the tools reach the model is `engine/prompt.py`'s business: its own chat template where that takes
them, else the Hermes form in the system message (`<tool_call>{"name": …, "arguments": {…}}</tool_call>`
to call one). What comes back depends on `tool_choice`:
* `"required"`, or one function by name: the answer is drawn under a JSON grammar of
  `{"name": <an allowed tool>, "arguments": <that tool's parameters>}` (`call_schema`), so it is one call
  every time, whatever the model says; the whole answer is that call.
* `"auto"` (the default with tools): free text, and each `<tool_call>…</tool_call>` block in it holding
  JSON with the name of one of the tools and an object of arguments becomes a call (the first only, with
  `parallel_tool_calls: false`); anything else, such a block too, stays content.
* `"none"`: the tools are in the prompt and the answer is text, as on OpenAI.

Calls come back in OpenAI's shape, `{"id": "call_…", "type": "function", "function": {"name": …,
"arguments": "<JSON text>"}}`, with `finish_reason` `"tool_calls"` and `content` null when there is
nothing else to say. A stream sends each call whole in one `delta.tool_calls` entry once the answer has
ended; text from a call's opening tag on is held back until then (`CallStream`), so no chunk ever shows a
call as content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgegen.engine.prompt import CALL_CLOSE, CALL_OPEN, nests_within
from edgegen.executors.base import MAX_SCHEMA_CHARS, MAX_SCHEMA_DEPTH

MAX_TOOLS = 64
ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_BLOCK = re.compile(f"{re.escape(CALL_OPEN)}(.*?){re.escape(CALL_CLOSE)}", re.DOTALL)
# A function that takes no parameters (`parameters` left out) is called with `{}`.
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class _Function(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        if parameters is not None:
            _check_schema(parameters)
        return parameters


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: _Function


class _Named(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: ToolName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: _Named


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class _Called(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: ToolName
    arguments: str


class ToolCall(BaseModel):
    """A call in an earlier assistant message, as OpenAI's client sends a chat back after one."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: str
    type: Literal["function"]
    function: _Called

    def plain(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": self.function.model_dump()}


def _check_schema(schema: dict[str, Any]) -> None:
    """A tool's parameters within response_format's bounds on a schema, and of an object."""
    if not nests_within(schema, MAX_SCHEMA_DEPTH):
        raise ValueError(f"the parameters schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_CHARS:
        raise ValueError(f"the parameters schema has {size} characters; at most {MAX_SCHEMA_CHARS}")
    if schema.get("type", "object") != "object":
        raise ValueError('parameters must be the JSON schema of an object ("type": "object")')


def unique_names(tools: list[Tool] | None) -> list[Tool] | None:
    """`tools`, once no two share a name (a call names its function by name only)."""
    names = [tool.function.name for tool in tools or ()]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"two tools are named {twice[0]!r}")
    return tools


def choice_among(choice: ToolChoice | None, tools: list[Tool] | None) -> None:
    """Raises ValueError when `choice` asks for a call that `tools` cannot give."""
    if choice in (None, "none"):
        return
    if not tools:
        raise ValueError("tool_choice other than 'none' needs tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
        raise ValueError(f"no tool is named {choice.function.name!r}")


@dataclass(frozen=True)
class ToolUse:
    """What an answer may hold of calls: to the tools `names`, forced (a grammar) or found in free text."""

    names: frozenset[str]
    forced: bool
    parallel: bool


def tool_use(tools: Sequence[Tool] | None, choice: ToolChoice | None, parallel: bool) -> ToolUse | None:
    """What to read out of the answer; None: plain text (no tools, or `tool_choice` "none")."""
    if not tools or choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        return ToolUse(frozenset({choice.function.name}), forced=True, parallel=False)
    names = frozenset(tool.function.name for tool in tools)
    return ToolUse(names, forced=choice == "required", parallel=parallel)


def call_schema(tools: Sequence[Tool], names: frozenset[str]) -> dict[str, Any]:
    """The JSON schema of one call to one of the tools named `names`: its name, then its arguments.

    Each tool's parameters move under the root's `$defs`, their own `$ref`s rebased there (the converter
    resolves a reference from the root of the schema it is given).

    >>> tool = Tool.model_validate({"type": "function", "function": {"name": "now"}})
    >>> call_schema([tool], frozenset({"now"}))["properties"]
    {'name': {'const': 'now'}, 'arguments': {'$ref': '#/$defs/tool0'}}
    """
    chosen = [tool.function for tool in tools if tool.function.name in names]
    defs, calls = {}, []
    for i, function in enumerate(chosen):
        parameters = function.parameters or _NO_PARAMETERS
        defs[f"tool{i}"] = _rebased({"type": "object", **parameters}, f"#/$defs/tool{i}")
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": function.name}, "arguments": {"$ref": f"#/$defs/tool{i}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    root = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**root, "$defs": defs}


def _rebased(node: Any, root: str) -> Any:
    if isinstance(node, dict):
        return {
            key: root + value[1:]
            if key == "$ref" and isinstance(value, str) and value.startswith("#")
            else _rebased(value, root)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rebased(value, root) for value in node]
    return node


def new_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _call(text: str, use: ToolUse) -> dict[str, Any] | None:
    """The call `text` holds as JSON, when it names one of the tools and gives an object of arguments."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    name = value.get("name") if isinstance(value, dict) else None
    if not isinstance(name, str) or name not in use.names:
        return None
    arguments = value.get("arguments", {})
    return new_call(name, arguments) if isinstance(arguments, dict) else None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def read_calls(text: str, use: ToolUse) -> tuple[str, list[dict[str, Any]]]:
    """The answer's calls, and the text left around them.

    >>> use = ToolUse(frozenset({"now"}), forced=False, parallel=True)
    >>> text = 'Let me see. <tool_call>{"name": "now", "arguments": {}}</tool_call>'
    >>> content, calls = read_calls(text, use)
    >>> content, [call["function"] for call in calls]
    ('Let me see. ', [{'name': 'now', 'arguments': '{}'}])
    """
    if use.forced:
        call = _call(text, use)
        return ("", [call]) if call is not None else (text, [])
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    start = 0
    for block in _BLOCK.finditer(text):
        call = _call(block[1], use) if use.parallel or not calls else None
        if call is not None:
            kept.append(text[start : block.start()])
            calls.append(call)
            start = block.end()
    kept.append(text[start:])
    return "".join(kept), calls


def message_of(text: str, use: ToolUse | None) -> tuple[dict[str, Any], bool]:
    """The whole answer's message, and whether it holds calls."""
    if use is None:
        return {"role": "assistant", "content": text}, False
    content, calls = read_calls(text, use)
    if not calls:
        return {"role": "assistant", "content": content}, False
    return {"role": "assistant", "content": content if content.strip() else None, "tool_calls": calls}, True


class CallStream:
    """An answer's calls as it streams: text that cannot be part of a call goes out as it comes, the rest
    is held until the end, when `finish` reads the calls out of it.

    What goes out adds up to `message_of`'s content: whitespace is held until there is more to say (an
    answer of calls alone has no content), and so is a tail that could begin a call's opening tag.
    """

    def __init__(self, use: ToolUse) -> None:
        self._use = use
        self._held = ""
        self._holding_all = use.forced  # a forced answer is one call; in free text, a call has begun
        self._sent = False

    def feed(self, text: str) -> str:
        """What of `text` (and of what was held) may go out as content now."""
        self._held += text
        if self._holding_all:
            return ""
        at = self._held.find(CALL_OPEN)
        if at >= 0:
            self._holding_all = True
            cut = at
        else:
            cut = len(self._held) - _tag_start(self._held)
        if not self._sent and not self._held[:cut].strip():
            return ""
        out, self._held = self._held[:cut], self._held[cut:]
        self._sent = True
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The content still to go out, and the calls."""
        content, calls = read_calls(self._held, self._use)
        if calls and not self._sent and not content.strip():
            content = ""
        return content, calls


def _tag_start(text: str) -> int:
    """How many characters at the end of `text` could begin a call's opening tag."""
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            return n
    return 0
