"""A job's envelope with test defaults, for unit tests of what is published."""

from __future__ import annotations

from worker.job import Envelope


def make_envelope(**fields: object) -> Envelope:
    """An envelope of job ``job-1`` of tenant ``team-a`` on ``chat.requests``, replying to
    ``replies``; ``fields`` replace any of it."""
    values: dict[str, object] = {
        "job_id": "job-1",
        "correlation_id": "corr-1",
        "reply_to": "replies",
        "reply_to_forbidden": False,
        "deadline": None,
        "bad_deadline": None,
        "prior_attempts": 0,
        "redeliveries": 0,
        "headers": {},
        "lane": "chat.requests",
        "tenant": "team-a",
    }
    values.update(fields)
    return Envelope(**values)  # type: ignore[arg-type]
