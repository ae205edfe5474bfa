"""Reach RabbitMQ: one node of a list (§13), or, for the demo and tests, a throwaway one.

Two ways to fail, told apart: :class:`NoNodeAnswers` (no node could be reached, or one
closed the door for a while: retry) and :class:`BrokerRefused` (a node answered and
refused for good: a wrong user name or password, a vhost that does not exist or that the
user may not use; the nodes of one cluster share their users and vhosts, so no other node
and no retry makes it pass). Both say why in words, never with the password.
"""

from __future__ import annotations

import random
import socket
import ssl
from collections.abc import Sequence

import aio_pika
import aiormq
import structlog
import yarl
from aio_pika.abc import AbstractConnection
from pamqp import commands

__all__ = [
    "BrokerRefused",
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


class BrokerRefused(ConnectionError):
    """A node answered and refused for good (credentials, vhost): say so and stop."""


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
            refusal = _refusal(url, exc)
            if refusal is not None:
                raise BrokerRefused(f"{refusal} ({redact(url)})") from None
            problems.append(f"{redact(url)}: {_why(exc, wait)}")
            if log_failures and len(nodes) > 1:
                log.warning(
                    "broker node unavailable; trying the next",
                    node=redact(url),
                    error=_why(exc, wait),
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


def _close_frame(exc: BaseException) -> commands.Connection.Close | None:
    """The ``Connection.Close`` a broker sent in place of ``Connection.OpenOk``.

    aiormq reports it as an ``InvalidFrameError`` whose text shows only the frame's type,
    not the broker's reason; the frame is still a local of the function that raised, in
    the exception's traceback."""
    traceback = exc.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame.f_locals.get("frame")
        if isinstance(frame, commands.Connection.Close):
            return frame
        traceback = traceback.tb_next
    return None


def _closed_with(exc: BaseException) -> tuple[int | None, str] | None:
    """(reply code, reply text) of a broker's refusal at connection time, if it was one."""
    if isinstance(exc, aiormq.exceptions.ConnectionClosed) and len(exc.args) >= 2:
        return exc.args[0], str(exc.args[1])
    if (
        isinstance(exc, aiormq.exceptions.InvalidFrameError)
        and (frame := _close_frame(exc)) is not None
    ):
        return frame.reply_code, str(frame.reply_text or "")
    return None


def _refusal(url: str, exc: BaseException) -> str | None:
    """Why the broker refused for good, in words; None when a retry may pass."""
    parsed = yarl.URL(url)
    user = parsed.user or "guest"
    vhost = parsed.path[1:] or "/"
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return (
            f"access refused for user {user!r}: wrong user name or password, or the user "
            "may not log in from here (the broker's log says which)"
        )
    if isinstance(exc, aiormq.exceptions.AuthenticationError):
        return f"the broker offers no login mechanism this client speaks: {exc}"
    closed = _closed_with(exc)
    if closed is None:
        return None
    _, text = closed
    if "not found" in text:
        return f"vhost {vhost!r} does not exist"
    if "refused for user" in text and "is down" not in text:
        return f"user {user!r} may not use vhost {vhost!r}"
    return None  # "vhost is down" while a node starts, a forced close: may pass


def _why(exc: BaseException, wait: float) -> str:
    """A connection failure in a few words (no password: URLs are redacted by the caller)."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    closed = _closed_with(exc)
    if closed is not None:
        return f"the broker closed the connection: {closed[1] or closed[0]}"
    if isinstance(exc, TimeoutError) and not isinstance(cause, ssl.SSLError):
        return f"no answer within {wait:g}s"
    if isinstance(cause, socket.gaierror):
        return f"host not found ({cause.strerror})"
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {getattr(cause, 'reason', None) or cause}"
    code = getattr(cause, "errno", None) or (exc.args[0] if exc.args else None)
    if code == 111 or isinstance(cause, ConnectionRefusedError):
        return "connection refused (is RabbitMQ running on that port?)"
    if isinstance(exc, aiormq.exceptions.IncompatibleProtocolError):
        return "the server there does not speak AMQP 0-9-1"
    return f"{type(exc).__name__}: {exc}"
