"""Pre-encoded publishes for a stream's deltas: the frames are built once per destination
and completed per message with its body and message id.

Why by hand: a confirmed ``basic_publish`` costs about 150 µs of CPU here (pamqp encodes
every property of every message, and the caller waits on a drain future and then on the
confirm); a streamed job publishes a delta every flush interval, so at 64 concurrent
streams publishing alone cost more than the whole per-chunk budget of issue 15. A
:class:`PreparedPublish` encodes the method frame and the properties once (with pamqp) and
per message only packs the body size, the message id and the body: about 30 µs, confirm
included.

The confirm still comes through aiormq, unchanged: an :class:`Outbox` takes the channel's
next delivery tags and registers the confirmation futures as
``aiormq.Channel.basic_publish`` does, and queues the bytes on the connection's writer, so
publishes of both kinds leave in delivery-tag order. aiormq's reader resolves each future:
an ack, a nack (``DeliveryError``) or a return (``PublishError``, matched by message id).
The bytes equal what aiormq and pamqp write for the same publish:
``tests/unit/test_frames.py`` compares them on generated properties and bodies.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
from functools import partial
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.abc import ChannelFrame
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

__all__ = ["Outbox", "PreparedPublish", "RobustOutbox", "encode_publish", "refusal", "returned"]

_FRAME_HEADER = struct.Struct(">BHI")  # frame type, channel, payload size
_CONTENT_HEADER = struct.Struct(">HxxQ")  # class id, weight (0), body size
_HEADER_FRAME, _BODY_FRAME = 2, 3
_FRAME_END = b"\xce"
_CLASS_BASIC = 60
# Message ids: unique on every channel of this process, short, and cheap to make.
_ID_PREFIX = os.urandom(6).hex()
_ids = itertools.count()


def _split_properties(properties: Basic.Properties) -> tuple[bytes, bytes]:
    """The encoded property list around ``message_id``, which each message sets: the flags
    (with message_id's bit) and the fields before it, and the fields after it. Each field is
    encoded by pamqp, in pamqp's order."""
    flags = properties.flags["message_id"]
    before: list[bytes] = []
    after: list[bytes] = []
    fields = before
    for name in properties.__slots__:
        if name == "message_id":
            fields = after
            continue
        value = getattr(properties, name)
        if value is not None and value != "":
            flags |= properties.flags[name]
            fields.append(properties.encode_property(name, value))
    # Basic.Properties has 14 fields: the flags fit one 16-bit word, no continuation bit.
    return struct.pack(">H", flags) + b"".join(before), b"".join(after)


class Outbox:
    """The publishes of one loop iteration on one aiormq channel, written together.

    Each publish sent over loopback TCP costs a ``send`` that wakes the broker (about 30 µs
    of this process's CPU here, far more than encoding it): the deltas that several streams
    publish in the same iteration leave in one write. Delivery tags are taken when the
    batch is queued, in the batch's order, in one synchronous step: a ``basic_publish``
    takes its tag and queues its frames in one step too (unless the connection's write
    queue is full: then the batch waits for the channel's lock, as ``basic_publish`` does),
    so the broker numbers every publish as the confirm bookkeeping does.
    """

    __slots__ = ("_batch", "_flush", "_loop", "_tasks", "channel")

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self._loop = asyncio.get_running_loop()
        self._batch: list[tuple[bytes, str, asyncio.Future[Any]]] = []
        self._flush: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def send(
        self, payload: bytes, message_id: str, *, at_once: bool = False
    ) -> asyncio.Future[Any]:
        """Queue one encoded publish; returns its confirmation (ack, nack or return).
        ``at_once``: write it (and the batch before it) now, not at the end of the loop
        iteration: a first delta, whose latency counts more than the write it saves."""
        channel = self.channel
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        confirmation = channel.create_future()
        self._batch.append((payload, message_id, confirmation))
        if at_once:
            self._write()
        elif self._flush is None:
            self._flush = self._loop.call_soon(self._write)
        return confirmation

    def _write(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        batch, self._batch = self._batch, []
        channel = self.channel
        if channel.is_closed:
            for _, _, confirmation in batch:
                if not confirmation.done():
                    confirmation.set_exception(
                        aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
                    )
            return
        if channel.write_queue.full():
            task = self._loop.create_task(self._write_when_free(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        channel.write_queue.put_nowait(self._frame(batch))

    async def _write_when_free(self, batch: list[tuple[bytes, str, asyncio.Future[Any]]]) -> None:
        try:
            async with self.channel.lock:
                await self.channel.write_queue.put(self._frame(batch))
        except BaseException as exc:
            for _, _, confirmation in batch:
                if not confirmation.done():
                    confirmation.set_exception(
                        exc if isinstance(exc, Exception) else asyncio.CancelledError()
                    )
            raise

    def _frame(self, batch: list[tuple[bytes, str, asyncio.Future[Any]]]) -> ChannelFrame:
        """Take the delivery tags, register the confirmations (as basic_publish does)."""
        channel = self.channel
        confirmations = channel.confirmations
        returns = channel.message_id_delivery_tag
        for _, message_id, confirmation in batch:
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            confirmations[tag] = confirmation
            # aiormq matches a basic.return to its publish by message id.
            returns[message_id] = tag
            confirmation.add_done_callback(partial(_forget, returns, message_id, tag))
        return ChannelFrame(payload=b"".join(item[0] for item in batch), should_close=False)


def encode_publish(
    channel: aiormq.Channel,
    routing_key: str,
    properties: Basic.Properties,
    body: bytes,
    *,
    exchange: str = "",
    mandatory: bool = True,
) -> bytes:
    """One publish's frames for :meth:`Outbox.send`, encoded by pamqp as aiormq's
    ``basic_publish`` encodes them (for publishes whose properties differ each time)."""
    frames: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(body_size=len(body), properties=properties),
    ]
    size = channel.max_content_size
    frames += [ContentBody(body[k : k + size]) for k in range(0, len(body), size)]
    return b"".join(pamqp_frame.marshal(frame, channel.number) for frame in frames)


class RobustOutbox:
    """The :class:`Outbox` of the channel now under a robust aio-pika channel (a new one
    after a reconnect)."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self._outbox: Outbox | None = None

    async def get(self) -> Outbox:
        channel = await self.channel.get_underlay_channel()
        if self._outbox is None or self._outbox.channel is not channel:
            if not isinstance(channel, aiormq.Channel):
                raise TypeError(f"an aiormq channel is needed, not {type(channel).__name__}")
            self._outbox = Outbox(channel)
        return self._outbox


def _forget(returns: dict[str, int], message_id: str, tag: int, _: asyncio.Future[Any]) -> None:
    if returns.get(message_id) == tag:
        del returns[message_id]


class PreparedPublish:
    """Publishes to one exchange and routing key with fixed properties (``message_id`` is
    set per message) through an :class:`Outbox`."""

    __slots__ = ("_after", "_before", "_method", "_number", "_outbox")

    def __init__(
        self,
        outbox: Outbox,
        *,
        exchange: str,
        routing_key: str,
        properties: Basic.Properties,
        mandatory: bool,
    ) -> None:
        self._outbox = outbox
        self._number = outbox.channel.number
        method = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        self._method = pamqp_frame.marshal(method, self._number)
        self._before, self._after = _split_properties(properties)

    def encode(self, body: bytes, message_id: str, max_content: int) -> bytes:
        """The three or more frames of one publish, as one byte string."""
        mid = message_id.encode()
        properties = self._before + bytes((len(mid),)) + mid + self._after
        size = _CONTENT_HEADER.size + len(properties)
        parts = [
            self._method,
            _FRAME_HEADER.pack(_HEADER_FRAME, self._number, size),
            _CONTENT_HEADER.pack(_CLASS_BASIC, len(body)),
            properties,
            _FRAME_END,
        ]
        for start in range(0, len(body), max_content):
            piece = body[start : start + max_content]
            parts += (_FRAME_HEADER.pack(_BODY_FRAME, self._number, len(piece)), piece, _FRAME_END)
        return b"".join(parts)

    def publish(self, body: bytes, *, at_once: bool = False) -> asyncio.Future[Any]:
        """Send one message; returns its confirmation, not awaited (the caller decides when
        it needs it). Raises ``ChannelInvalidStateError`` on a closed channel."""
        message_id = f"{_ID_PREFIX}{next(_ids):x}"
        payload = self.encode(body, message_id, self._outbox.channel.max_content_size)
        return self._outbox.send(payload, message_id, at_once=at_once)


def returned(exc: aiormq.exceptions.DeliveryError) -> bool:
    """True when the broker returned the message as unroutable (rather than nacking it)."""
    frame = getattr(exc, "frame", None)
    return frame is not None and type(frame).__name__ == "Return"


def refusal(exc: aiormq.exceptions.DeliveryError) -> str:
    """How the broker refused a publish, for a log line or an error."""
    return "was returned as unroutable" if returned(exc) else "was refused (nack)"
