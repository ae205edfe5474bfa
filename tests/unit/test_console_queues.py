"""The queues the console watches: every lane's request, delay and dead-letter queues."""

from __future__ import annotations

from worker.amqp.topology import DELAY_TIERS
from worker.console.broker import lane_queues
from worker.settings import Settings


def test_one_lane_uses_the_configured_dead_letter_queue() -> None:
    settings = Settings(_env_file=None, request_queue="jobs", dead_letter_queue="jobs.dead")  # type: ignore[call-arg]
    queues = lane_queues(settings)
    assert [(q.kind, q.name) for q in queues] == [
        ("requests", "jobs"),
        *[("delay", f"jobs.delay.quorum.{s}s") for s in DELAY_TIERS],  # quorum by default (§13)
        ("dead letters", "jobs.dead"),
    ]
    assert {q.lane for q in queues} == {"jobs"}


def test_several_lanes_each_have_their_own_queues() -> None:
    settings = Settings(_env_file=None, request_queue="chat.interactive:4,chat.batch")  # type: ignore[call-arg]
    queues = lane_queues(settings)
    dead = [(q.lane, q.name) for q in queues if q.kind == "dead letters"]
    assert dead == [
        ("chat.interactive", "chat.interactive.dlq"),
        ("chat.batch", "chat.batch.dlq"),
    ]
    requests = [q.name for q in queues if q.kind == "requests"]
    assert requests == ["chat.interactive", "chat.batch"]
    assert len([q for q in queues if q.kind == "delay"]) == 2 * len(DELAY_TIERS)
    assert len({q.name for q in queues}) == len(queues)
