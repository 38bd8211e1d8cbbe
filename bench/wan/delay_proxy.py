"""A TCP proxy that delays every byte by a fixed one-way latency in each direction.

This machine's kernel has no ``netem`` qdisc (nor fq, whose EDT timestamps a BPF delay would need),
so bench/wan adds latency here: what the proxy reads at time t it writes at t + delay, so a request
and its answer see 2 x delay more round-trip time.

Two modes:

- ``--to HOST:PORT``: forward every connection accepted on ``--listen`` to one address;
- ``--transparent``: forward each connection to the address it was meant for, read from the
  connection's NAT entry (``SO_ORIGINAL_DST``). bench/wan/netns.py installs, on each worker host,
  an nft ``redirect`` of every TCP connection the host opens to another host of the run to this
  proxy, so LTE's gRPC, gloo's rank-to-rank links and the rendezvous store all get the same added
  RTT. The proxy's own upstream sockets carry the mark ``MARK``, which the redirect rule skips.

What each mode delays: HTTP/2's flow-control windows, gRPC's keepalives and gloo's message
exchanges, which live end to end above TCP, see the full added RTT; the TCP connection that crosses
the shaped link (proxy to peer) does not (its ACKs are not delayed), for every system alike.

    python bench/wan/delay_proxy.py --listen 127.0.0.1:7000 --to 10.77.0.1:50051 --delay-ms 20
    python bench/wan/delay_proxy.py --listen 0.0.0.0:7001 --transparent --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import time

CHUNK = 64 << 10
QUEUE_CHUNKS = 256  # bounded: a slow link pushes back on the sender instead of buffering without end
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
MARK = 0x4C54  # the upstream sockets' fwmark: netns.py's redirect rule lets these through


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


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The (ip, port) a redirected IPv4 connection was addressed to, from its NAT entry."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


async def _connect_marked(host: str, port: int):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except OSError:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def serve(listen: str, to: str | None, delay_s: float) -> None:
    lhost, _, lport = listen.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if to is None:
                thost, tport = original_dst(writer.get_extra_info("socket"))
            else:
                thost, _, port = to.rpartition(":")
                tport = int(port)
            up_reader, up_writer = await _connect_marked(thost, tport)
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
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", help="host:port to forward to")
    target.add_argument(
        "--transparent", action="store_true", help="forward to each connection's original destination"
    )
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay each direction")
    args = p.parse_args()
    asyncio.run(serve(args.listen, None if args.transparent else args.to, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
