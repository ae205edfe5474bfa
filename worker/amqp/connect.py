"""Reach RabbitMQ: one node of a list (§13), or, for the demo and tests, a throwaway one."""

from __future__ import annotations

import random
from collections.abc import Sequence

import aio_pika
import aiormq
import structlog
import yarl
from aio_pika.abc import AbstractConnection

__all__ = [
    "NoNodeAnswers",
    "Nodes",
    "broker_user",
    "connect_any",
    "reachable",
    "redact",
]

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT = 10.0


class NoNodeAnswers(ConnectionError):
    """None of the broker URLs accepted a connection; says why for each (no password)."""


def redact(url: str) -> str:
    """``url`` without its password, fit for a log line or an error message."""
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError):
        return "<unparseable broker URL>"
    if parsed.password is not None:
        parsed = parsed.with_password(None)
    return str(parsed)


def broker_user(url: str | yarl.URL) -> str | None:
    """The broker user a connection to ``url`` authenticates as, as aiormq logs in: the
    URL's user (``guest`` when none) with PLAIN; None when the broker decides (EXTERNAL:
    the user is the TLS certificate's)."""
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError):
        return None
    if parsed.query.get("auth", "plain").lower() != "plain":
        return None
    return parsed.user or "guest"


class Nodes:
    """The URLs of one cluster's nodes, tried in a random order of this process's own.

    Replicas each shuffle the list, so they spread over the nodes; after a loss the next
    attempt starts with the node after the one just used, so a dead node is tried last.
    """

    def __init__(self, urls: Sequence[str], rng: random.Random | None = None) -> None:
        if not urls:
            raise ValueError("no broker URL")
        self._urls = list(urls)
        (rng or random.Random()).shuffle(self._urls)
        self._start = 0
        self.current: str | None = None  # the URL last connected to

    def __len__(self) -> int:
        return len(self._urls)

    def order(self) -> list[str]:
        """The URLs to try now, in order."""
        return self._urls[self._start :] + self._urls[: self._start]

    def used(self, url: str) -> None:
        """``url`` answered: after its loss, start with the next one."""
        self.current = url
        self._start = (self._urls.index(url) + 1) % len(self._urls)


async def connect_any(
    nodes: Nodes | Sequence[str] | str,
    *,
    name: str,
    wait: float = CONNECT_TIMEOUT,
    log_failures: bool = False,
    heartbeat: int | None = None,
) -> AbstractConnection:
    """A connection to the first node of ``nodes`` that answers, named ``name``.

    ``nodes`` may be one URL or a comma-separated list, as in ``WORKER_AMQP_URL``. Raises
    :class:`NoNodeAnswers` when none answers. Silent unless ``log_failures`` (the worker's
    choice): the command-line tools' output is their own. ``heartbeat``: the AMQP
    heartbeat in seconds, unless a URL names its own (``?heartbeat=``).
    """
    if isinstance(nodes, str):
        nodes = [url.strip() for url in nodes.split(",") if url.strip()]
    if not isinstance(nodes, Nodes):
        nodes = Nodes(nodes)
    problems = []
    for url in nodes.order():
        target = url
        if heartbeat is not None and "heartbeat" not in yarl.URL(url).query:
            target = str(yarl.URL(url).update_query(heartbeat=heartbeat))
        try:
            connection = await aio_pika.connect(
                target, timeout=wait, client_properties={"connection_name": name}
            )
        except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
            problems.append(f"{redact(url)}: {type(exc).__name__}: {exc}")
            if log_failures and len(nodes) > 1:
                log.warning(
                    "broker node unavailable; trying the next",
                    node=redact(url),
                    error=type(exc).__name__,
                )
            continue
        nodes.used(url)
        return connection
    raise NoNodeAnswers("; ".join(problems))


async def reachable(urls: str | Sequence[str], wait: float = 5.0) -> str | None:
    """None when an AMQP connection to one of ``urls`` opens; else why not."""
    try:
        connection = await connect_any(urls, name="chat-worker probe", wait=wait)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await connection.close()
    return None
