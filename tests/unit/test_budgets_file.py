"""``WORKER_BUDGETS_FILE`` (§17): strict models, one-line errors naming file and line."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.budgets import (
    ANY_TENANT,
    BudgetsFile,
    BudgetsFileError,
    Ledger,
    Periods,
    Reservation,
    load_budgets,
)
from worker.settings import SettingsError

pytestmark = pytest.mark.unit

FULL = """\
budgets:
  - tenant: team-a
    usd_per_day: 50
    usd_per_month: 1000
    tokens_per_day: 20000000
    on_exceed: fail
  - tenant: "*"
    usd_per_day: 5.5
    on_exceed: wait
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(BudgetsFileError) as caught:
        load_budgets(write(tmp_path, text))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_full_file(tmp_path: Path) -> None:
    budgets = load_budgets(write(tmp_path, FULL))
    team_a, anyone = budgets.budgets
    assert (team_a.tenant, team_a.usd_per_day, team_a.usd_per_month) == ("team-a", 50, 1000)
    assert (team_a.tokens_per_day, team_a.tokens_per_month) == (20_000_000, None)
    assert team_a.on_exceed == "fail"
    assert (anyone.tenant, anyone.usd_per_day, anyone.on_exceed) == (ANY_TENANT, 5.5, "wait")


def test_rule_for_a_tenant_its_own_then_the_star() -> None:
    budgets = BudgetsFile.model_validate(
        {"budgets": [{"tenant": "team-a", "usd_per_day": 1}, {"tenant": "*", "usd_per_day": 2}]}
    )
    assert budgets.rule_for("team-a") is budgets.budgets[0]
    assert budgets.rule_for("team-b") is budgets.budgets[1]
    assert budgets.rule_for(None) is budgets.budgets[1]
    alone = BudgetsFile.model_validate({"budgets": [{"tenant": "team-a", "usd_per_day": 1}]})
    assert alone.rule_for("team-b") is None
    assert alone.rule_for(None) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "budgets:\n  - tenant: a\n    usd_per_day: 1\n    usd_per_dya: 2\n",
            "line 4: budgets[0].usd_per_dya: Extra inputs are not permitted",
        ),
        (
            "budgets:\n  - tenant: a\n    usd_per_day: -1\n",
            "line 3: budgets[0].usd_per_day: Input should be greater than 0",
        ),
        ("budgets:\n  - tenant: a\n    usd_per_day: .inf\n", "line 3: budgets[0].usd_per_day"),
        ("budgets:\n  - tenant: a\n    usd_per_day: .nan\n", "line 3: budgets[0].usd_per_day"),
        ("budgets:\n  - tenant: a\n    tokens_per_day: 1.5\n", "line 3: budgets[0].tokens_per_day"),
        (
            "budgets:\n  - tenant: a\n    usd_per_day: 1\n    on_exceed: queue\n",
            "line 4: budgets[0].on_exceed: Input should be 'fail' or 'wait'",
        ),
        ("budgets:\n  - tenant: a\n    on_exceed: wait\n", "line 2: budgets[0]: give at least one"),
        (
            "budgets:\n  - {tenant: a, usd_per_day: 1}\n  - {tenant: a, usd_per_month: 9}\n",
            "budgets: tenants must be unique: a repeated",
        ),
        ("budgets: []\n", "budgets: List should have at least 1 item"),
        ("- just a list\n", "document: Input should be a valid dictionary"),
        ("budgets:\n  - tenant: [a\n", "line 3: "),
    ],
)
def test_invalid_file_one_line_naming_file_and_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"WORKER_BUDGETS_FILE {tmp_path / 'budgets.yaml'}")
    assert expected in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BudgetsFileError, match="cannot read: No such file"):
        load_budgets(tmp_path / "absent.yaml")


def test_the_error_is_a_settings_error(tmp_path: Path) -> None:
    # The CLI's settings handling (one line, exit 2) catches it as it is.
    with pytest.raises(SettingsError):
        load_budgets(write(tmp_path, "budgets: 3\n"))


@pytest.mark.parametrize(
    ("now", "day_end", "month", "month_end"),
    [
        (
            datetime(2030, 1, 31, 23, 59, 59, tzinfo=UTC),
            datetime(2030, 2, 1, tzinfo=UTC),
            "2030-01",
            datetime(2030, 2, 1, tzinfo=UTC),
        ),
        (
            datetime(2028, 2, 28, 12, tzinfo=UTC),
            datetime(2028, 2, 29, tzinfo=UTC),
            "2028-02",
            datetime(2028, 3, 1, tzinfo=UTC),
        ),
        (
            datetime(2030, 12, 15, tzinfo=UTC),
            datetime(2030, 12, 16, tzinfo=UTC),
            "2030-12",
            datetime(2031, 1, 1, tzinfo=UTC),
        ),
    ],
)
def test_periods_turn_at_utc_midnight_and_month_start(
    now: datetime, day_end: datetime, month: str, month_end: datetime
) -> None:
    periods = Periods.at(now)
    assert (periods.day_end, periods.month, periods.month_end) == (day_end, month, month_end)
    assert periods.end_of("usd_per_day") == day_end
    assert periods.end_of("tokens_per_month") == month_end


async def test_redis_down_fails_open_and_counts_it() -> None:
    budgets = BudgetsFile.model_validate({"budgets": [{"tenant": "*", "usd_per_day": 1}]})
    ledger = Ledger("redis://127.0.0.1:1/0", budgets, timeout=0.5)
    try:
        reservation = await ledger.reserve("team-a", 100.0, 10)
        assert isinstance(reservation, Reservation)
        assert not reservation.recorded
        await ledger.settle(reservation, 5.0, 5)  # unrecorded: nothing to correct
        assert ledger.unavailable == 1
    finally:
        await ledger.aclose()
