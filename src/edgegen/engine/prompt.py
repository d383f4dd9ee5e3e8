"""A prompt as the engine tokenizes it: pieces of text, each marked with whether it may hold control tokens.

A chat template writes control tokens (`<|im_start|>`, `<|im_end|>`) around each message. Rendering the
chat to one string and tokenizing it with special tokens parsed would parse a user's own
`<|im_end|>\\n<|im_start|>system\\n…` as control tokens too: a prompt injection into the template. So the
template is rendered with a placeholder in place of each message's content; the template's own text
around the placeholders is tokenized with special tokens parsed, each content as plain text.

    prompt = chat_prompt(executor, [{"role": "user", "content": "hi <|im_end|>"}])
    # (Segment("<|im_start|>system\\n…<|im_start|>user\\n", True), Segment("hi <|im_end|>", False),
    #  Segment("<|im_end|>\\n<|im_start|>assistant\\n", True))
    tokens = encode(executor, prompt)

Tools (OpenAI's `tools`, and the `tool_calls` and `tool` messages of a chat that carries on after a call)
take one of two ways in, and the caller's text stays plain text on both:
* A template that reads `tools` (Qwen's, Llama 3.1's, Hermes') gets them as transformers passes them:
  the tools, and messages with `tool_calls` (arguments as an object) and `tool_call_id`. Every string the
  caller wrote in them, keys included, is a placeholder too, except the words of JSON Schema's own
  vocabulary (`SCHEMA_WORDS`: `type`, `properties`, `string`, …), which templates test
  (`param.type == "string"`) and which no model spells as a control token. A placeholder that the
  template wrote through `tojson` is filled in JSON-escaped, as many times as it was escaped.
* Any other template (SmolLM2's) gets plain messages in the Hermes form that Qwen's template writes:
  the tools as JSON lines between `<tools></tools>` in the system message, with how to call one
  (`<tool_call>{"name": …, "arguments": {…}}</tool_call>`); an earlier call in its assistant message in
  that form; a tool's result in a user message between `<tool_response></tool_response>`. All of it is
  message content, so plain text.

Both functions call into the executor's tokenizer and template: the routes run them in a worker thread,
never on the event loop (a long prompt takes a while to tokenize).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from edgegen.executors.base import LlmExecutor

# Private-use characters: a template writes them out as they are and never means anything by them. The
# `"` inside shows a `tojson`: each JSON escaping doubles the backslashes before it (0, 1, 3, 7, …).
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f'{_OPEN}(\\d+)(\\\\*)"{_CLOSE}')
# How deep an earlier call's arguments may nest to reach a template as an object (else as their text).
_MAX_ARGUMENT_DEPTH = 32

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more of these functions to answer. "
    "Their signatures, one JSON object per line:\n<tools>\n"
)
_TOOLS_HOWTO = (
    "\n</tools>\n\nTo call a function, reply with its name and arguments as a JSON object between "
    f"{CALL_OPEN}{CALL_CLOSE} tags:\n{CALL_OPEN}\n"
    '{"name": <function-name>, "arguments": <args-json-object>}'
    f"\n{CALL_CLOSE}"
)

# Words a template may read in a tool's definition, passed to it as they are: JSON Schema's keywords and
# type names, and the fields of OpenAI's tool definitions.
SCHEMA_WORDS = frozenset(
    {
        *("type", "function", "name", "description", "parameters", "strict", "arguments"),
        *("object", "array", "string", "integer", "number", "boolean", "null"),
        *("properties", "required", "items", "prefixItems", "additionalProperties", "patternProperties"),
        *("enum", "const", "default", "examples", "title", "format", "pattern", "nullable"),
        *("anyOf", "oneOf", "allOf", "not", "if", "then", "else", "$ref", "$defs", "definitions"),
        *("$schema", "$id", "$comment", "propertyNames", "contains", "uniqueItems", "multipleOf"),
        *("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength"),
        *("minItems", "maxItems", "minProperties", "maxProperties", "dependentRequired"),
    }
)


class Segment(NamedTuple):
    text: str
    special: bool  # True: control tokens written in it are parsed as such (the template's own text)


Prompt = tuple[Segment, ...]


def text_prompt(text: str) -> Prompt:
    """A completion's prompt: the caller's text, all of it plain text."""
    return (Segment(text, False),)


def chat_prompt(
    executor: LlmExecutor,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> Prompt:
    """The chat rendered by the model's template, each piece of the caller's text a plain-text segment.

    `messages` in OpenAI's shape (`content` a string, or None beside `tool_calls`); `tools` OpenAI's tool
    definitions, or None.

    >>> class Chatml:
    ...     def render_chat(self, messages):
    ...         return "".join(f"<s>{m['role']}:{m['content']}</s>" for m in messages)
    >>> chat_prompt(Chatml(), [{"role": "user", "content": "</s>"}])  # doctest: +NORMALIZE_WHITESPACE
    (Segment(text='<s>user:', special=True), Segment(text='</s>', special=False),
     Segment(text='</s>', special=True))
    """
    texts = _Texts()
    tooled = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if tooled and executor.chat_takes_tools:
        chat = [_template_message(m, texts) for m in messages]
        given = [texts.value(tool) for tool in tools] if tools else None
        return texts.segments(executor.render_chat(chat, given))
    if tooled:
        messages = described(messages, tools or ())
    chat = [{"role": m["role"], "content": texts.mark(m["content"])} for m in messages]
    return texts.segments(executor.render_chat(chat))


def encode(executor: LlmExecutor, prompt: Prompt) -> list[int]:
    """The prompt's token ids: each segment tokenized on its own, with its own `special`."""
    tokens: list[int] = []
    for segment in prompt:
        if segment.text:
            tokens += executor.tokenize(segment.text, special=segment.special)
    return tokens


class _Texts:
    """The caller's strings in one rendering, each behind its placeholder (one string, one placeholder:
    a template that tests `name in required` finds it)."""

    def __init__(self) -> None:
        self._texts: list[str] = []
        self._marks: dict[str, str] = {}

    def mark(self, text: str) -> str:
        mark = self._marks.get(text)
        if mark is None:
            mark = self._marks[text] = f'{_OPEN}{len(self._texts)}"{_CLOSE}'
            self._texts.append(text)
        return mark

    def value(self, value: Any) -> Any:
        """A JSON value with each string, key or not, behind a placeholder unless it is in SCHEMA_WORDS."""
        if isinstance(value, str):
            return value if value in SCHEMA_WORDS else self.mark(value)
        if isinstance(value, Mapping):
            return {self.value(key): self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value

    def segments(self, rendered: str) -> Prompt:
        """`rendered` cut at the placeholders: the template's text, and each string filled in, plain text."""
        segments: list[Segment] = []
        start = 0
        for found in _PLACEHOLDER.finditer(rendered):
            index, escapes = int(found[1]), (len(found[2]) + 1).bit_length() - 1
            if index >= len(self._texts) or len(found[2]) != 2**escapes - 1:
                continue  # not a placeholder of ours as a template writes one: the template's own text
            if found.start() > start:
                segments.append(Segment(rendered[start : found.start()], True))
            text = self._texts[index]
            for _ in range(escapes):
                text = json.dumps(text, ensure_ascii=False)[1:-1]
            segments.append(Segment(text, False))
            start = found.end()
        if start < len(rendered):
            segments.append(Segment(rendered[start:], True))
        return tuple(segments)


def _template_message(message: Mapping[str, Any], texts: _Texts) -> dict[str, Any]:
    """A message as a template that takes tools reads it (transformers' shape), its text placeholders."""
    content = message.get("content")
    shown: dict[str, Any] = {
        "role": message["role"],
        "content": None if content is None else texts.mark(content),
    }
    if message.get("tool_calls"):
        shown["tool_calls"] = [
            {
                "id": texts.mark(call["id"]),
                "type": "function",
                "function": {
                    "name": texts.mark(call["function"]["name"]),
                    "arguments": _arguments(call["function"]["arguments"], texts),
                },
            }
            for call in message["tool_calls"]
        ]
    if message.get("tool_call_id") is not None:
        shown["tool_call_id"] = texts.mark(message["tool_call_id"])
    return shown


def _arguments(arguments: str, texts: _Texts) -> Any:
    """An earlier call's arguments as templates expect them, an object (transformers' convention); their
    text where they are not a JSON object of a sane depth."""
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict) and nests_within(value, _MAX_ARGUMENT_DEPTH):
        return texts.value(value)
    return texts.mark(arguments)


def nests_within(value: Any, depth: int) -> bool:
    """Whether JSON `value` nests its objects and arrays at most `depth` deep (checked before walking it
    any further: a hostile document may nest thousands deep)."""
    if depth < 0:
        return False
    if isinstance(value, dict):
        return all(nests_within(item, depth - 1) for item in value.values())
    if isinstance(value, list):
        return all(nests_within(item, depth - 1) for item in value)
    return True


def call_text(name: str, arguments: str) -> str:
    """A call in the Hermes form: `arguments` (a JSON object's text) as they are."""
    return f'{CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{CALL_CLOSE}'


def described(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[dict[str, str]]:
    """A chat with tools as plain messages in the Hermes form, for a template that does not take tools.

    >>> described([{"role": "tool", "tool_call_id": "1", "content": "22 C"}], [])
    [{'role': 'user', 'content': '<tool_response>\\n22 C\\n</tool_response>'}]
    """
    plain: list[dict[str, str]] = []
    after_result = False
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            result = f"{RESULT_OPEN}\n{content}\n{RESULT_CLOSE}"
            if (
                after_result
            ):  # the results of one turn's calls share one user message, as Qwen's template writes them
                plain[-1]["content"] += "\n" + result
            else:
                plain.append({"role": "user", "content": result})
            after_result = True
            continue
        after_result = False
        calls = [
            call_text(c["function"]["name"], c["function"]["arguments"])
            for c in message.get("tool_calls") or ()
        ]
        plain.append({"role": role, "content": "\n".join([content, *calls] if content else calls)})
    if tools:
        block = (
            _TOOLS_INTRO + "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools) + _TOOLS_HOWTO
        )
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": f"{plain[0]['content']}\n\n{block}"}
        else:
            plain.insert(0, {"role": "system", "content": block})
    return plain
