"""A TCP relay that holds every chunk a client sends for DELAY_MS before passing it on: a slow link.

    python delay_relay.py LISTEN_PORT TARGET_PORT DELAY_MS

bench/gateway.py puts it in front of one node of an uneven fleet, so that node answers late without
taking CPU from the others (on a 2-core machine, a node made slow by more compute slows everyone).
One request is one chunk on a keep-alive connection, so each request waits DELAY_MS once. It answers
GET /relay-ready itself before relaying anything on that connection, for the bench's readiness probe.
"""

from __future__ import annotations

import asyncio
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    try:
        while chunk := await reader.read(65536):
            if delay_s:
                await asyncio.sleep(delay_s)
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(listen: int, target: int, delay_ms: float) -> None:
    async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        first = await client_reader.read(65536)
        if first.startswith(b"GET /relay-ready "):
            client_writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await client_writer.drain()
            client_writer.close()
            return
        node_reader, node_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.sleep(delay_ms / 1000)
        node_writer.write(first)
        await asyncio.gather(
            pipe(client_reader, node_writer, delay_ms / 1000), pipe(node_reader, client_writer, 0.0)
        )

    server = await asyncio.start_server(serve, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
