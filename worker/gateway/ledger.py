"""Line outcomes: each recorded once (insert-or-ignore), the batch's counts bumped by the
rows really added; lines ended without a result; finalizing into output and error files."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, case, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.gateway.output import Outcome, custom_id_of, ended_outcome
from worker.gateway.schema import batches, file_lines, files, outcomes
from worker.gateway.store import PAGE, Record, insert_ignoring, new_id, now

__all__ = ["Ledger", "Recorded", "iter_outcome_lines"]

# Batches whose lines may still get an outcome; a result for any other is dropped.
OPEN = ("in_progress", "cancelling")
_END_TIME = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}


@dataclass(frozen=True, slots=True)
class Recorded:
    """What one call of :meth:`Ledger.record` added: new outcomes, and batches now full."""

    added: list[Outcome]
    full: list[str]


class Ledger:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def record(self, given: Sequence[Outcome]) -> Recorded:
        """Record outcomes in one transaction; a second copy of a line's changes nothing."""
        if not given:
            return Recorded([], [])
        wanted = sorted({o.batch_id for o in given})
        async with self.engine.begin() as connection:
            known = {
                row.id: row
                for row in await connection.execute(
                    select(batches.c.id, batches.c.last_line).where(
                        batches.c.id.in_(wanted), batches.c.status.in_(OPEN)
                    )
                )
            }
            fresh = {
                (o.batch_id, o.line_no): o
                for o in given
                if o.batch_id in known and 1 <= o.line_no <= known[o.batch_id].last_line
            }
            if not fresh:
                return Recorded([], [])
            ordered = [fresh[key] for key in sorted(fresh)]
            statement = insert_ignoring(connection, outcomes).returning(
                outcomes.c.batch_id, outcomes.c.line_no
            )
            inserted = await connection.execute(statement, [o.row() for o in ordered])
            added = [fresh[(row.batch_id, row.line_no)] for row in inserted]
            by_batch: dict[str, list[Outcome]] = defaultdict(list)
            for outcome in added:
                by_batch[outcome.batch_id].append(outcome)
            full = []
            for batch_id in sorted(by_batch):  # one order for every replica: no deadlock
                batch = await _bump(connection, batch_id, by_batch[batch_id])
                if batch.completed + batch.failed >= batch.total:
                    full.append(batch_id)
        return Recorded(added, full)

    async def unfinished_lines(
        self, batch: Record, after: int = 0, limit: int = PAGE
    ) -> list[tuple[int, bytes]]:
        """Request lines of the batch without an outcome, after line ``after``."""
        query = (
            select(file_lines.c.line_no, file_lines.c.data)
            .select_from(
                file_lines.outerjoin(
                    outcomes,
                    (outcomes.c.batch_id == batch["id"])
                    & (outcomes.c.line_no == file_lines.c.line_no),
                )
            )
            .where(
                file_lines.c.file_id == batch["input_file_id"],
                file_lines.c.line_no > after,
                outcomes.c.line_no.is_(None),
            )
            .order_by(file_lines.c.line_no)
            .limit(limit)
        )
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [(n, bytes(data)) for n, data in rows]

    async def end_unfinished(self, batch: Record, code: str, message: str) -> list[Outcome]:
        """Give every line still without an outcome an error ``code`` (cancelled, expired)."""
        ended: list[Outcome] = []
        after = 0
        while page := await self.unfinished_lines(batch, after):
            after = page[-1][0]
            lines = [
                ended_outcome(batch["id"], n, custom_id_of(raw), code, message)
                for n, raw in page
                if raw.strip()
            ]
            ended.extend((await self.record(lines)).added)
        return ended

    async def begin_finalizing(self, batch_id: str, end_status: str = "completed") -> bool:
        """in_progress/cancelling → finalizing, once every line has its outcome."""
        async with self.engine.begin() as connection:
            done = await connection.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.status.in_(OPEN),
                    batches.c.completed + batches.c.failed >= batches.c.total,
                )
                .values(
                    status="finalizing",
                    finalizing_at=now(),
                    end_status=case(
                        (batches.c.status == "cancelling", "cancelled"), else_=end_status
                    ),
                    lease_owner=None,
                    lease_until=None,
                )
            )
        return done.rowcount == 1

    async def finish(self, batch_id: str) -> bool:
        """finalizing → its end status, with the output and error files (virtual: their
        lines are the outcome rows). One transaction; False when another replica did it."""
        async with self.engine.begin() as connection:
            batch = (
                await connection.execute(
                    select(batches).where(
                        batches.c.id == batch_id, batches.c.status == "finalizing"
                    )
                )
            ).first()
            if batch is None:
                return False
            sizes = await connection.execute(
                select(outcomes.c.status, func.count(), func.sum(func.length(outcomes.c.line)))
                .where(outcomes.c.batch_id == batch_id)
                .group_by(outcomes.c.status)
            )
            file_ids: dict[str, str | None] = {"ok": None, "error": None}
            for status, count, size in sizes.all():
                kind = "output" if status == "ok" else "error"
                file_ids[status] = file_id = new_id("file-")
                await connection.execute(
                    insert(files).values(
                        id=file_id,
                        tenant=batch.tenant,
                        filename=f"{batch_id}_{kind}.jsonl",
                        purpose="batch_output",
                        kind=kind,
                        batch_id=batch_id,
                        bytes=int(size or 0) + count,
                        lines=count,
                        last_line=0,
                        created_at=now(),
                        status="processed",
                    )
                )
            end = batch.end_status or "completed"
            done = await connection.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status == "finalizing")
                .values(
                    {
                        "status": end,
                        _END_TIME[end]: now(),
                        "output_file_id": file_ids["ok"],
                        "error_file_id": file_ids["error"],
                    }
                )
            )
            if done.rowcount != 1:
                await connection.rollback()
                return False
        return True


async def _bump(
    connection: AsyncConnection, batch_id: str, added: list[Outcome]
) -> Row[tuple[int, int, int]]:
    ok = sum(o.status == "ok" for o in added)
    costs = [o.cost for o in added if o.cost is not None]
    values: dict[str, Any] = {
        "completed": batches.c.completed + ok,
        "failed": batches.c.failed + (len(added) - ok),
        "input_tokens": batches.c.input_tokens + sum(o.input_tokens for o in added),
        "output_tokens": batches.c.output_tokens + sum(o.output_tokens for o in added),
        "cached_tokens": batches.c.cached_tokens + sum(o.cached_tokens for o in added),
        "reasoning_tokens": batches.c.reasoning_tokens + sum(o.reasoning_tokens for o in added),
    }
    if costs:
        values["cost"] = func.coalesce(batches.c.cost, 0.0) + sum(costs)
    result = await connection.execute(
        update(batches)
        .where(batches.c.id == batch_id)
        .values(values)
        .returning(batches.c.completed, batches.c.failed, batches.c.total)
    )
    return result.one()


async def iter_outcome_lines(
    engine: AsyncEngine, batch_id: str, status: str
) -> AsyncIterator[bytes]:
    """The output lines of one status, in input order, page by page."""
    after = 0
    while True:
        query = (
            select(outcomes.c.line_no, outcomes.c.line)
            .where(
                outcomes.c.batch_id == batch_id,
                outcomes.c.status == status,
                outcomes.c.line_no > after,
            )
            .order_by(outcomes.c.line_no)
            .limit(PAGE)
        )
        async with engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        for _, line in rows:
            yield bytes(line)
        if len(rows) < PAGE:
            return
        after = rows[-1][0]
