"""Where a job's deltas and result go (worker/amqp/deltas.py's ReplyRoutes)."""

from __future__ import annotations

from support.jobs_envelope import make_envelope

from worker.amqp.deltas import ReplyRoutes


def test_reply_routes_give_up_a_refusing_reply_to_for_the_rest_of_the_job_only() -> None:
    routes = ReplyRoutes()
    first, other = make_envelope(), make_envelope(job_id="job-2")
    assert routes.reply_to(first) == "replies"
    routes.give_up(first)
    assert routes.reply_to(first) is None  # later messages of job-1 go to the exchange
    assert routes.reply_to(other) == "replies"
    routes.forget(first)  # the job is over: a new delivery starts clean
    assert routes.reply_to(first) == "replies"
    assert routes.reply_to(make_envelope(reply_to=None)) is None
