"""Where a job's deltas and result go (worker/amqp/deltas.py's ReplyRoutes)."""

from __future__ import annotations

from worker.amqp.deltas import ReplyRoutes
from worker.job import Envelope


def envelope(**fields: object) -> Envelope:
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


def test_reply_routes_give_up_a_refusing_reply_to_for_the_rest_of_the_job_only() -> None:
    routes = ReplyRoutes()
    first, other = envelope(), envelope(job_id="job-2")
    assert routes.reply_to(first) == "replies"
    routes.give_up(first)
    assert routes.reply_to(first) is None  # later messages of job-1 go to the exchange
    assert routes.reply_to(other) == "replies"
    routes.forget(first)  # the job is over: a new delivery starts clean
    assert routes.reply_to(first) == "replies"
    assert routes.reply_to(envelope(reply_to=None)) is None
