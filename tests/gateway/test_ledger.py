"""The store's line accounting against a simple model: results in any order, duplicated,
after a cancel; counts always exact, and the files list each line once, in order."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.gateway.batchstore import BatchStore
from worker.gateway.ledger import Ledger
from worker.gateway.output import Outcome, ended_outcome, outcome_from_result
from worker.gateway.store import Store, async_url

pytestmark = pytest.mark.unit

LINES = 12


def result(batch_id: str, line_no: int, ok: bool, tokens: int) -> Outcome:
    import orjson

    document = {
        "id": f"{batch_id}:{line_no}",
        "custom_id": f"c-{line_no}",
        "response": {"status_code": 200 if ok else 500, "request_id": None, "body": {}},
        "error": None if ok else {"code": "upstream_error", "message": "boom"},
        "usage": {"prompt_tokens": tokens, "completion_tokens": 1, "total_tokens": tokens + 1},
        "metadata": {"cost": {"total": 0.5}},
    }
    outcome = outcome_from_result(orjson.dumps(document))
    assert outcome is not None
    return outcome


events = st.lists(
    st.one_of(
        st.tuples(st.just("result"), st.integers(1, LINES), st.booleans(), st.integers(0, 9)),
        st.tuples(st.just("cancel"), st.just(0), st.just(False), st.just(0)),
    ),
    max_size=40,
)


async def scenario(path: Path, steps: list[tuple[str, int, bool, int]]) -> None:
    store = await Store.open(f"sqlite:///{path}")
    try:
        file_id = await store.begin_upload(None, "in.jsonl", "batch")
        rows = [(n, f'{{"custom_id":"c-{n}"}}\n'.encode()) for n in range(1, LINES + 1)]
        await store.add_lines(file_id, rows)
        file = await store.finish_upload(file_id, 0, LINES, LINES)
        batches, ledger = BatchStore(store.engine), Ledger(store.engine)
        batch = await batches.create(
            tenant=None,
            endpoint="/v1/chat/completions",
            input_file=file,
            completion_window="1h",
            window_seconds=3600,
            metadata=None,
        )
        assert await batches.claim(batch["id"], "me", 60)
        assert await batches.start(batch["id"], "me", None)
        model: dict[int, tuple[bool, int]] = {}  # line -> (ok, tokens), first one wins
        for kind, line_no, ok, tokens in steps:
            if kind == "cancel":
                await batches.cancel(batch["id"])
                continue
            await ledger.record([result(batch["id"], line_no, ok, tokens)] * 2)
            model.setdefault(line_no, (ok, tokens))
        row = await batches.get(batch["id"])
        assert row is not None
        assert row["completed"] == sum(ok for ok, _ in model.values())
        assert row["failed"] == sum(not ok for ok, _ in model.values())
        assert row["input_tokens"] == sum(t for _, t in model.values())
        assert row["cost"] == (0.5 * len(model) if model else None)
        ended = await ledger.end_unfinished(row, "cancelled", "gone")
        assert sorted(o.line_no for o in ended) == sorted(set(range(1, LINES + 1)) - set(model))
        assert await ledger.end_unfinished(row, "cancelled", "gone") == []
        await ledger.record([ended_outcome(batch["id"], 1, "c-1", "expired", "late")])
        assert await ledger.begin_finalizing(batch["id"])
        assert await ledger.finish(batch["id"])
        assert not await ledger.finish(batch["id"])
        final = await batches.get(batch["id"])
        assert final is not None
        assert final["completed"] + final["failed"] == final["total"] == LINES
        assert final["status"] == ("cancelled" if final["cancelling_at"] else "completed")
        seen: list[int] = []
        for file_key in ("output_file_id", "error_file_id"):
            if final[file_key] is None:
                continue
            stored = await store.get_file(final[file_key], None)
            assert stored is not None
            content = b"".join([chunk async for chunk in store.content(stored)])
            assert stored["bytes"] == len(content)
            numbers = [int(line.split(b'"c-')[1].split(b'"')[0]) for line in content.splitlines()]
            assert numbers == sorted(numbers)
            seen.extend(numbers)
        assert sorted(seen) == list(range(1, LINES + 1))
    finally:
        await store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=events)
def test_line_accounting_matches_the_model(steps: list[tuple[str, int, bool, int]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(scenario(Path(folder) / "ledger.db", steps))


def test_database_urls_get_their_async_drivers() -> None:
    assert async_url("sqlite:///chat-worker.db") == "sqlite+aiosqlite:///chat-worker.db"
    assert async_url("postgresql://u:p@h:5432/db") == "postgresql+asyncpg://u:p@h:5432/db"
    with pytest.raises(ValueError, match="unsupported"):
        async_url("mysql://h/db")


async def test_the_migrations_build_the_tables_of_the_schema(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from worker.gateway.schema import metadata

    store = await Store.open(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        async with store.engine.connect() as connection:
            differences = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
            )
    finally:
        await store.close()
    assert differences == []


async def test_lines_unfinished_at_expires_at_end_expired(tmp_path: Path) -> None:
    from sqlalchemy import update

    from worker.gateway.lifecycle import Lifecycle
    from worker.gateway.metrics import GatewayMetrics
    from worker.gateway.schema import batches as table
    from worker.settings import Settings

    store = await Store.open(f"sqlite:///{tmp_path / 'expiry.db'}")
    try:
        file_id = await store.begin_upload(None, "in.jsonl", "batch")
        await store.add_lines(
            file_id, [(n, f'{{"custom_id":"c-{n}"}}\n'.encode()) for n in (1, 2, 3)]
        )
        file = await store.finish_upload(file_id, 0, 3, 3)
        batches, ledger = BatchStore(store.engine), Ledger(store.engine)
        batch = await batches.create(
            tenant=None,
            endpoint="/v1/chat/completions",
            input_file=file,
            completion_window="1m",
            window_seconds=60,
            metadata=None,
        )
        assert await batches.claim(batch["id"], "me", 60)
        assert await batches.start(batch["id"], "me", None)
        await ledger.record([result(batch["id"], 2, True, 3)])
        async with store.engine.begin() as connection:
            await connection.execute(
                update(table).where(table.c.id == batch["id"]).values(expires_at=0)
            )
        config = Settings(_env_file=None)  # type: ignore[call-arg]
        lifecycle = Lifecycle(
            store,
            ledger,
            batches,
            None,
            config,
            "unused",
            GatewayMetrics(),  # type: ignore[arg-type]
        )
        await lifecycle.sweep()
        final = await batches.get(batch["id"])
        assert final is not None
        assert (final["status"], final["completed"], final["failed"]) == ("expired", 1, 2)
        assert final["expired_at"] is not None
        errors = await store.get_file(final["error_file_id"], None)
        assert errors is not None
        content = b"".join([chunk async for chunk in store.content(errors)])
        assert [orjson_loads(line)["custom_id"] for line in content.splitlines()] == ["c-1", "c-3"]
        assert {orjson_loads(line)["error"]["code"] for line in content.splitlines()} == {"expired"}
    finally:
        await store.close()


def orjson_loads(data: bytes) -> dict[str, object]:
    import orjson

    document: dict[str, object] = orjson.loads(data)
    return document
