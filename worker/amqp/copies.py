"""A delivered request published again (dead letter, delay round, counted requeue, replay).

A copy is the producer's message with the worker's own headers added, and changed in four
ways:

- **Bounded.** All of a message's properties travel in one header frame, which must fit
  the connection's ``frame_max`` (128 KiB by default): a larger one makes the broker close
  the whole connection (FRAME_ERROR), cancelling every job on it, and the request,
  redelivered, would do it again. The worker's own headers always go; the producer's are
  kept in their order while they fit what is left (less :data:`BROKER_MARGIN` for what the
  broker adds on its way, ``x-death`` and ``x-delivery-count``); a header that does not
  fit is left out and logged.
- **Bytes stay bytes.** Some clients send strings as bytes: a byte array, or a long string
  that is not UTF-8, which arrives as ``bytes``. A copy carries them as byte arrays (pamqp
  encodes ``bytearray``, not ``bytes``); for display they are decoded with replacement
  characters (:func:`~worker.amqp.envelope.header_text`).
- **The tenant kept.** The broker refuses a ``user_id`` that is not the publishing
  connection's user: a copy names the job's tenant user in ``x-tenant-user-id`` and sets
  ``user_id`` to the worker's own user, which vouches for it (threat model:
  :mod:`worker.tenants`). A producer's own ``x-tenant-user-id`` is never carried.
- **No expiration.** A dead letter, a delayed retry or a requeued job must not vanish
  when the producer's TTL runs out (RabbitMQ strips it when it dead-letters, for the same
  reason); a delay queue's own TTL still applies.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import structlog
from pamqp import encode
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from worker.amqp.connect import broker_user
from worker.amqp.topology import H_DELIVERY_COUNT, H_REDELIVERIES
from worker.tenants import H_TENANT_USER, tenant_user

__all__ = ["BOOKKEEPING", "BROKER_MARGIN", "Republisher", "copy_request"]

log = structlog.get_logger(__name__)

#: Headers of the broker's (and the worker's) own bookkeeping: it starts again on a copy.
BOOKKEEPING = frozenset(
    {
        H_DELIVERY_COUNT,
        H_REDELIVERIES,
        "x-death",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-first-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-last-death-exchange",
    }
)
#: Bytes of the header frame left free for what the broker adds to a copy on its way
#: (``x-death`` when a delay queue dead-letters it back, ``x-delivery-count``).
BROKER_MARGIN = 4096
# A frame: type, channel and size (7 bytes) before the payload, the end marker after it.
_FRAME_OVERHEAD = 8
AMQP_DEFAULT_FRAME_MAX = 131072


@dataclass(frozen=True, slots=True)
class Republisher:
    """What a copy depends on of the connection that publishes it: the broker user it
    logged in as (None: unknown, with EXTERNAL) and its negotiated ``frame_max``."""

    user: str | None
    frame_max: int = AMQP_DEFAULT_FRAME_MAX

    @classmethod
    def of(cls, channel: aiormq.abc.AbstractChannel) -> Republisher:
        connection = channel.connection
        return cls(broker_user(connection.url), connection.connection_tune.frame_max)


def copy_request(
    message: aio_pika.abc.AbstractIncomingMessage,
    *,
    message_id: str | None,
    headers: Mapping[str, Any],
    by: Republisher,
    drop: Collection[str] = BOOKKEEPING,
) -> aio_pika.Message:
    """A persistent copy of a delivered request, with the worker's ``headers`` and as many
    of the producer's (less ``drop``) as fit; see the module docstring."""
    own: dict[str, Any] = {k: _wire(v) for k, v in headers.items()}
    user_id = None
    tenant = tenant_user(
        message.user_id, message.headers, republishers=(by.user,) if by.user else ()
    )
    if tenant is not None and by.user is not None:
        own[H_TENANT_USER] = tenant
        user_id = by.user
    copy = aio_pika.Message(
        message.body,
        headers=own,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=user_id,
        app_id=message.app_id,
    )
    room = by.frame_max - _FRAME_OVERHEAD - BROKER_MARGIN - _header_payload(copy.properties)
    carried, left_out = _fitting(
        (
            (k, v)
            for k, v in (message.headers or {}).items()
            if k not in drop and k not in own and k != H_TENANT_USER
        ),
        room,
    )
    if left_out:
        log.warning(
            "request headers too large to copy; left out",
            headers=left_out[:20],
            frame_max=by.frame_max,
        )
    copy.headers = {**carried, **own}
    return copy


def _header_payload(properties: Basic.Properties) -> int:
    return len(ContentHeader(0, 0, properties).marshal())


def _fitting(headers: Iterable[tuple[str, Any]], room: int) -> tuple[dict[str, Any], list[str]]:
    """The headers, in order, that fit in ``room`` bytes of field table; and the names of
    those left out (too large, or of a type AMQP cannot carry)."""
    kept: dict[str, Any] = {}
    left_out: list[str] = []
    for name, value in headers:
        wired = _wire(value)
        try:
            size = len(encode.short_string(name)) + len(encode.encode_table_value(wired))
        except (TypeError, ValueError):
            size = room + 1
        if size <= room:
            kept[name] = wired
            room -= size
        else:
            left_out.append(name)
    return kept, left_out


def _wire(value: Any) -> Any:
    """``value`` as pamqp encodes it again: ``bytes`` (a long string that was not UTF-8)
    as a byte array, in nested tables and arrays too."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {k: _wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_wire(v) for v in value]
    return value
