"""``chat-worker budgets`` (§10, §17): each tenant's spend and limits, as a table."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import yaml
from click.testing import CliRunner
from rich.console import Console

from worker.budgets import BudgetsFile, Ledger, Reservation
from worker.budgets_cli import show_budgets
from worker.cli import main

pytestmark = pytest.mark.integration

BUDGETS = """\
budgets:
  - tenant: team-a
    usd_per_day: 10
    tokens_per_day: 1000
  - tenant: "*"
    usd_per_month: 100
    on_exceed: wait
"""


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"test-budget-cli:{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{name}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def test_table_of_spend_and_limits(tmp_path: Path, redis_url: str, prefix: str) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(BUDGETS, encoding="utf-8")

    async def spend() -> None:
        ledger = Ledger(
            redis_url, BudgetsFile.model_validate(yaml.safe_load(BUDGETS)), prefix=prefix
        )
        try:
            for tenant, usd, tokens in (("team-a", 8.5, 900), ("team-z", 12.0, 50)):
                assert isinstance(await ledger.reserve(tenant, usd, tokens), Reservation)
        finally:
            await ledger.aclose()

    asyncio.run(spend())
    console = Console(record=True, width=200)
    settings = SimpleNamespace(budgets_file=path, redis_url=redis_url)
    assert show_budgets(settings, console=console, prefix=prefix) == 0
    text = console.export_text()
    team_a = next(line for line in text.splitlines() if "team-a" in line)
    assert "$8.50 / $10.00 (85%)" in team_a
    assert "900 / 1,000 (90%)" in team_a
    assert "own" in team_a
    team_z = next(line for line in text.splitlines() if "team-z" in line)
    assert "$12.00 / $100.00 (12%)" in team_z
    assert "* (each apart)" in team_z and "wait" in team_z


def test_without_the_file_or_redis_exit_2(tmp_path: Path) -> None:
    env = {"WORKER_BUDGETS_FILE": "", "WORKER_REDIS_URL": ""}
    result = CliRunner().invoke(main, ["budgets"], env=env)
    assert result.exit_code == 2
    assert "WORKER_BUDGETS_FILE is not set" in result.output

    path = tmp_path / "budgets.yaml"
    path.write_text("budgets:\n  - tenant: a\n    usd_per_dya: 1\n", encoding="utf-8")
    console = Console(record=True, width=200)
    settings = SimpleNamespace(budgets_file=path, redis_url="redis://127.0.0.1:6379/0")
    assert show_budgets(settings, console=console) == 2
    assert "line 3: budgets[0].usd_per_dya: Extra inputs" in console.export_text()
    settings = SimpleNamespace(budgets_file=path, redis_url=None)
    assert show_budgets(settings, console=console) == 2


def test_redis_down_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(BUDGETS, encoding="utf-8")
    console = Console(record=True, width=200)
    settings = SimpleNamespace(budgets_file=path, redis_url="redis://127.0.0.1:1/0")
    assert show_budgets(settings, console=console) == 1
    assert "Redis: ConnectionError" in console.export_text()
