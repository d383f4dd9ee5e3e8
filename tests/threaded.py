"""Threads in tests: a stdlib HTTP server run on one for as long as a `with` block lasts; a reader that
races a writer; the event loop's turns while work waits for a thread."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from socketserver import BaseServer


@contextlib.contextmanager
def serving(server: BaseServer) -> Iterator[None]:
    """Serve `server` on a daemon thread; shut it down and close its socket afterwards."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def read_while_written(read: Callable[[], object], write: Callable[[], None]) -> list[BaseException]:
    """Call `read` over and over on a thread while `write` runs on this one, the interpreter switching
    threads every microsecond (every 5 ms by default, which would make a clash rare, not absent): what
    `read` raised. How a sync route's thread reads what the event loop changes."""
    raised: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                read()
            except Exception as exc:
                raised.append(exc)
                return

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        write()
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(switch)
    return raised


async def turns_while_held(
    work: Coroutine[object, object, None], gate: threading.Event, held_s: float = 0.3
) -> int:
    """Run `work` while `gate`, which a thread of the work waits at, stays shut `held_s` more: the event
    loop's turns meanwhile, one each 10 ms (~30 when `work` waits for that thread off the loop; 1 or 2
    when it blocks the loop until the gate opens)."""
    task = asyncio.create_task(work)
    threading.Timer(held_s, gate.set).start()
    turns = 0
    while not task.done():
        turns += 1
        await asyncio.sleep(0.01)
    await task
    return turns
