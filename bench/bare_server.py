"""The floor under capsuled's cold activation: a bare asyncio Varlink responder, started by
bench/coldstart.py in capsuled.service's place (same unit, same sandbox, same socket).

It takes the activation fd, says READY=1 (with a SIGHUP handler, as Type=notify-reload wants),
and answers every call with an empty reply until it has been idle a few seconds: Python's
start-up, asyncio's import and the unit's set-up, and nothing of capsuled. Standard library
only: it runs under the bed's python3, from the checkout bound at /src.
"""

import asyncio
import os
import signal
import socket

IDLE_EXIT_S = 5.0


def notify(state: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), "\0" + path[1:] if path[0] == "@" else path)


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await reader.readuntil(b"\0")
            writer.write(b'{"parameters":{}}\0')
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    await asyncio.start_unix_server(answer, sock=socket.socket(fileno=3))
    notify("READY=1")
    await asyncio.sleep(IDLE_EXIT_S)


asyncio.run(main())
