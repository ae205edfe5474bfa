"""The gateway on the operator page: its batches reported every 2 s, the console's cancels taken.

:class:`GatewayStatus` runs as one of the gateway's background tasks. It publishes, every
:data:`STATUS_INTERVAL` seconds, the most recent :data:`MAX_BATCHES` batches of the store
created within :data:`RECENT` seconds (id, tenant, status, counts, creation time, cost; never
a line's content) to the events exchange, where the console reads them; and it follows the
console's requests (``worker.amqp.control``): a cancel request for a batch of this store is
carried out by :meth:`Lifecycle.cancel`, the code path of ``POST /v1/batches/{id}/cancel``,
whichever tenant owns the batch. Replicas sharing a database all hear the request; the
transition is one conditional ``UPDATE``, so one of them makes it and announces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection
from sqlalchemy import select

from worker.amqp.control import EVENT_GATEWAY, follow_control, publish_status
from worker.gateway.batchstore import BatchStore
from worker.gateway.lifecycle import Lifecycle
from worker.gateway.schema import batches

__all__ = ["MAX_BATCHES", "RECENT", "STATUS_INTERVAL", "GatewayStatus"]

log = structlog.get_logger(__name__)

STATUS_INTERVAL = 2.0
MAX_BATCHES = 50
RECENT = 86_400  # seconds: a day
ENDED = ("completed", "failed", "expired", "cancelling", "cancelled")

# Plain names: the columns' own are ``quoted_name`` (a str subclass orjson refuses as a key).
_FIELDS = ("id", "tenant", "status", "total", "completed", "failed", "created_at", "cost")
_COLUMNS = tuple(batches.c[name] for name in _FIELDS)


class GatewayStatus:
    """Publishes this replica's batches and takes the console's cancels while :meth:`run` runs."""

    def __init__(
        self,
        connection: AbstractConnection,
        events_exchange: str,
        store: BatchStore,
        lifecycle: Lifecycle,
        identity: str,
        *,
        interval: float = STATUS_INTERVAL,
    ) -> None:
        self.connection, self.exchange = connection, events_exchange
        self.store, self.lifecycle = store, lifecycle
        self.identity, self.interval = identity, interval
        self.sent = 0

    async def body(self) -> dict[str, Any]:
        """The status document: the most recent batches of the last day, newest first."""
        query = (
            select(*_COLUMNS)
            .where(batches.c.created_at >= int(time.time()) - RECENT)
            .order_by(batches.c.seq.desc())
            .limit(MAX_BATCHES)
        )
        async with self.store.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return {
            "type": EVENT_GATEWAY,
            "gateway": self.identity,
            "sent_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "batches": [dict(zip(_FIELDS, row, strict=True)) for row in rows],
        }

    async def cancel(self, batch_id: str) -> None:
        """The console's cancel request: as ``POST /v1/batches/{id}/cancel``, any tenant's."""
        row = await self.store.get(batch_id, any_tenant=True)
        if row is None or row["status"] in ENDED:
            return  # another store's batch, or nothing left to cancel
        done = await self.lifecycle.cancel(batch_id)
        log.info(
            "batch cancel requested by the console",
            batch_id=batch_id,
            tenant=row["tenant"],
            cancelled=done,
        )

    async def run(self) -> None:
        """Publish and follow until cancelled; a lost channel is opened again."""
        while True:
            stop_following: Callable[[], Awaitable[None]] | None = None
            channel: AbstractChannel | None = None
            try:
                stop_following = await follow_control(self.connection, self.exchange, self.cancel)
                channel = await self.connection.channel(publisher_confirms=False)
                while True:
                    started = time.monotonic()
                    await publish_status(channel, self.exchange, await self.body())
                    self.sent += 1
                    await asyncio.sleep(max(self.interval - (time.monotonic() - started), 0.0))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("gateway status stopped; starting again", error=repr(exc))
            finally:
                if stop_following is not None:
                    await stop_following()
                if channel is not None and not channel.is_closed:
                    with contextlib.suppress(Exception):
                        await channel.close()
            await asyncio.sleep(self.interval)
