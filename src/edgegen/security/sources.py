"""Where a node may fetch a model package from by URL — and nowhere else (ShellTorch's lesson).

    source = check_source(url, allowed=settings.security.model_sources)     # or Forbidden / InvalidInput
    await download(source, dest, max_bytes, ca_file)                         # or Forbidden / InvalidInput

- The URL must start with one of the operator's `model_sources` prefixes (none by default: pulling by
  URL is off), be https unless that prefix itself is http, carry no user info, fragment, `..`, backslash
  or percent-encoded dot, slash or backslash (so `prefix/../elsewhere` cannot leave the prefix).
- Its host is resolved once, here; every address must be public (not loopback, link-local — cloud
  metadata at 169.254.169.254 —, private, shared, multicast, reserved or unspecified) unless the allowed
  prefix names that very address as an IP literal. The connection then goes to the checked addresses
  only (a pinned resolver), so a DNS answer that changes between check and use cannot redirect it.
- Redirects are refused, not followed; the body is bounded by what is actually read.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from edgegen.errors import Forbidden, InvalidInput, Unprocessable

_ENCODED = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)


@dataclass(frozen=True)
class Source:
    url: str
    host: str
    port: int
    addresses: tuple[str, ...]


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return None


def check_source(url: str, allowed: list[str], resolve: Any = socket.getaddrinfo) -> Source:
    if not allowed:
        raise Forbidden("this node fetches no models by URL (security.model_sources is empty)")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidInput("a model source is an https:// URL")
    if parts.username is not None or parts.password is not None or parts.fragment or "\\" in url:
        raise InvalidInput("a model source URL carries no user info, fragment or backslash")
    if ".." in parts.path.split("/") or _ENCODED.search(parts.path):
        raise InvalidInput("a model source URL may not contain '..' or encoded dots and slashes")
    prefix = next((p for p in allowed if url.startswith(p)), None)
    if prefix is None:
        raise Forbidden("this URL is not under any of the node's allowed model sources")
    if parts.scheme == "http" and not prefix.startswith("http://"):
        raise Forbidden("model sources are fetched over https")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    literal = _address(urlsplit(prefix).hostname or "")
    try:
        infos = resolve(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidInput(f"the model source's host {parts.hostname!r} does not resolve") from None
    addresses = tuple(dict.fromkeys(info[4][0] for info in infos))
    for value in addresses:
        address = ipaddress.ip_address(value)
        if not address.is_global and address != literal:
            raise Forbidden(
                f"the model source's host resolves to {value}, a loopback, link-local or private address"
            )
    return Source(url, parts.hostname, port, addresses)


class _Pinned(AbstractResolver):
    """Answers only with the addresses `check_source` approved."""

    def __init__(self, source: Source) -> None:
        self.source = source

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self.source.host:
            raise OSError(f"{host} was not checked")
        return [
            ResolveResult(
                hostname=host, host=a, port=port, family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0, flags=socket.AI_NUMERICHOST,
            )
            for a in self.source.addresses
        ]  # fmt: skip

    async def close(self) -> None:
        return None


async def download(source: Source, dest: Path, max_bytes: int, ca_file: Path | None = None) -> int:
    """Fetch the source into `dest` (created); return its size. No redirects; `max_bytes` enforced."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    connector = aiohttp.TCPConnector(resolver=_Pinned(source), ssl=context, use_dns_cache=False)
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
    size = 0
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get(source.url, allow_redirects=False) as response,
        ):
            if 300 <= response.status < 400:
                raise Forbidden("the model source answered with a redirect, which is not followed")
            if response.status != 200:
                raise Unprocessable(f"the model source answered {response.status}")
            with dest.open("xb") as out:
                async for chunk in response.content.iter_chunked(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise Unprocessable(f"the model source sent more than {max_bytes} bytes")
                    out.write(chunk)
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
        raise Unprocessable(f"the model source could not be fetched: {type(exc).__name__}") from None
    return size
