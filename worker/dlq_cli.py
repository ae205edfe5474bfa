"""``chat-worker dlq list`` and ``dlq replay``: the dead letters of a lane, shown and sent
back."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from worker.settings import Settings

if TYPE_CHECKING:
    from rich.table import Table

    from worker.amqp.dlq import DeadLetter

__all__ = ["BROKER_REASONS", "dead_letters_table", "dlq", "lane_or_exit", "visible"]


@click.group()
def dlq() -> None:
    """List and replay dead-lettered requests (WORKER_DEAD_LETTER_QUEUE)."""


# What --code may name: an error code of the contract (§6), or the reason the broker gave
# when it dead-lettered a message itself (x-death: a redelivery limit, a TTL, a length limit).
BROKER_REASONS = ("delivery_limit", "expired", "maxlen", "rejected")


def _known_codes(
    _ctx: click.Context, param: click.Parameter, codes: tuple[str, ...]
) -> tuple[str, ...]:
    from worker.messages import ErrorCode

    known = sorted({code.value for code in ErrorCode} | set(BROKER_REASONS))
    for code in codes:
        if code not in known:
            raise click.BadParameter(
                f"{code!r} is not an error code; one of: {', '.join(known)}", param=param
            )
    return codes


_codes = click.option(
    "--code",
    "codes",
    multiple=True,
    callback=_known_codes,
    help="Only this error code (repeatable), e.g. rate_limited.",
)
_lane = click.option(
    "--lane", default=None, help="The lane (request queue) whose dead letters [default: first]."
)


def lane_or_exit(settings: Settings, lane: str | None) -> str:
    from worker.amqp.dlq import lane_queue

    try:
        return lane_queue(settings, lane)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--lane") from None


@dlq.command("list")
@_codes
@_lane
@click.option("--limit", type=int, default=None, help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
def dlq_list(codes: tuple[str, ...], lane: str | None, limit: int | None, as_json: bool) -> None:
    """Show dead letters (job id, error code, attempts, reason); leaves them in place."""
    import orjson
    from rich.console import Console

    from worker.amqp.dlq import list_dead_letters
    from worker.cli import broker_or_exit, settings_or_exit

    settings = settings_or_exit()
    lane = lane_or_exit(settings, lane)
    letters = broker_or_exit(
        "dlq list", list_dead_letters(settings, codes=codes, limit=limit, lane=lane)
    )
    if as_json:
        for letter in letters:
            click.echo(orjson.dumps(letter.as_dict()).decode())
        return
    Console().print(dead_letters_table(letters))


def visible(text: str) -> str:
    """``text`` with every control or format character spelt as an escape (``\\x1b``,
    ``\\n``, ``\\u202e``): what a producer wrote reaches the terminal as characters only."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def dead_letters_table(letters: Sequence[DeadLetter]) -> Table:
    """The table of ``dlq list``. Ids, codes and messages come from producers and upstreams:
    each cell is plain text (rich's ``Text``: no markup, no links), its controls escaped."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{len(letters)} dead letters")
    columns = ("job_id", "custom_id", "error_code", "attempts", "reason", "bytes", "error_message")
    for column in columns:
        table.add_column(column, overflow="fold")
    for letter in letters:
        cells = (
            letter.job_id or "-",
            letter.custom_id or "-",
            letter.error_code or "-",
            "-" if letter.attempts is None else str(letter.attempts),
            letter.reason,
            str(letter.size),
            (letter.error_message or "")[:80],
        )
        table.add_row(*(Text(visible(cell)) for cell in cells))
    return table


@dlq.command("replay")
@_codes
@_lane
@click.option("--limit", type=int, default=None, help="Replay at most this many.")
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter.")
def dlq_replay(
    codes: tuple[str, ...], lane: str | None, limit: int | None, everything: bool
) -> None:
    """Send dead letters back to their lane's request queue with fresh attempts."""
    from worker.amqp.dlq import ReplayFailed, replay_dead_letters
    from worker.cli import broker_or_exit, settings_or_exit

    if not codes and not everything:
        raise click.UsageError("say which: --code CODE (repeatable) or --all")
    settings = settings_or_exit()
    lane = lane_or_exit(settings, lane)
    try:
        count = broker_or_exit(
            "dlq replay", replay_dead_letters(settings, codes=codes, limit=limit, lane=lane)
        )
    except ReplayFailed as exc:
        click.echo(f"chat-worker dlq replay: {exc}", err=True)
        sys.exit(1)
    click.echo(f"replayed {count} dead letters to {lane}")
