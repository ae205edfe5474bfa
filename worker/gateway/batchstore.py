"""Batch rows: create, read, list, the life-cycle transitions, and the publishing lease."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import and_, case, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.gateway.schema import batches
from worker.gateway.store import Record, new_id, now, same_tenant

__all__ = ["BatchStore"]

#: the number of line errors a failed batch keeps in ``errors.data``
MAX_ERRORS = 1000


class BatchStore:
    """Every state change is one conditional ``UPDATE``: replicas never step on each other."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(
        self,
        *,
        tenant: str | None,
        endpoint: str,
        input_file: Record,
        completion_window: str,
        window_seconds: int,
        metadata: dict[str, str] | None,
    ) -> Record:
        created = now()
        batch_id = new_id("batch_")
        async with self.engine.begin() as connection:
            await connection.execute(
                insert(batches).values(
                    id=batch_id,
                    tenant=tenant,
                    endpoint=endpoint,
                    input_file_id=input_file["id"],
                    completion_window=completion_window,
                    status="validating",
                    created_at=created,
                    expires_at=created + window_seconds,
                    metadata=metadata,
                    total=input_file["lines"],
                    last_line=input_file["last_line"],
                    published_upto=0,
                    completed=0,
                    failed=0,
                    input_tokens=0,
                    output_tokens=0,
                    cached_tokens=0,
                    reasoning_tokens=0,
                )
            )
            row = (await connection.execute(select(batches).where(batches.c.id == batch_id))).one()
        return row._mapping

    async def get(
        self, batch_id: str, tenant: str | None = None, *, any_tenant: bool = False
    ) -> Record | None:
        query = select(batches).where(batches.c.id == batch_id)
        if not any_tenant:
            query = query.where(same_tenant(batches.c.tenant, tenant))
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return None if row is None else row._mapping

    async def page(
        self, tenant: str | None, *, limit: int, after: str | None = None
    ) -> tuple[list[Record], bool]:
        """A page of the tenant's batches, newest first, and whether more follow."""
        query = select(batches).where(same_tenant(batches.c.tenant, tenant))
        if after is not None:
            mark = select(batches.c.seq).where(batches.c.id == after).scalar_subquery()
            query = query.where(batches.c.seq < mark)
        query = query.order_by(batches.c.seq.desc()).limit(limit + 1)
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [row._mapping for row in rows[:limit]], len(rows) > limit

    async def ids_in(self, *statuses: str) -> list[Record]:
        query = select(
            batches.c.id, batches.c.status, batches.c.expires_at, batches.c.cancelling_at
        ).where(batches.c.status.in_(statuses))
        async with self.engine.connect() as connection:
            return [row._mapping for row in (await connection.execute(query)).all()]

    async def count_by_status(self) -> dict[str, int]:
        query = select(batches.c.status, func.count()).group_by(batches.c.status)
        async with self.engine.connect() as connection:
            return {status: n for status, n in (await connection.execute(query)).all()}

    async def _transition(self, batch_id: str, allowed: tuple[str, ...], **values: Any) -> bool:
        async with self.engine.begin() as connection:
            done = await connection.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status.in_(allowed))
                .values(**values)
            )
        return done.rowcount == 1

    # --- the life cycle ----------------------------------------------------------------

    async def start(self, batch_id: str, owner: str, model: str | None) -> bool:
        """validating → in_progress, by the lease holder."""
        async with self.engine.begin() as connection:
            done = await connection.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.status == "validating",
                    batches.c.lease_owner == owner,
                )
                .values(status="in_progress", in_progress_at=now(), model=model)
            )
        return done.rowcount == 1

    async def fail(self, batch_id: str, errors: list[dict[str, Any]]) -> bool:
        """validating → failed, with the first :data:`MAX_ERRORS` line errors."""
        document = {"object": "list", "data": errors[:MAX_ERRORS]}
        return await self._transition(
            batch_id,
            ("validating",),
            status="failed",
            failed_at=now(),
            errors=document,
            lease_owner=None,
            lease_until=None,
        )

    async def cancel(self, batch_id: str) -> bool:
        """validating/in_progress → cancelling."""
        return await self._transition(
            batch_id, ("validating", "in_progress"), status="cancelling", cancelling_at=now()
        )

    # --- the publishing lease ----------------------------------------------------------

    async def claimable(self, owner: str, limit: int = 10) -> list[str]:
        """Batches to validate or publish whose lease is free, expired, or ``owner``'s."""
        query = (
            select(batches.c.id)
            .where(
                or_(
                    batches.c.status == "validating",
                    and_(
                        batches.c.status == "in_progress",
                        batches.c.published_upto < batches.c.last_line,
                    ),
                ),
                _lease_free(owner),
            )
            .order_by(batches.c.seq)
            .limit(limit)
        )
        async with self.engine.connect() as connection:
            return list((await connection.execute(query)).scalars())

    async def claim(self, batch_id: str, owner: str, seconds: float) -> bool:
        """Take the batch's lease for ``seconds``: only one replica publishes a batch."""
        async with self.engine.begin() as connection:
            done = await connection.execute(
                update(batches)
                .where(batches.c.id == batch_id, _lease_free(owner))
                .values(lease_owner=owner, lease_until=time.time() + seconds)
            )
        return done.rowcount == 1

    async def advance(self, batch_id: str, owner: str, upto: int, seconds: float) -> bool:
        """Record lines up to ``upto`` as published and renew the lease; False when the
        lease is lost or the batch left ``in_progress`` (cancelled, expired): stop."""
        async with self.engine.begin() as connection:
            done = await connection.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.lease_owner == owner,
                    batches.c.status == "in_progress",
                )
                .values(
                    published_upto=case(
                        (batches.c.published_upto < upto, upto), else_=batches.c.published_upto
                    ),
                    lease_until=time.time() + seconds,
                )
            )
        return done.rowcount == 1

    async def release(self, batch_id: str, owner: str) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.lease_owner == owner)
                .values(lease_owner=None, lease_until=None)
            )


def _lease_free(owner: str) -> Any:
    return or_(
        batches.c.lease_owner.is_(None),
        batches.c.lease_owner == owner,
        batches.c.lease_until < time.time(),
    )
