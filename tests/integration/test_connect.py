"""Reaching the broker: permanent refusals said at once, passing troubles retried (§13)."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
import yarl
from support.process import free_port

from worker.amqp.connect import BrokerRefused, NoNodeAnswers, connect_any

SECRET = "not-the-password-3f9a"


def with_password(url: str, password: str) -> str:
    return str(yarl.URL(url).with_password(password))


def with_vhost(url: str, vhost: str) -> str:
    return str(yarl.URL(url).with_path("/" + vhost))


# Issue 27 item 3: a wrong password or a missing vhost is said at once, in words.


async def test_item3_a_wrong_password_is_refused_at_once(amqp_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(BrokerRefused) as caught:
        await connect_any(with_password(amqp_url, SECRET), name="test")
    assert time.monotonic() - started < 5
    user = yarl.URL(amqp_url).user
    assert str(caught.value).startswith(f"access refused for user {user!r}")
    assert SECRET not in str(caught.value)


async def test_item3_a_missing_vhost_is_refused_at_once(amqp_url: str) -> None:
    with pytest.raises(BrokerRefused) as caught:
        await connect_any(with_vhost(amqp_url, "nope"), name="test")
    assert str(caught.value).startswith("vhost 'nope' does not exist")
    assert "InvalidFrameError" not in str(caught.value)


async def test_item3_a_refusal_is_not_hidden_behind_a_node_that_is_down(amqp_url: str) -> None:
    """One node of the list down, the other refusing: the refusal is what is said."""
    down = str(yarl.URL(amqp_url).with_port(free_port()))
    with pytest.raises(BrokerRefused, match="does not exist"):
        await connect_any([down, with_vhost(amqp_url, "nope")], name="test")


async def test_item3_a_node_that_is_down_reads_plainly_and_stays_retryable() -> None:
    with pytest.raises(NoNodeAnswers) as caught:
        await connect_any(f"amqp://guest:{SECRET}@127.0.0.1:{free_port()}/", name="test")
    assert "connection refused" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (lambda url: with_password(url, SECRET), "access refused for user"),
        (lambda url: with_vhost(url, "nope"), "vhost 'nope' does not exist"),
    ],
    ids=["wrong-password", "missing-vhost"],
)
async def test_item3_run_says_it_at_once_and_exits(amqp_url: str, url: object, said: str) -> None:
    """Before, both were retried for a minute (service.RESUME_DEADLINE) and the missing
    vhost read `NoNodeAnswers("…: InvalidFrameError: Expected one of [...]")`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env |= {
        "WORKER_AMQP_URL": url(amqp_url),  # type: ignore[operator]
        "WORKER_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
        "WORKER_HTTP_PORT": "0",
        "OTEL_SDK_DISABLED": "true",
    }
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 1
    assert time.monotonic() - started < 20
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("chat-worker run: the broker refused the connection: ")
    assert said in lines[0] and SECRET not in lines[0]
