from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgegen.engine.text import TextStream


def stream(pieces: list[bytes], stops: list[str]) -> tuple[str, bool]:
    text_stream = TextStream(stops)
    out = "".join(text_stream.push(p) for p in pieces) + text_stream.finish()
    return out, text_stream.stopped


def split_bytes(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(st.text(), st.lists(st.integers(0, 1000), max_size=12))
def test_streamed_text_equals_the_whole_text_however_the_bytes_are_cut(text: str, cuts: list[int]) -> None:
    out, stopped = stream(split_bytes(text.encode(), cuts), [])
    assert out == text
    assert not stopped


@given(
    st.text(alphabet="ab\n<|>é", max_size=40),
    st.lists(st.text(alphabet="ab\n<|>é", min_size=1, max_size=4), max_size=3),
    st.lists(st.integers(0, 200), max_size=8),
)
def test_output_ends_right_before_the_first_stop_string(text: str, stops: list[str], cuts: list[int]) -> None:
    out, stopped = stream(split_bytes(text.encode(), cuts), stops)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        # The first place any stop string ends decides; the text before it is what the client gets.
        first_end = min(text.find(s) + len(s) for s in stops if s in text)
        visible = text[:first_end]
        cut = min(i for i in (visible.find(s) for s in stops) if i >= 0)
        assert out == text[:cut]
        assert stopped
    else:
        assert out == text
        assert not stopped


def test_a_split_character_waits_for_its_last_byte() -> None:
    s = TextStream()
    euro = "€".encode()
    assert s.push(euro[:1]) == ""
    assert s.push(euro[1:]) == "€"


def test_partial_stop_is_held_then_released() -> None:
    s = TextStream(["<|im_end|>"])
    assert s.push(b"Hello <|im") == "Hello "
    assert s.push(b"age") == "<|image"
    assert s.push(b" <|im_end|> tail") == " "
    assert s.stopped
    assert s.push(b"more") == ""
