"""Threads in tests: a stdlib HTTP server run on one for as long as a `with` block lasts; a reader that
races a writer."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
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
