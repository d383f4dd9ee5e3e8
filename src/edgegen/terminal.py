"""What an operator's terminal may be shown of text that came from elsewhere.

A node's shipped log lines, a gateway's error message, a package name in a vulnerability report: any of
them can hold what a remote party chose. Written raw, `ESC [` sequences recolour or clear the screen,
move the cursor, set the window title or (OSC 8, OSC 52) plant links and write the clipboard; a CR or
LF forges a whole line that looks like the tool's own; a right-to-left override makes a line read other
than it is. So every control character — C0, DEL, C1, the Unicode line separators and bidirectional
controls — is shown as a visible escape instead, and the stored value stays as it was:

    >>> printable("GET /\\x1b[2J\\r\\nerror: forged")
    'GET /\\\\x1b[2J\\\\r\\\\nerror: forged'

Rich also reads `[…]` in a printed string as its own markup (styles, `[link=…]`): `shown` escapes that
too, for the places that print with markup on.
"""

from __future__ import annotations

import re

from rich.markup import escape

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(value: object) -> str:
    """`value` as text with every control character written as a visible escape (see the module)."""
    return _CONTROL.sub(_escaped, value if isinstance(value, str) else str(value))


def shown(value: object) -> str:
    """`printable(value)`, safe to print where rich reads markup (`[red]…`, `[link=…]` stay text).

    >>> shown("[link=http://evil]click[/link]")
    '\\\\[link=http://evil]click\\\\[/link]'
    """
    return escape(printable(value))
