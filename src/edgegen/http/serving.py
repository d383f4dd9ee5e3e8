"""How a node and a gateway listen under uvicorn: one TLS context, made from each server's own settings.

uvicorn takes a server's HTTP protocol class and TLS factory by reference and, with several workers,
pickles them into every worker process, so each app module still names its `HttpProtocol` (a
`GuardedHttpProtocol` whose `load` reads that server's settings) and its `ssl_context` at module level.
What differs between the two servers is only how a process reads its settings; the logic lives here.

    ssl_context = functools.partial(tls_context, _process_settings)   # in node/app.py, gateway/app.py
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Protocol

from edgegen.security.settings import SecuritySettings, TlsSettings
from edgegen.security.transport import server_context


class ServerSettings(Protocol):
    """What serving reads of a node's or a gateway's settings: deadlines and TLS."""

    @property
    def security(self) -> SecuritySettings: ...

    @property
    def tls(self) -> TlsSettings: ...


def tls_context(load: Callable[[], ServerSettings], config: object, default: object) -> ssl.SSLContext:
    """uvicorn's `ssl_context_factory` once `load` is bound: TLS from the settings `load` reads, in each
    worker process (uvicorn's own `config` and `default` factory are not used)."""
    return server_context(load().tls)
