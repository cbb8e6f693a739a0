"""A TCP relay that delays every byte by a fixed time: latency for test networks without netem.

``tc netem`` is not available here, and tbf/htb only shape bandwidth. This relay listens on some addresses and
forwards each accepted connection to a target, holding every chunk for ``delay`` seconds in each direction
before writing it on. It is a pipeline, not a stop-and-wait: chunks in flight do not wait for each other, so it
adds latency without capping throughput (a connection through it sees RTT + 2 x delay).

    python -m athome.testing.delay_relay --delay_ms 50 --map 10.77.1.1:4001=10.77.1.2:4001 [--map ...]

prints ``relaying`` once every listener is up and runs until SIGTERM/SIGINT. In code: ``await serve(maps, delay)``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from typing import List, Optional, Tuple

logger = logging.getLogger(__name__)
Address = Tuple[str, int]
CHUNK = 64 * 1024


def parse_address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def parse_map(text: str) -> Tuple[Address, Address]:
    """``LISTEN_HOST:PORT=TARGET_HOST:PORT``."""
    listen, separator, target = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"{text!r} is not LISTEN_HOST:PORT=TARGET_HOST:PORT")
    return parse_address(listen), parse_address(target)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader -> writer, each chunk written ``delay`` seconds after it was read, in order."""
    queue: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        try:
            while True:
                chunk = await reader.read(CHUNK)
                await queue.put((time.monotonic() + delay, chunk))
                if not chunk:
                    return
        except (ConnectionError, OSError):
            await queue.put((time.monotonic() + delay, b""))

    reading = asyncio.create_task(read())
    try:
        while True:
            due, chunk = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()


async def _relay(client_reader, client_writer, target: Address, delay: float) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
    except OSError as error:
        logger.warning(f"relay to {target[0]}:{target[1]} failed: {error}")
        client_writer.close()
        return
    try:
        await asyncio.gather(_pump(client_reader, upstream_writer, delay), _pump(upstream_reader, client_writer, delay))
    finally:
        for writer in (client_writer, upstream_writer):
            writer.close()


async def serve(maps: List[Tuple[Address, Address]], delay: float, ready: Optional[asyncio.Event] = None) -> None:
    """Relay each listen address to its target with ``delay`` seconds each way, until cancelled."""
    servers = []
    for listen, target in maps:
        servers.append(await asyncio.start_server(
            lambda r, w, target=target: _relay(r, w, target, delay), *listen, reuse_address=True
        ))
    if ready is not None:
        ready.set()
    try:
        await asyncio.gather(*(server.serve_forever() for server in servers))
    finally:
        for server in servers:
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="TCP relay adding a fixed delay each way")
    parser.add_argument("--map", type=parse_map, action="append", required=True,
                        help="LISTEN_HOST:PORT=TARGET_HOST:PORT (repeat for more)")
    parser.add_argument("--delay_ms", type=float, required=True, help="one-way delay in milliseconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s delay_relay: %(message)s")

    async def run() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(serve(args.map, args.delay_ms / 1000, ready))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # a listener failed to start: raise its error
        print("relaying", flush=True)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(run())


if __name__ == "__main__":
    main()
