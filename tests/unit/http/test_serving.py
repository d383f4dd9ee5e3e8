"""How a server writes to its connections (http/serving.py): an answer's head and body leave together."""

from __future__ import annotations

import asyncio

from edgegen.http.serving import CoalescedWrites


class Recorded:
    """A transport that records each write (what the kernel would be handed, one send(2) each)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def test_writes_in_one_turn_of_the_loop_leave_as_one() -> None:
    raw = Recorded()
    transport = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert raw.writes == []
    await asyncio.sleep(0)
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"data: 1\n\n")  # a stream's next event: its own turn, its own write
    await asyncio.sleep(0)
    assert raw.writes[1:] == [b"data: 1\n\n"]
    assert transport.get_extra_info("peername") == "info:peername"


async def test_a_large_body_goes_at_once_after_what_waits_and_close_sends_what_is_left() -> None:
    raw = Recorded()
    transport = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    large = b"x" * CoalescedWrites.LARGE
    transport.write(b"head")
    transport.write(large)
    assert raw.writes == [b"head", large]
    transport.write(b"last")
    transport.close()
    assert raw.writes[2:] == [b"last"]
    assert raw.closed
    await asyncio.sleep(0)
    assert len(raw.writes) == 3  # nothing written twice, nothing after the close
