"""The TOML writer: whatever it writes reads back the same with tomllib; what TOML cannot hold is a
ValueError, never a file that does not read."""

from __future__ import annotations

import math
import tomllib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgegen.toml_writer import dumps

# Keys as settings and model names have them, and any others (quoted); strings of any code point a
# UTF-8 file can hold, control characters, quotes and backslashes included.
keys = st.text(min_size=1, max_size=12)
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
documents = st.recursive(
    st.dictionaries(keys, scalars, max_size=5),
    lambda children: st.dictionaries(keys, st.one_of(scalars, children), max_size=4),
    max_leaves=20,
)


@given(documents)
def test_what_is_written_reads_back_the_same(values: dict[str, Any]) -> None:
    assert tomllib.loads(dumps(values)) == values


@pytest.mark.parametrize(
    "text",
    ['digits"\n[security]\nauth = false\n', "a\tb\x00c\\d\x7f", "\r\n\x1b[31m", 'end\\"', "ünïcode ✓"],
)
def test_strings_that_once_broke_the_file_read_back(text: str) -> None:
    written = dumps({"default_model": text, "cache": {"note": text}})
    assert tomllib.loads(written) == {"default_model": text, "cache": {"note": text}}
    assert "auth = false" not in written.splitlines()


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 2**63, -(2**63) - 1, None, [1], "\ud800"])
def test_what_toml_cannot_hold_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (each refusal says why in its own words)
        dumps({"x": bad})
