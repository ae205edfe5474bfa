"""A Batch run's files: the input lines read as jobs, the output and its journal read on
``--resume``, and the names derived from the output's path."""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from pydantic import ValidationError

from worker.messages import BatchRequest

__all__ = [
    "JOB_ID_BYTES",
    "REPLY_QUEUE_PREFIX",
    "UNREADABLE_RESULT",
    "Earlier",
    "OutputExists",
    "Start",
    "default_output",
    "digest",
    "job_id_for",
    "job_line",
    "journal_path",
    "prepare",
    "reply_queue_name",
]

REPLY_QUEUE_PREFIX = "chat.submit."
JOB_ID_BYTES = 16


class OutputExists(Exception):
    """The output file has lines and ``--resume`` was not given."""


#: ``error.code`` of an output line whose result arrived but does not read as a result
UNREADABLE_RESULT = "unreadable_result"


def default_output(source: Path) -> Path:
    """``FILE.jsonl`` → ``FILE.out.jsonl``, next to the input."""
    stem = source.name.removesuffix(".jsonl")
    return source.with_name(f"{stem}.out.jsonl")


def reply_queue_name(output: Path) -> str:
    """The run's durable reply queue: ``chat.submit.<hash of the absolute output path>``."""
    return REPLY_QUEUE_PREFIX + digest(str(output.resolve()), 8)


def job_id_for(output: Path, custom_id: str) -> str:
    """The same job id for the same line of the same output, in every run."""
    return digest(f"{output.resolve()}\0{custom_id}", JOB_ID_BYTES)


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".published")


def digest(text: str, size: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


@dataclass(slots=True)
class Earlier:
    """What an existing output file already holds."""

    done: set[str] = field(default_factory=set)  # custom_ids with a job's result
    jobless: Counter[str] = field(default_factory=Counter)  # lines that never became a job
    failed: int = 0


def _read_output(path: Path) -> Earlier:
    """Read ``path``; cut a last line a crash left half-written."""
    earlier = Earlier()
    if not path.exists():
        return earlier
    complete = 0
    with path.open("rb+") as lines:
        for line in lines:
            if not line.endswith(b"\n"):
                break
            complete += len(line)
            try:
                document = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            custom_id = document.get("custom_id") if isinstance(document, dict) else None
            if not isinstance(custom_id, str):
                continue
            if document.get("id") is None:
                earlier.jobless[custom_id] += 1
            else:
                earlier.done.add(custom_id)
            earlier.failed += document.get("error") is not None
        lines.truncate(complete)
    return earlier


def _read_journal(path: Path) -> set[str]:
    published: set[str] = set()
    if path.exists():
        with path.open("rb") as lines:
            for line in lines:
                with contextlib.suppress(orjson.JSONDecodeError):
                    custom_id = orjson.loads(line)
                    if isinstance(custom_id, str):
                        published.add(custom_id)
    return published


def _count_lines(path: Path) -> int:
    with path.open("rb") as lines:
        return sum(1 for line in lines if line.strip())


def job_line(raw: bytes, number: int) -> tuple[str, bytes | None, str | None]:
    """``(custom_id, the bytes to publish, None)``, or ``(custom_id, None, why not)``."""
    custom_id = f"line-{number}"
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return custom_id, None, f"not JSON: {exc}"
    if not isinstance(document, dict):
        return custom_id, None, "not a JSON object"
    given = document.get("custom_id")
    if isinstance(given, str):
        custom_id = given
    try:
        BatchRequest.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "line"
        return custom_id, None, f"{where}: {error['msg']}"
    if given is None:
        # The result must name its line: give the job the custom_id the output will show.
        return custom_id, orjson.dumps({**document, "custom_id": custom_id}), None
    return custom_id, raw.strip(), None


@dataclass(slots=True)
class Start:
    output: Path
    journal: Path
    fresh: bool
    earlier: Earlier
    outstanding: set[str]
    total: int


def prepare(source: Path, output: Path, resume: bool) -> Start:
    """Everything a run needs from the disk before it starts."""
    output = output.resolve()
    journal = journal_path(output)
    if not resume and output.exists() and output.stat().st_size > 0:
        raise OutputExists(f"{output} exists: pass --resume to continue it, or remove it")
    # The journal only means something next to the output it was written with.
    fresh = not resume or not output.exists()
    if fresh:
        journal.unlink(missing_ok=True)
    earlier = Earlier() if fresh else _read_output(output)
    outstanding = _read_journal(journal) - earlier.done
    return Start(output, journal, fresh, earlier, outstanding, _count_lines(source))
