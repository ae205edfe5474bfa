"""Several broker URLs (§13): the order nodes are tried in, and URLs fit for a log."""

from __future__ import annotations

import random

import pytest

from worker.amqp.connect import Nodes, NoNodeAnswers, broker_user, connect_any, redact

URLS = [f"amqp://u:secret@node{n}:5672/" for n in range(1, 4)]


def test_redact_drops_the_password_and_keeps_the_rest() -> None:
    assert redact("amqp://guest:s3cret@rabbit:5672/vhost") == "amqp://guest@rabbit:5672/vhost"
    assert redact("amqps://rabbit/") == "amqps://rabbit/"


def test_each_process_tries_the_nodes_in_an_order_of_its_own() -> None:
    orders = {tuple(Nodes(URLS, random.Random(seed)).order()) for seed in range(50)}
    assert len(orders) > 1, "replicas spread over the nodes"
    assert all(sorted(order) == sorted(URLS) for order in orders), "every node is tried"


def test_after_a_loss_the_next_node_is_tried_first_and_the_lost_one_last() -> None:
    nodes = Nodes(URLS, random.Random(7))
    first = nodes.order()
    nodes.used(first[0])
    assert nodes.current == first[0]
    assert nodes.order() == [*first[1:], first[0]]
    nodes.used(first[2])
    assert nodes.order() == [first[0], first[1], first[2]]


def test_nodes_need_at_least_one_url() -> None:
    with pytest.raises(ValueError, match="no broker URL"):
        Nodes([])


async def test_no_node_answering_says_why_for_each_without_a_password() -> None:
    urls = "amqp://u:hunter2@127.0.0.1:1/, amqp://u:hunter2@127.0.0.1:2/"
    with pytest.raises(NoNodeAnswers) as caught:
        await connect_any(urls, name="test", wait=2)
    message = str(caught.value)
    assert "127.0.0.1:1" in message and "127.0.0.1:2" in message
    assert "hunter2" not in message


def test_item7_the_broker_user_a_url_logs_in_as() -> None:
    assert broker_user("amqp://worker:pw@rabbit:5672/") == "worker"
    assert broker_user("amqp://rabbit/") == "guest", "aiormq's default login"
    assert broker_user("amqps://rabbit/?auth=external") is None, "the certificate decides"
