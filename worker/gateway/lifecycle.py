"""What happens to batches with time: finalizing, cancellation, expiry (contract §15)."""

from __future__ import annotations

import asyncio
import time

import structlog
from aio_pika.abc import AbstractChannel
from sqlalchemy import select

from worker.amqp.cancellations import publish_cancel
from worker.gateway.batchstore import BatchStore
from worker.gateway.ledger import OPEN, Ledger
from worker.gateway.metrics import GatewayMetrics
from worker.gateway.output import Outcome
from worker.gateway.schema import batches
from worker.gateway.store import Record, Store, now
from worker.settings import Settings

__all__ = ["Lifecycle"]

log = structlog.get_logger(__name__)

#: seconds between two announcements of a batch still cancelling
ANNOUNCE_EVERY = 2.0
CANCELLED = "the batch was cancelled before this line's upstream call"
EXPIRED = "the batch expired before this line finished"


class Lifecycle:
    def __init__(
        self,
        store: Store,
        ledger: Ledger,
        batches: BatchStore,
        events: AbstractChannel,
        settings: Settings,
        events_exchange: str,
        metrics: GatewayMetrics,
    ) -> None:
        self.store, self.ledger, self.batches = store, ledger, batches
        self.events, self.settings, self.exchange = events, settings, events_exchange
        self.metrics = metrics
        self._announced = 0.0

    async def finalize(self, batch_id: str, end_status: str = "completed") -> None:
        """Every line has its outcome: finalizing, then the end status with its files."""
        started = time.perf_counter()
        begun = await self.ledger.begin_finalizing(batch_id, end_status)
        if begun and await self.ledger.finish(batch_id):
            self.metrics.finalize_seconds.observe(time.perf_counter() - started)
            log.info("batch finished", batch_id=batch_id)

    async def cancel(self, batch_id: str) -> bool:
        """``cancelling`` at once, and the workers told."""
        if not await self.batches.cancel(batch_id):
            return False
        await self.announce(batch_id)
        return True

    async def announce(self, batch_id: str) -> None:
        try:
            await publish_cancel(self.events, self.exchange, batch_id)
        except Exception as exc:  # the next sweep announces it again
            log.warning("could not announce a cancellation", batch_id=batch_id, error=repr(exc))

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep failed; trying again")
            await asyncio.sleep(self.settings.gateway_sweep_interval)

    async def sweep(self) -> None:
        """One round: announce, end what the grace or the clock ended, finish what is full."""
        live = await self.batches.ids_in(*OPEN, "finalizing")
        announce = time.monotonic() - self._announced >= ANNOUNCE_EVERY
        if announce:
            self._announced = time.monotonic()
        for batch in live:
            await self._sweep_one(batch, announce)
        for batch_id in await self._full():
            await self.finalize(batch_id)
        self.metrics.set_batches(await self.batches.count_by_status())

    async def _sweep_one(self, batch: Record, announce: bool) -> None:
        batch_id, status = batch["id"], batch["status"]
        if status == "finalizing":
            await self.ledger.finish(batch_id)
            return
        full = await self.batches.get(batch_id, any_tenant=True)
        if full is None:
            return
        if batch["expires_at"] <= now():
            self._ended(await self.ledger.end_unfinished(full, "expired", EXPIRED))
            await self.finalize(batch_id, "expired")
            return
        if status != "cancelling":
            return
        if announce:
            await self.announce(batch_id)
        if (batch["cancelling_at"] or 0) + self.settings.gateway_cancel_grace <= time.time():
            self._ended(await self.ledger.end_unfinished(full, "cancelled", CANCELLED))
            await self.finalize(batch_id)

    def _ended(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            self.metrics.ended(outcome.code or "ok")

    async def _full(self) -> list[str]:
        """Open batches whose lines all have outcomes (a finalize a crash interrupted)."""
        query = select(batches.c.id).where(
            batches.c.status.in_(OPEN), batches.c.completed + batches.c.failed >= batches.c.total
        )
        async with self.store.engine.connect() as connection:
            return list((await connection.execute(query)).scalars())
