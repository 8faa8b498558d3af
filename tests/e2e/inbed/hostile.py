"""Hostile Varlink peers for the load proof (tests/e2e/test_load.py), as whichever user runs this.

    python3 -m e2e.inbed.hostile '{"seconds": S, "idle": N, "trickle": N, "unterminated": N,
                                   "flood": N, "size": BYTES, "retry_s": R, "socket": PATH}'

Keeps that many connections of each kind open for S seconds, each opened again R seconds after
the helper closed or refused it (a refused connection is accepted by the kernel and closed by the
helper at once, so an attacker finds out only by trying):

  idle          connects and sends nothing
  trickle       the start of a call, then one byte a second, never a NUL
  unterminated  the start of a call of SIZE bytes (the helper's cap, say), all at once, no NUL
  flood         pipelines batches of valid calls (Info, GetInfo, a Describe of a capsule nobody
                may see) and reads their replies as fast as they come

Prints one JSON object: per kind, connections made, how many of them the helper admitted (as
far as a client can tell: a refused connection is closed at once, so one that got a reply, sent
its whole call, or lasted a second was admitted), closed by the helper, bytes sent, replies.
Asserts nothing: the test judges the helper by what the well-behaved client and the monitor saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import sys
import time
from dataclasses import asdict, dataclass

from e2e.inbed.wire import INTERFACE, SOCKET

FLOOD_BATCH = 64
CALLS = [
    {"method": f"{INTERFACE}.Info", "parameters": {}},
    {"method": "org.varlink.service.GetInfo", "parameters": {}},
    {"method": f"{INTERFACE}.Describe", "parameters": {"name": "nobody-may-see-this"}},
]
BATCH = b"".join(json.dumps(CALLS[i % len(CALLS)]).encode() + b"\0" for i in range(FLOOD_BATCH))


ADMITTED_AFTER_S = 1.0


@dataclass
class Tally:
    connected: int = 0
    admitted: int = 0
    closed_by_helper: int = 0
    refused: int = 0  # could not even connect (backlog full)
    sent_bytes: int = 0
    replies: int = 0


async def _open(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, path)
    return await asyncio.open_unix_connection(sock=sock)


async def _until_closed(reader: asyncio.StreamReader) -> None:
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass  # reset: closed all the same


async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tally: Tally) -> None:
    await _until_closed(reader)


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tally: Tally) -> None:
    closed = asyncio.ensure_future(_until_closed(reader))
    writer.write(b'{"method":"')
    try:
        while not closed.done():
            writer.write(b"a")
            await writer.drain()
            tally.sent_bytes += 1
            await asyncio.wait({closed}, timeout=1.0)
    finally:
        closed.cancel()


async def unterminated(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tally: Tally, size: int
) -> bool:
    closed = asyncio.ensure_future(_until_closed(reader))
    chunk = b"a" * 65536
    writer.write(b'{"method":"')
    sent = 11
    try:
        while sent < size and not closed.done():
            part = chunk[: size - sent]
            writer.write(part)
            await writer.drain()
            sent += len(part)
            tally.sent_bytes += len(part)
        if sent >= size:
            tally.admitted += 1  # the helper read it all (the kernel holds far less)
        await closed
    finally:
        closed.cancel()
    return sent >= size


async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tally: Tally) -> None:
    async def read_replies() -> None:
        with contextlib.suppress(ConnectionError):
            await read_all()

    async def read_all() -> None:
        buf = b""
        first = True
        while data := await reader.read(1 << 20):
            buf += data
            tally.replies += buf.count(b"\0")
            buf = buf[buf.rfind(b"\0") + 1 :]
            if first:
                tally.admitted += 1
                first = False

    reading = asyncio.ensure_future(read_replies())
    try:
        while not reading.done():
            writer.write(BATCH)
            await writer.drain()
            tally.sent_bytes += len(BATCH)
    except ConnectionError:
        pass
    finally:
        reading.cancel()


async def agent(kind: str, tally: Tally, size: int, retry_s: float, path: str) -> None:
    while True:
        try:
            reader, writer = await _open(path)
        except OSError:
            tally.refused += 1
            await asyncio.sleep(retry_s)
            continue
        tally.connected += 1
        opened = time.monotonic()
        try:
            if kind == "unterminated":
                await unterminated(reader, writer, tally, size)
            else:
                await {"idle": idle, "trickle": trickle, "flood": flood}[kind](
                    reader, writer, tally
                )
            tally.closed_by_helper += 1
        except ConnectionError:
            tally.closed_by_helper += 1
        finally:
            # Still open when the run ended (cancelled), or closed after a while: admitted.
            if kind in ("idle", "trickle") and time.monotonic() - opened >= ADMITTED_AFTER_S:
                tally.admitted += 1
            writer.transport.abort()
        await asyncio.sleep(retry_s)


async def main(config: dict[str, object]) -> dict[str, dict[str, int]]:
    tallies = {k: Tally() for k in ("idle", "trickle", "unterminated", "flood")}
    size, retry_s = int(str(config["size"])), float(str(config["retry_s"]))
    path = str(config.get("socket", SOCKET))
    kinds = [kind for kind in tallies for _ in range(int(str(config.get(kind, 0))))]
    # Interleaved, so that whichever get in first are a mix of every kind.
    random.Random(0).shuffle(kinds)
    agents = [
        asyncio.create_task(agent(kind, tallies[kind], size, retry_s, path)) for kind in kinds
    ]
    print(json.dumps({"started": len(agents)}), flush=True)
    await asyncio.sleep(float(str(config["seconds"])))
    for task in agents:
        task.cancel()
    await asyncio.gather(*agents, return_exceptions=True)
    return {kind: asdict(tally) for kind, tally in tallies.items()}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))), flush=True)
