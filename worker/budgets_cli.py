"""``chat-worker budgets``: each tenant's spend and limits in the current UTC day and month."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError
from rich.console import Console
from rich.table import Table

from worker.budgets import (
    ANY_TENANT,
    DEFAULT_PREFIX,
    BudgetRule,
    BudgetsFileError,
    Ledger,
    Limit,
    Spend,
    load_budgets,
)

__all__ = ["budget_rows", "budgets_table", "show_budgets"]

WARN_AT = 0.8  # a limit this full is shown in yellow; a spent one in red
COLUMNS: tuple[Limit, ...] = ("usd_per_day", "usd_per_month", "tokens_per_day", "tokens_per_month")


async def budget_rows(ledger: Ledger) -> list[tuple[BudgetRule | None, Spend]]:
    """Each tenant with a rule of its own or spend this month, with its rule and spend."""
    now = ledger.clock()
    rows = []
    for tenant in await ledger.tenants(now):
        rows.append((ledger.budgets.rule_for(tenant), await ledger.spend(tenant, now)))
    return rows


def budgets_table(rows: list[tuple[BudgetRule | None, Spend]], now: datetime) -> Table:
    """The rows as a rich table: spent / limit (share) for each limit, and the rule."""
    table = Table(title=f"budgets on {now:%Y-%m-%d} (UTC day) and {now:%Y-%m} (month)")
    table.add_column("tenant", overflow="fold")
    for limit in COLUMNS:
        table.add_column(limit.replace("_", " "), justify="right")
    table.add_column("rule")
    table.add_column("on exceed")
    for rule, spend in rows:
        cells = [_cell(spend.of(c), rule.limit(c) if rule else None, c) for c in COLUMNS]
        table.add_row(
            spend.tenant,
            *cells,
            "-" if rule is None else ("* (each apart)" if rule.tenant == ANY_TENANT else "own"),
            "-" if rule is None else rule.on_exceed,
        )
    return table


def _cell(spent: float, limit: float | None, name: Limit) -> str:
    text = f"${spent:,.2f}" if name.startswith("usd") else f"{int(spent):,}"
    if limit is None:
        return text
    share = spent / limit
    text += f" / {f'${limit:,.2f}' if name.startswith('usd') else f'{int(limit):,}'}"
    text += f" ({share:.0%})"
    colour = "red" if share >= 1 else "yellow" if share >= WARN_AT else None
    return f"[{colour}]{text}[/]" if colour else text


def show_budgets(
    settings: Any, *, console: Console | None = None, prefix: str = DEFAULT_PREFIX
) -> int:
    """Print the table; the exit code: 0, 2 for a missing or invalid setting, 1 when Redis
    does not answer. Reads ``settings.budgets_file`` (else ``WORKER_BUDGETS_FILE``) and
    ``settings.redis_url``."""
    console = console or Console(width=max(Console().width, 120))
    path = settings.budgets_file
    redis_url = getattr(settings, "redis_url", None)
    if not path:
        console.print("chat-worker: WORKER_BUDGETS_FILE is not set: no budgets", style="red")
        return 2
    if redis_url is None:
        console.print("chat-worker: WORKER_BUDGETS_FILE needs WORKER_REDIS_URL", style="red")
        return 2
    try:
        budgets = load_budgets(Path(path))
    except BudgetsFileError as exc:
        console.print(f"chat-worker: invalid setting {exc}", style="red", markup=False)
        return 2
    url = redis_url if isinstance(redis_url, str) else redis_url.get_secret_value()

    async def collect() -> tuple[list[tuple[BudgetRule | None, Spend]], datetime]:
        ledger = Ledger(url, budgets, prefix=prefix)
        try:
            return await budget_rows(ledger), ledger.clock()
        finally:
            await ledger.aclose()

    try:
        rows, now = asyncio.run(collect())
    except (RedisError, OSError) as exc:
        console.print(f"chat-worker: Redis: {type(exc).__name__}: {exc}", markup=False)
        return 1
    console.print(budgets_table(rows, now))
    return 0
