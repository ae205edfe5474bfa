"""A batch from ``validating`` to every line published, under a lease so that one replica
at a time works on it; a gateway that died mid-publish is resumed where it stopped."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from worker.gateway.batchstore import BatchStore
from worker.gateway.lines import LineCheck, LineError
from worker.gateway.metrics import GatewayMetrics
from worker.gateway.publish import LinePublisher
from worker.gateway.store import Record, Store
from worker.settings import Settings

__all__ = ["BatchRunner"]

log = structlog.get_logger(__name__)

# A file of many lines must not starve the loop while it is checked.
YIELD_EVERY = 256
RETRY_AFTER_FAILURE = 2.0


class BatchRunner:
    """Claims batches to validate or publish, one at a time, until stopped."""

    def __init__(
        self,
        store: Store,
        batches: BatchStore,
        publisher: LinePublisher,
        settings: Settings,
        metrics: GatewayMetrics,
        owner: str,
    ) -> None:
        self.store, self.batches, self.publisher = store, batches, publisher
        self.settings, self.metrics, self.owner = settings, metrics, owner
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A batch was created: look now rather than at the next interval."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            worked = False
            try:
                for batch_id in await self.batches.claimable(self.owner):
                    if await self.batches.claim(batch_id, self.owner, self._lease):
                        worked = True
                        try:
                            await self.drive(batch_id)
                        finally:
                            await self.batches.release(batch_id, self.owner)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch runner failed; trying again")
                await asyncio.sleep(RETRY_AFTER_FAILURE)
                continue
            if not worked:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.gateway_sweep_interval):
                        await self._wake.wait()

    @property
    def _lease(self) -> float:
        return self.settings.gateway_lease_seconds

    async def drive(self, batch_id: str) -> None:
        batch = await self.batches.get(batch_id, any_tenant=True)
        if batch is None:
            return
        if batch["status"] == "validating":
            if not await self.validate(batch):
                return
            batch = await self.batches.get(batch_id, any_tenant=True)
            if batch is None:
                return
        if batch["status"] == "in_progress":
            await self.publish(batch)

    async def validate(self, batch: Record) -> bool:
        """Check every line; fail the batch on any bad one, else start it."""
        check = LineCheck(batch["endpoint"])
        count = 0
        async for line_no, raw in self.store.iter_lines(batch["input_file_id"]):
            if not raw.strip():
                continue
            check.check(line_no, raw)
            count += 1
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)
                if not await self.batches.claim(batch["id"], self.owner, self._lease):
                    return False
        if count == 0:
            check.errors.append(LineError("empty_file", "the input file has no request lines", 0))
        if check.errors:
            await self.batches.fail(batch["id"], [e.as_dict() for e in check.errors])
            log.info("batch failed validation", batch_id=batch["id"], errors=len(check.errors))
            return False
        started = await self.batches.start(batch["id"], self.owner, check.model)
        if started:
            log.info("batch in progress", batch_id=batch["id"], lines=count)
        return started

    async def publish(self, batch: Record) -> None:
        """Publish the lines after ``published_upto`` in chunks, recording progress after
        each confirmed chunk: a restart republishes at most one chunk."""
        started = time.perf_counter()
        chunk: list[tuple[int, bytes]] = []
        size = self.settings.gateway_publish_chunk
        upto = batch["published_upto"]
        async for line_no, raw in self.store.iter_lines(
            batch["input_file_id"], after=upto, upto=batch["last_line"]
        ):
            upto = line_no
            if raw.strip():
                chunk.append((line_no, raw))
            if len(chunk) >= size:
                if not await self._send(batch, chunk, upto):
                    return
                chunk = []
        if not await self._send(batch, chunk, batch["last_line"]):
            return
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        log.info("batch published", batch_id=batch["id"])

    async def _send(self, batch: Record, chunk: list[tuple[int, bytes]], upto: int) -> bool:
        await self.publisher.publish(batch, chunk)
        self.metrics.published.inc(len(chunk))
        return await self.batches.advance(batch["id"], self.owner, upto, self._lease)
