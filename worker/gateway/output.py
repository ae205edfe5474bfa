"""Batch output lines: a worker's result, or a line's end (cancelled, expired), as one
line of OpenAI's batch output format, with the counts the batch sums. No I/O."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "Outcome",
    "ended_outcome",
    "job_id",
    "outcome_from_result",
    "parse_job_id",
    "request_id",
]

#: ``error.code`` of a line whose result arrived but cannot be read
UNREADABLE_RESULT = "unreadable_result"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The end of one batch line: its output line and what it counts for."""

    batch_id: str
    line_no: int
    custom_id: str | None
    status: str  # ok | error
    code: str | None
    line: bytes  # JSON, without the newline
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float | None = None

    def row(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "line_no": self.line_no,
            "custom_id": self.custom_id,
            "status": self.status,
            "code": self.code,
            "line": self.line,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cost": self.cost,
        }


def job_id(batch_id: str, line_no: int) -> str:
    """The stable ``message_id`` of a batch line's job (also its ``correlation_id``)."""
    return f"{batch_id}:{line_no}"


def parse_job_id(value: Any) -> tuple[str, int] | None:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str) or not value.startswith("batch_"):
        return None
    batch_id, sep, line = value.rpartition(":")
    if not sep or not line.isdigit():
        return None
    return batch_id, int(line)


def request_id(batch_id: str, line_no: int) -> str:
    """The output line's ``id``: ``batch_req_…``, the same for every copy of the line."""
    digest = hashlib.blake2b(job_id(batch_id, line_no).encode(), digest_size=12).hexdigest()
    return f"batch_req_{digest}"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _usage_counts(usage: Any) -> tuple[int, int, int, int]:
    if not isinstance(usage, dict):
        return 0, 0, 0, 0
    prompt = usage.get("prompt_tokens_details")
    completion = usage.get("completion_tokens_details")
    cached = _int(prompt.get("cached_tokens")) if isinstance(prompt, dict) else 0
    reasoning = _int(completion.get("reasoning_tokens")) if isinstance(completion, dict) else 0
    return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")), cached, reasoning


def _cost(metadata: Any) -> float | None:
    cost = metadata.get("cost") if isinstance(metadata, dict) else None
    total = cost.get("total") if isinstance(cost, dict) else None
    if isinstance(total, int | float) and not isinstance(total, bool):
        return float(total)
    return None


def outcome_from_result(body: bytes, fallback_job_id: Any = None) -> Outcome | None:
    """The outcome a worker's result message (§4) gives its line; None when the message
    names no line of a batch (it is then dropped)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        where = parse_job_id(fallback_job_id)
        if where is None:
            return None
        return _unreadable(*where, None, "the result is not a JSON object")
    where = parse_job_id(document.get("id")) or parse_job_id(fallback_job_id)
    if where is None:
        return None
    batch_id, line_no = where
    custom_id = document.get("custom_id")
    custom_id = custom_id if isinstance(custom_id, str) else None
    response = document.get("response")
    response = response if isinstance(response, dict) else None
    error = document.get("error")
    if error is None and response is None:
        return _unreadable(
            batch_id, line_no, custom_id, "the result has neither response nor error"
        )
    inputs, outputs, cached, reasoning = _usage_counts(document.get("usage"))
    if error is not None:
        error = error if isinstance(error, dict) else {}
        code = str(error.get("code") or "upstream_error")
        shown: dict[str, Any] | None = {"code": code, "message": str(error.get("message") or "")}
    else:
        code, shown = None, None
    line = {
        "id": request_id(batch_id, line_no),
        "custom_id": custom_id,
        "response": None
        if response is None
        else {
            "status_code": response.get("status_code"),
            "request_id": response.get("request_id"),
            "body": response.get("body"),
        },
        "error": shown,
    }
    return Outcome(
        batch_id=batch_id,
        line_no=line_no,
        custom_id=custom_id,
        status="ok" if shown is None else "error",
        code=code,
        line=orjson.dumps(line),
        input_tokens=inputs,
        output_tokens=outputs,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        cost=_cost(document.get("metadata")),
    )


def _unreadable(batch_id: str, line_no: int, custom_id: str | None, message: str) -> Outcome:
    return ended_outcome(batch_id, line_no, custom_id, UNREADABLE_RESULT, message)


def ended_outcome(
    batch_id: str, line_no: int, custom_id: str | None, code: str, message: str
) -> Outcome:
    """A line that ends without a result of its own (``cancelled``, ``expired``)."""
    line = {
        "id": request_id(batch_id, line_no),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return Outcome(batch_id, line_no, custom_id, "error", code, orjson.dumps(line))


def custom_id_of(raw: bytes) -> str | None:
    """The ``custom_id`` of a (validated) input line."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    value = document.get("custom_id") if isinstance(document, dict) else None
    return value if isinstance(value, str) else None
