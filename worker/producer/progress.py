"""Progress of a ``submit`` run: the tally, and a bar on a terminal or a line in a log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import IO, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker.messages import JobResult

__all__ = ["PlainReporter", "Reporter", "RichReporter", "Tally"]

PLAIN_PROGRESS_EVERY = 5.0


@dataclass(slots=True)
class Tally:
    """What a run did; ``done`` counts input lines that have their output line."""

    total: int = 0
    published: int = 0
    ok: int = 0
    failed: int = 0
    invalid: int = 0
    skipped: int = 0
    earlier_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0  #: the sum of ``metadata.cost.total`` over results with a price
    priced: int = 0  #: results with a price (a cache hit's is 0)
    unpriced: int = 0  #: successful results without one (§17: null, never a guess)
    complete: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.invalid + self.skipped

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return (self.done - self.skipped) / max(self.elapsed, 1e-9)

    @property
    def cost_line(self) -> str:
        """What this run's results cost, ``unknown`` for those without a price (§17)."""
        if not self.priced and not self.unpriced:
            return "cost: none (no result in this run had a price)"
        if not self.priced:
            return f"cost: unknown (no price for the {self.unpriced} results)"
        line = f"cost: {_usd(self.cost_usd)} USD"
        if self.unpriced:
            line += f" for {self.priced} results; unknown for {self.unpriced} without a price"
        return line

    @property
    def exit_code(self) -> int:
        """0 when every line of the output is a success, else 1."""
        clean = not (self.failed or self.invalid or self.earlier_failed)
        return 0 if self.complete and clean else 1

    def add(self, result: JobResult) -> None:
        if result.error is None:
            self.ok += 1
        else:
            self.failed += 1
        cost = result.metadata.cost
        if cost is not None:
            self.priced += 1
            self.cost_usd += cost.total
        elif result.error is None:
            self.unpriced += 1
        if result.usage is not None:
            self.prompt_tokens += result.usage.prompt_tokens or 0
            self.completion_tokens += result.usage.completion_tokens or 0
            self.total_tokens += result.usage.total_tokens or 0


class Reporter(Protocol):
    def update(self, tally: Tally) -> None: ...
    def warn(self, text: str) -> None: ...
    def close(self) -> None: ...


class PlainReporter:
    """A line every few seconds: for logs and pipes."""

    def __init__(self, stream: IO[str], every: float = PLAIN_PROGRESS_EVERY) -> None:
        self.stream = stream
        self.every = every
        self._last = time.monotonic()

    def update(self, tally: Tally) -> None:
        if time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            print(f"submit: {_progress_line(tally)}", file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichReporter:
    """A progress bar: for a terminal."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]submit"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "[green]ok {task.fields[ok]}[/] [red]failed {task.fields[failed]}[/] "
                "tokens {task.fields[tokens]} {task.fields[rate]:.0f}/s"
            ),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("submit", total=None, ok=0, failed=0, tokens=0, rate=0.0)
        self.started = False

    def update(self, tally: Tally) -> None:
        if not self.started:  # here, so that a run that never starts shows no bar
            self.progress.start()
            self.started = True
        self.progress.update(
            self.task,
            total=tally.total,
            completed=tally.done,
            ok=tally.ok,
            failed=tally.failed + tally.invalid,
            tokens=tally.total_tokens,
            rate=tally.rate,
        )

    def warn(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self.started:
            self.progress.stop()


def _usd(amount: float) -> str:
    """Cents for dollars; six decimals below one (a request costs fractions of a cent)."""
    if amount >= 1:
        return f"{amount:,.2f}"
    return f"{amount:.6f}".rstrip("0").rstrip(".") or "0"


def _progress_line(tally: Tally) -> str:
    return (
        f"{tally.done}/{tally.total} done, {tally.ok} ok, {tally.failed + tally.invalid} failed, "
        f"{tally.total_tokens} tokens, {tally.rate:.1f} lines/s"
    )
