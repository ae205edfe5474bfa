"""A TCP proxy between a client and the real broker that can play a resource alarm.

RabbitMQ blocks publishing connections while a memory or disk alarm is on: it sends
``connection.blocked`` and stops answering publishes until ``connection.unblocked``.
Raising a real alarm would stall every other user of the shared broker, so the proxy
plays it on one connection: :meth:`AmqpProxy.block` writes a real ``connection.blocked``
frame into the broker-to-client stream (between two frames) and, with ``hold=True``,
holds the broker's later frames (publish confirms among them) until :meth:`unblock`
writes ``connection.unblocked`` and lets them through; with ``deaf=True`` it also stops
passing the client's frames to the broker, as RabbitMQ stops reading the socket of a
blocked connection (a ``channel.close`` or ``basic.cancel`` then gets no answer). The
client's aiormq reads the frames as it would read the broker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from urllib.parse import urlsplit, urlunsplit

from pamqp import body, commands, frame

__all__ = ["AmqpProxy", "publish_raw"]

FRAME_END = 0xCE


class AmqpProxy:
    def __init__(self, broker_url: str) -> None:
        parts = urlsplit(broker_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self._url = parts
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._holding = False
        self._held: list[tuple[asyncio.StreamWriter, bytes]] = []
        self._deaf = False
        self._unheard: list[tuple[asyncio.StreamWriter, bytes]] = []
        self._silenced: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        netloc = f"{self._url.username}:{self._url.password}@127.0.0.1:{self.port}"
        return urlunsplit(self._url._replace(netloc=netloc))

    async def __aenter__(self) -> AmqpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def silence(self) -> None:
        """Drop every byte of the connections open now, both ways, without closing them:
        a node cut off by a firewall (iptables DROP). New connections pass."""
        self._silenced.update(self._writers)

    def cut(self) -> None:
        """Drop every connection through the proxy, as a lost network or node would."""
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.close()

    def block(self, reason: str, *, hold: bool = False, deaf: bool = False) -> None:
        self._inject(commands.Connection.Blocked(reason=reason))
        self._holding = hold
        self._deaf = deaf

    def unblock(self) -> None:
        self._holding = False
        self._deaf = False
        unheard, self._unheard = self._unheard, []
        for writer, data in unheard:
            writer.write(data)
        self._inject(commands.Connection.Unblocked())
        held, self._held = self._held, []
        for writer, data in held:
            writer.write(data)

    def _inject(self, command: commands.Connection.Blocked | commands.Connection.Unblocked) -> None:
        data = frame.marshal(command, 0)
        for writer in self._client_writers:
            if self._holding:
                self._held.append((writer, data))
            else:
                writer.write(data)

    @property
    def _client_writers(self) -> list[asyncio.StreamWriter]:
        return self._writers[0::2]

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection(*self._target)
        self._writers += [client_w, broker_w]
        for coro in (self._upstream(client_r, broker_w), self._downstream(broker_r, client_w)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if writer in self._silenced:
                    continue
                if self._deaf:
                    self._unheard.append((writer, data))
                    continue
                writer.write(data)
                await writer.drain()
        if writer not in self._silenced:  # a dropped link carries no FIN either
            writer.close()

    async def _downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Whole frames only, so an injected frame never lands inside another."""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(7)
                (size,) = struct.unpack(">I", header[3:7])
                data = header + await reader.readexactly(size + 1)
                assert data[-1] == FRAME_END
                if writer in self._silenced:
                    continue
                if self._holding:
                    self._held.append((writer, data))
                else:
                    writer.write(data)
        if writer not in self._silenced:
            writer.close()


def _raw_content_header(
    channel: int, size: int, headers: dict[str, bytes], reply_to: str | None
) -> bytes:
    """A content header frame whose headers are long strings of raw bytes (not UTF-8, as
    some clients send bytes), which pamqp would not encode."""
    table = b"".join(
        bytes((len(k),)) + k.encode() + b"S" + struct.pack(">I", len(v)) + v
        for k, v in headers.items()
    )
    flags = 0x2000 | 0x1000  # headers, delivery_mode
    fields = struct.pack(">I", len(table)) + table + b"\x02"
    if reply_to:
        flags |= 0x0200
        fields += bytes((len(reply_to),)) + reply_to.encode()
    payload = struct.pack(">HHQH", 60, 0, size, flags) + fields
    return struct.pack(">BHI", 2, channel, len(payload)) + payload + bytes((FRAME_END,))


async def publish_raw(
    broker_url: str,
    queue: str,
    data: bytes,
    *,
    raw_headers: dict[str, bytes] | None = None,
    reply_to: str | None = None,
) -> None:
    """Publish one persistent message with no ``message_id`` at all, as a bare AMQP client
    (pika, a shell tool) can: aiormq always fills one in, so the test speaks AMQP itself.
    ``raw_headers``: header values sent as long strings of these exact bytes."""
    from pamqp import header

    parts = urlsplit(broker_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 5672)
    buffer = b""

    async def expect(kind: type) -> object:
        nonlocal buffer
        while True:
            with contextlib.suppress(Exception):
                used, _, received = frame.unmarshal(buffer)
                buffer = buffer[used:]
                if isinstance(received, kind):
                    return received
                continue
            buffer += await reader.read(65536)

    def send(value: object, channel: int) -> None:
        writer.write(frame.marshal(value, channel))  # type: ignore[arg-type]

    try:
        writer.write(b"AMQP\x00\x00\x09\x01")
        await expect(commands.Connection.Start)
        send(
            commands.Connection.StartOk(
                response=f"\0{parts.username}\0{parts.password}", client_properties={}
            ),
            0,
        )
        tune = await expect(commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        send(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), 0)
        send(commands.Connection.Open(), 0)
        await expect(commands.Connection.OpenOk)
        send(commands.Channel.Open(), 1)
        await expect(commands.Channel.OpenOk)
        send(commands.Confirm.Select(), 1)
        await expect(commands.Confirm.SelectOk)
        send(commands.Basic.Publish(exchange="", routing_key=queue), 1)
        if raw_headers or reply_to:
            writer.write(_raw_content_header(1, len(data), raw_headers or {}, reply_to))
        else:
            properties = commands.Basic.Properties(delivery_mode=2)
            send(header.ContentHeader(0, len(data), properties), 1)
        send(body.ContentBody(data), 1)
        await expect(commands.Basic.Ack)
        send(commands.Connection.Close(200, "done", 0, 0), 0)
        await expect(commands.Connection.CloseOk)
    finally:
        writer.close()
