"""Queue names and arguments: quorum delay queues that survive a node (§13)."""

from __future__ import annotations

from worker.amqp.topology import DELAY_TIERS, delay_queue_name, delay_queues, queue_arguments
from worker.settings import Settings


def settings(**values: str) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_quorum_delay_queues_have_names_of_their_own() -> None:
    # Classic delay queues of earlier versions hold the old names: a declare with quorum
    # arguments under them would fail with 406.
    assert delay_queue_name("chat.requests", 30, "quorum") == "chat.requests.delay.quorum.30s"
    assert delay_queue_name("chat.requests", 30, "classic") == "chat.requests.delay.30s"
    assert delay_queues(settings(request_queue="q")) == [
        f"q.delay.quorum.{seconds}s" for seconds in DELAY_TIERS
    ]


def test_quorum_delay_queues_dead_letter_back_at_least_once() -> None:
    arguments = queue_arguments(settings(request_queue="q", queue_type="quorum"))
    delay = arguments["q.delay.quorum.30s"]
    assert delay == {
        "x-queue-type": "quorum",
        "x-message-ttl": 30_000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "q",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def test_every_queue_follows_the_queue_type_and_the_request_queue_comes_first() -> None:
    for queue_type in ("quorum", "classic"):
        arguments = queue_arguments(settings(request_queue="q", queue_type=queue_type))
        assert next(iter(arguments)) == "q"
        assert {args["x-queue-type"] for args in arguments.values()} == {queue_type}
        assert set(arguments) == {
            "q",
            "chat.requests.dlq",
            "chat.results",
            *delay_queues(settings(request_queue="q", queue_type=queue_type)),
        }


def test_classic_delay_queues_keep_their_arguments() -> None:
    arguments = queue_arguments(settings(request_queue="q", queue_type="classic"))
    assert "x-dead-letter-strategy" not in arguments["q.delay.5s"]
    assert arguments["q.delay.5s"]["x-message-ttl"] == 5000


def test_each_lane_has_its_own_quorum_delay_and_dead_letter_queues() -> None:
    arguments = queue_arguments(settings(request_queue="fast:4,slow"))
    assert list(arguments)[:2] == ["fast", "slow"], "the lanes, which consuming needs, first"
    assert arguments["slow.delay.quorum.30s"]["x-dead-letter-routing-key"] == "slow"
    assert arguments["fast.delay.quorum.30s"]["x-dead-letter-routing-key"] == "fast"
    assert arguments["slow"]["x-dead-letter-routing-key"] == "slow.dlq"
    assert delay_queues(settings(request_queue="fast:4,slow"), "slow")[0] == "slow.delay.quorum.1s"
