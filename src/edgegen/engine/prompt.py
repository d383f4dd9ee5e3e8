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

Both functions call into the executor's tokenizer and template: the routes run them in a worker thread,
never on the event loop (a long prompt takes a while to tokenize).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from edgegen.executors.base import LlmExecutor

# Private-use characters: a template writes them out as they are and never means anything by them.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class Segment(NamedTuple):
    text: str
    special: bool  # True: control tokens written in it are parsed as such (the template's own text)


Prompt = tuple[Segment, ...]


def text_prompt(text: str) -> Prompt:
    """A completion's prompt: the caller's text, all of it plain text."""
    return (Segment(text, False),)


def chat_prompt(executor: LlmExecutor, messages: Sequence[Mapping[str, str]]) -> Prompt:
    """The chat rendered by the model's template, each message's content a plain-text segment.

    >>> class Chatml:
    ...     def render_chat(self, messages):
    ...         return "".join(f"<s>{m['role']}:{m['content']}</s>" for m in messages)
    >>> chat_prompt(Chatml(), [{"role": "user", "content": "</s>"}])  # doctest: +NORMALIZE_WHITESPACE
    (Segment(text='<s>user:', special=True), Segment(text='</s>', special=False),
     Segment(text='</s>', special=True))
    """
    placeholders = [{"role": m["role"], "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
    rendered = executor.render_chat(placeholders)
    # re.split with one group: template text, a message's index, template text, … template text.
    parts = _PLACEHOLDER.split(rendered)
    segments: list[Segment] = []
    for i, part in enumerate(parts):
        if i % 2:
            segments.append(Segment(messages[int(part)]["content"], False))
        elif part:
            segments.append(Segment(part, True))
    return tuple(segments)


def encode(executor: LlmExecutor, prompt: Prompt) -> list[int]:
    """The prompt's token ids: each segment tokenized on its own, with its own `special`."""
    tokens: list[int] = []
    for segment in prompt:
        if segment.text:
            tokens += executor.tokenize(segment.text, special=segment.special)
    return tokens
