"""TOML out, for the files edgegen writes itself (the remote settings, `HOME/config/remote.toml`).

The standard library reads TOML (`tomllib`) but does not write it. This writes the part of TOML that
settings use: tables of strings, integers, floats and booleans, every string escaped as the TOML
specification says, so that `tomllib.loads(dumps(values)) == values` for whatever a string holds
(quotes, backslashes, newlines, control characters). A value TOML cannot hold (an infinite float, an
integer beyond 64 bits, a lone surrogate, None) is a ValueError, never a file that does not read back.

    >>> print(dumps({"log_level": "info", "cache": {"ttl_s": 60.0}}), end="")
    log_level = "info"
    <BLANKLINE>
    [cache]
    ttl_s = 60.0
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
# Everything a basic string may not hold as it is: the quote, the backslash and the control characters.
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')
_SURROGATE = re.compile(r"[\ud800-\udfff]")
INT64 = range(-(2**63), 2**63)


def dumps(values: Mapping[str, Any]) -> str:
    """`values` as a TOML document: its scalars first, then one `[table]` per nested mapping."""
    blocks: list[str] = []
    _table((), values, blocks)
    return "\n".join(blocks)


def _table(path: tuple[str, ...], values: Mapping[str, Any], blocks: list[str]) -> None:
    rows = [
        f"{key(name)} = {value(item)}\n" for name, item in values.items() if not isinstance(item, Mapping)
    ]
    tables = [name for name, item in values.items() if isinstance(item, Mapping)]
    if rows or not path or not tables:  # (an empty table is written, so that it reads back)
        header = f"[{'.'.join(key(part) for part in path)}]\n" if path else ""
        blocks.append(header + "".join(rows))
    for name in tables:
        _table((*path, name), values[name], blocks)


def key(name: str) -> str:
    """A key: bare when it may be, else a quoted string."""
    if not isinstance(name, str):
        raise ValueError(f"a TOML key is a string, not {type(name).__name__}")
    return name if _BARE_KEY.fullmatch(name) else string(name)


def value(item: Any) -> str:
    """One value on the right of `=`."""
    if isinstance(item, bool):  # (before int: a bool is an int)
        return "true" if item else "false"
    if isinstance(item, int):
        if item not in INT64:
            raise ValueError(f"{item} does not fit in TOML's 64-bit integers")
        return str(item)
    if isinstance(item, float):
        if not math.isfinite(item):
            raise ValueError(f"{item} is not a finite number")
        return repr(item)  # the shortest text that reads back as the same float: "0.1", "1e+16"
    if isinstance(item, str):
        return string(item)
    raise ValueError(f"a {type(item).__name__} is not written to TOML here")


def string(text: str) -> str:
    """A basic string, escaped: `"a \\"b\\"\\n"`."""
    if _SURROGATE.search(text):
        raise ValueError("a string holds a lone surrogate, which no UTF-8 file can")
    return '"' + _NEEDS_ESCAPE.sub(lambda m: _ESCAPES.get(m[0], f"\\u{ord(m[0]):04X}"), text) + '"'
