"""Rows of the benchmark table, printed as text and written as JSON under ``bench/results/``."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
from common import RESULTS

HEADERS = ("scenario", "jobs/s", "baseline", "ratio", "target", "result", "worker CPU/job")


@dataclass
class Row:
    """One line of the table. ``value`` is jobs/s unless ``unit`` says otherwise."""

    scenario: str
    value: float
    unit: str = "jobs/s"
    baseline: float | None = None
    baseline_label: str = ""
    target: float | None = None  # a lower bound on ``ratio`` (or on ``value`` if no baseline)
    upper: bool = False  # the target is an upper bound
    cpu_us_per_job: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def measured(self) -> float:
        return self.ratio if self.ratio is not None else self.value

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        ok = self.measured <= self.target if self.upper else self.measured >= self.target
        return "PASS" if ok else "FAIL"

    def cells(self) -> tuple[str, ...]:
        value = f"{self.value:,.1f}" if self.unit == "jobs/s" else f"{self.value:,.2f} {self.unit}"
        digits = 1 if self.unit == "jobs/s" else 2
        baseline = (
            f"{self.baseline:,.{digits}f} {self.baseline_label}".strip()
            if self.baseline is not None
            else "-"
        )
        ratio = f"{self.ratio:.2f}x" if self.ratio is not None else "-"
        if self.target is None:
            target = "-"
        else:
            sign = "<=" if self.upper else ">="
            suffix = "x" if self.baseline is not None else f" {self.unit}"
            target = f"{sign} {self.target:g}{suffix}"
        cpu = f"{self.cpu_us_per_job:,.0f} us" if self.cpu_us_per_job else "-"
        return (self.scenario, value, baseline, ratio, target, self.verdict, cpu)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "verdict": self.verdict}


@dataclass
class Section:
    """A scenario's rows, and everything measured for its JSON."""

    name: str
    rows: list[Row]
    data: dict[str, Any]


def table(rows: list[Row]) -> str:
    lines = [HEADERS, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": psutil.cpu_count(),
        "load_avg": psutil.getloadavg(),
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """``bench/results/<name>-<time>.json``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    document = _plain({"machine": machine(), **payload})
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    return path


def _plain(value: Any) -> Any:
    """Rows and runs as their summaries (orjson would dump dataclasses field by field)."""
    if isinstance(value, Row):
        return value.as_dict()
    if hasattr(value, "summary"):
        return value.summary()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return value
