"""A model's own chat template (a GGUF's `tokenizer.chat_template`), rendered as transformers renders it.

The template is Jinja code written by whoever made the model file, so it is compiled once per model in
jinja2's immutable sandbox (no attribute starting with `_`, no Python internals, no mutating methods)
with the options and helpers transformers gives it (`trim_blocks`, `lstrip_blocks`, loop controls, a
`tojson` that writes plain JSON, `raise_exception`, `strftime_now`, `bos_token`, `eos_token`):

    template = ChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>")
    template.render([{"role": "user", "content": "hi"}])
    # '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, …<|im_end|>\\n'
    # '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'

The sandbox does not bound time or memory, so a rendering is bounded here: the text it writes (8 times
the chat's characters, plus the template's own, plus 64 KiB: far past what any real template writes),
the strings, lists and integers that `+`, `*` and `**` may build, and its time (`RENDER_LIMIT_S`; real
templates take well under 10 ms): nested loops that write nothing would otherwise hold a worker thread
and a core for hours, each `range` being capped at 100,000 by the sandbox alone. Reading an unsafe
attribute ends the rendering. Not bounded: text built with `~` or buffered in `{% set %}` blocks and
macros before it is written. `raise_exception` is how a template refuses a chat (roles that do not
alternate, say): the client's fault, so an InvalidInput (400). Any other failure is the template's: an
ExecutorError.

How time is bounded: a daemon thread (`_Watchdog`) raises `_Overtime` in the thread that renders once
its time is up — CPython's `PyThreadState_SetAsyncExc`, delivered at that thread's next bytecode, which a
loop runs on every turn; it is a BaseException, so no `except Exception` on the way swallows it. A
rendering that ends first takes back one raised but not yet delivered, under the lock the watchdog raises
under, so none can reach the code that runs after it. Nothing is traced meanwhile: a rendering costs what it
did (tracing every line of one took it from ~120 to ~390 µs).
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import meta
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import loopcontrols
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgegen.errors import ExecutorError, InvalidInput

log = logging.getLogger(__name__)

_OUTPUT_RATIO = 8
_OUTPUT_SLACK = 64 << 10  # characters
_MAX_VALUE_LEN = 1 << 22  # characters of a string (items of a list) that `+` or `*` may build
_MAX_INT_BITS = 1 << 12
RENDER_LIMIT_S = 2.0  # wall time a rendering may take (a busy machine's, too)


class _Overtime(BaseException):
    """Raised in a rendering's thread by the watchdog: its time is up. (Not an Exception: no `except
    Exception` on the way, jinja2's own included, may swallow it.)"""


def _raise_in(thread: int, exception: type[BaseException] | None) -> None:
    """Raise `exception` in `thread` at its next bytecode; None takes back one not yet delivered."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), None if exception is None else ctypes.py_object(exception)
    )


class _Watchdog:
    """The renderings under way, by thread, and the one thread that stops those past their time: once
    each, so that after the one it raised arrived, nothing else can."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._due: dict[int, float] = {}  # thread → when its rendering must stop (monotonic)
        self._raised: set[int] = set()  # threads it raised in, whose rendering has not ended
        self._thread: threading.Thread | None = None

    def start(self, seconds: float) -> None:
        """Stop what this thread runs after `seconds`, unless `stop` comes first."""
        me = threading.get_ident()
        with self._lock:
            self._due[me] = time.monotonic() + seconds
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="edgegen-template-watchdog", daemon=True
                )
                self._thread.start()
            self._lock.notify()

    def stop(self) -> None:
        """This thread's rendering ended: take back what was raised in it and not delivered. What was
        raised before the lock was had may arrive on the way; it has nothing left to stop."""
        try:
            self._forget(threading.get_ident())
        except _Overtime:
            self._forget(threading.get_ident())  # (raised once: nothing more can come)

    def _forget(self, thread: int) -> None:
        with self._lock:
            self._due.pop(thread, None)
            if thread in self._raised:
                _raise_in(thread, None)
                self._raised.discard(thread)

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for thread in [t for t, due in self._due.items() if due <= now]:
                    del self._due[thread]
                    self._raised.add(thread)
                    _raise_in(thread, _Overtime)
                first = min(self._due.values(), default=None)
                self._lock.wait(None if first is None else max(first - now, 0.0))


_WATCHDOG = _Watchdog()


def _tojson(
    value: object,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
    ensure_ascii: bool = False,
) -> str:
    """JSON as `json.dumps` writes it: Jinja's own `tojson` escapes `<`, `>`, `&` and `'` for HTML,
    which would put other text (and other tokens) in the prompt than the model was trained on."""
    return json.dumps(
        value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii
    )


def _raise_exception(message: str) -> NoReturn:
    raise InvalidInput(f"the model's chat template refuses this chat: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)  # the node's local time, as transformers gives it


def _bits(value: object) -> int:
    return value.bit_length() if isinstance(value, int) else 0


def _repeated_len(left: object, right: object) -> int:
    """The length of `left * right` where it repeats a string or list; 0 where it does not."""
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(count, int):
            return len(seq) * count
    return 0


def _too_big(value: object) -> bool:
    if isinstance(value, str | list | tuple):
        return len(value) > _MAX_VALUE_LEN
    return _bits(value) > _MAX_INT_BITS


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with the operators that can build a huge value in one step bounded."""

    intercepted_binops = frozenset({"+", "*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        # jinja2 answers an unsafe attribute with an Undefined that fails only when used (printed, it is
        # ""); no real template reads one, so the first attempt ends the rendering.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        # Checked before computing where the computation itself is the harm ('a' * 10**10, 9 ** 10**9),
        # after it where the result only doubles at most (`+`, over and over in a loop).
        if operator == "*" and (
            _repeated_len(left, right) > _MAX_VALUE_LEN or _bits(left) + _bits(right) > _MAX_INT_BITS
        ):
            raise SecurityError("a value the chat template builds is too large")
        if operator == "**" and isinstance(right, int) and _bits(left) * right > _MAX_INT_BITS:
            raise SecurityError("a number the chat template computes is too large")
        result = super().call_binop(context, operator, left, right)
        if _too_big(result):
            raise SecurityError("a value the chat template builds is too large")
        return result


class ChatTemplate:
    """One model's chat template, compiled. `render` may run in several threads at once."""

    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        """Raises ExecutorError when the template does not compile."""
        # Autoescape stays off: the output is a prompt, not HTML.
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            parsed = env.parse(source)
            self._template = env.from_string(parsed)
        except TemplateError as exc:
            raise ExecutorError(f"the model's chat template does not compile: {exc}") from exc
        # A template that reads `tools` writes them itself (and the calls and results of a chat that
        # carries on after one); engine/prompt.py describes them for one that does not.
        self.takes_tools = "tools" in meta.find_undeclared_variables(parsed)
        self._source_len = len(source)
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def render(
        self,
        messages: Sequence[Mapping[str, object]],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The chat as the template writes it; with `add_generation_prompt`, the assistant's turn opened.

        `tools` (OpenAI's function schemas) reach the template as `tools`, None when there are none, as
        transformers passes them. Raises InvalidInput (the template refused the chat), ExecutorError.
        """
        budget = _OUTPUT_RATIO * (len(str(messages)) + len(str(tools))) + self._source_len + _OUTPUT_SLACK
        pieces: list[str] = []
        written = 0
        _WATCHDOG.start(RENDER_LIMIT_S)
        try:
            try:
                for piece in self._template.generate(
                    messages=list(messages),
                    tools=None if tools is None else list(tools),
                    add_generation_prompt=add_generation_prompt,
                    **self._tokens,
                ):
                    written += len(piece)
                    if written > budget:
                        raise ExecutorError(f"the model's chat template wrote more than {budget} characters")
                    pieces.append(piece)
            finally:
                _WATCHDOG.stop()
        except _Overtime as exc:  # (raised anywhere in the rendering, or as it ended)
            _WATCHDOG.stop()  # (again, should it have come before `stop` began)
            log.warning("the chat template was stopped: it ran longer than %g s", RENDER_LIMIT_S)
            raise ExecutorError(f"the model's chat template ran longer than {RENDER_LIMIT_S:g} s") from exc
        except SecurityError as exc:
            log.warning("the chat template was stopped: %s", exc)
            raise ExecutorError("the model's chat template was stopped by its sandbox") from exc
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as exc:
            log.warning("the chat template failed: %s: %s", type(exc).__name__, exc)
            raise ExecutorError("the model's chat template failed on this chat") from exc
        return "".join(pieces)
