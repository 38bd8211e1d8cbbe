"""A TCP proxy that delays every byte by a fixed one-way latency in each direction.

This machine's kernel has no ``netem`` qdisc (nor fq, whose EDT timestamps a BPF delay would need),
so bench/wan/run.py adds latency here: the proxy runs on a worker host, listens on its loopback,
and forwards to the server across the host's shaped link; what it reads at time t it writes at
t + delay, so a request and its answer see 2 x delay more round-trip time. HTTP/2's flow-control
windows and gRPC's keepalives, which live end to end above TCP, see the full added RTT; the
shaped link's own TCP connection (proxy to server) does not (its ACKs are not delayed).

    python bench/wan/delay_proxy.py --listen 127.0.0.1:7000 --to 10.77.0.1:50051 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import time

CHUNK = 64 << 10
QUEUE_CHUNKS = 256  # bounded: a slow link pushes back on the sender instead of buffering without end


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

    async def read() -> None:
        while True:
            data = await reader.read(CHUNK)
            await queue.put((time.monotonic() + delay_s, data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(listen: str, to: str, delay_s: float) -> None:
    lhost, _, lport = listen.rpartition(":")
    thost, _, tport = to.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(thost, int(tport))
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_writer, delay_s), _pump(up_reader, writer, delay_s))

    server = await asyncio.start_server(handle, lhost, int(lport))
    async with server:
        await server.serve_forever()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="host:port to accept on")
    p.add_argument("--to", required=True, help="host:port to forward to")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay each direction")
    args = p.parse_args()
    asyncio.run(serve(args.listen, args.to, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
