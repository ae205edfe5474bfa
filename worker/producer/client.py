"""The producer side: submit jobs, await their results, stream their deltas.

Its exceptions (:mod:`worker.producer.exceptions`) and :class:`StreamText`
(:mod:`worker.producer.streamtext`) are importable from here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Annotated, Any, Self

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from opentelemetry import propagate, trace
from pydantic import Field, TypeAdapter, ValidationError

from worker.amqp.connect import BrokerRefused, NoNodeAnswers, connect_any
from worker.amqp.topology import H_DEADLINE, H_JOB_ID, TYPE_DELTA
from worker.messages import ChatCompletionRequest, EmbeddingsRequest, Endpoint, JobDelta, JobResult
from worker.producer.exceptions import (
    BrokerUnreachable,
    ChatClientError,
    ConnectionLost,
    JobFailed,
    JobTimeout,
    PublishFailed,
    UnreadableResult,
)
from worker.producer.streamtext import StreamText
from worker.settings import Settings, load_settings

__all__ = [
    "BrokerUnreachable",
    "ChatClient",
    "ChatClientError",
    "ConnectionLost",
    "JobFailed",
    "JobTimeout",
    "PublishFailed",
    "Reply",
    "StreamText",
    "UnreadableResult",
]

#: seconds :meth:`ChatClient.complete`, :meth:`ChatClient.embed` and
#: :meth:`ChatClient.stream` wait by default
DEFAULT_TIMEOUT = 600.0
BATCH_URL = "/v1/chat/completions"
BATCH_URLS: dict[Endpoint, str] = {"chat": BATCH_URL, "embeddings": "/v1/embeddings"}

ChatBody = Mapping[str, Any] | ChatCompletionRequest
"""A chat-completion request: a plain mapping, or the validated model."""
EmbeddingsBody = Mapping[str, Any] | EmbeddingsRequest
"""An embeddings request (contract §18): a plain mapping, or the validated model."""
Reply = JobDelta | JobResult
_REPLY: TypeAdapter[Reply] = TypeAdapter(Annotated[Reply, Field(discriminator="type")])


@dataclass(slots=True)
class _Waiter:
    deltas: bool
    replies: asyncio.Queue[Reply | ChatClientError] = field(default_factory=asyncio.Queue)


class ChatClient:
    """Publishes jobs to the request queue; results come back on one private reply queue.

    ``async with ChatClient.connect(url) as client`` opens (and closes) its own connection;
    ``async with ChatClient(connection)`` borrows one. Queue names default to the settings'
    (``WORKER_*`` variables), so a producer sharing the workers' environment needs none;
    with several lanes (§12) the default is the first one, and ``request_queue`` names
    another lane's queue.

    ``tenant_from_connection=True`` sets each job's AMQP ``user_id`` to the connection's
    user: RabbitMQ checks it, and the workers report it as the job's tenant.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        settings: Settings | None = None,
        request_queue: str | None = None,
        tenant_from_connection: bool = False,
    ) -> None:
        self.connection = connection
        self.request_queue = request_queue or (settings or load_settings()).lanes[0].queue
        self.user_id = connection_user(connection) if tenant_from_connection else None
        self._channel: AbstractChannel | None = None
        self._replies: AbstractQueue | None = None
        self._replies_lock = asyncio.Lock()
        self._waiters: dict[str, _Waiter] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        request_queue: str | None = None,
        tenant_from_connection: bool = False,
    ) -> AsyncIterator[Self]:
        """A client on a connection of its own to ``url`` (default ``WORKER_AMQP_URL``; a
        comma-separated list names nodes of one cluster, tried in a random order)."""
        if url is None:
            settings = settings or load_settings()
            url = settings.amqp_url.get_secret_value()
        try:
            connection = await connect_any(url, name=f"chat-worker client {os.getpid()}")
        except (NoNodeAnswers, BrokerRefused) as exc:
            raise BrokerUnreachable(str(exc)) from exc
        try:
            async with cls(
                connection,
                settings=settings,
                request_queue=request_queue,
                tenant_from_connection=tenant_from_connection,
            ) as client:
                yield client
        finally:
            await connection.close()

    async def __aenter__(self) -> Self:
        self._channel = await self.connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._fail_waiters(ConnectionLost("the client was closed"))
        for channel in (self._replies.channel if self._replies else None, self._channel):
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()
        self._channel = self._replies = None

    # --- publishing --------------------------------------------------------------------

    async def submit(
        self,
        body: ChatBody | EmbeddingsBody,
        *,
        custom_id: str | None = None,
        reply_to: str | None = None,
        deadline: datetime | None = None,
        priority: int | None = None,
        job_id: str | None = None,
        endpoint: Endpoint | None = None,
    ) -> str:
        """Publish one job (persistent, confirmed by the broker); returns its job id.

        Without ``reply_to`` its result goes to the result exchange (contract §4).
        ``endpoint`` says what ``body`` is: a chat completion, or ``"embeddings"``; by
        default an :class:`EmbeddingsRequest` is embeddings and anything else chat.
        """
        return await self.submit_line(
            _batch_line(body, custom_id, endpoint),
            reply_to=reply_to,
            deadline=deadline,
            priority=priority,
            job_id=job_id,
        )

    async def submit_line(
        self,
        line: bytes,
        *,
        reply_to: str | None = None,
        deadline: datetime | None = None,
        priority: int | None = None,
        job_id: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Publish one Batch input line exactly as given (it is not checked here)."""
        if self._channel is None:
            raise RuntimeError("use the client inside `async with`")
        job_id = job_id or uuid.uuid4().hex
        headers: dict[str, Any] = {}
        if deadline is not None:
            if deadline.tzinfo is None:
                raise ValueError("deadline must be an aware datetime (with a time zone)")
            headers[H_DEADLINE] = deadline.astimezone(UTC).isoformat()
        headers.update(trace_context())
        message = aio_pika.Message(
            line,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=datetime.now(UTC),  # the age of a job, and of its dead letter
            message_id=job_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            priority=priority,
            headers=headers or None,
            user_id=self.user_id,
        )
        try:
            # mandatory: a request queue that does not exist fails here, not silently.
            await self._channel.default_exchange.publish(
                message, self.request_queue, mandatory=True
            )
        except aiormq.exceptions.PublishError as exc:
            raise PublishFailed(f"no queue {self.request_queue!r} to take the job") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishFailed(f"the broker refused job {job_id}") from exc
        return job_id

    # --- request / reply -----------------------------------------------------------------

    async def complete(
        self,
        body: ChatBody,
        *,
        custom_id: str | None = None,
        deadline: datetime | None = None,
        priority: int | None = None,
        job_id: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (JobTimeout names the job)
        raise_on_error: bool = True,
    ) -> JobResult:
        """Submit a job and wait for its result (deltas of a streamed job are skipped).

        Raises :class:`JobTimeout` after ``timeout`` seconds (``None``: wait for ever) and,
        unless ``raise_on_error`` is false, :class:`JobFailed` for an error result.
        """
        line = _batch_line(body, custom_id, "chat")
        return await self._request_reply(line, job_id, deadline, priority, timeout, raise_on_error)

    async def embed(
        self,
        body: EmbeddingsBody,
        *,
        custom_id: str | None = None,
        deadline: datetime | None = None,
        priority: int | None = None,
        job_id: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (JobTimeout names the job)
        raise_on_error: bool = True,
    ) -> JobResult:
        """Submit an embeddings job (``url`` ``/v1/embeddings``, contract §18) and wait for
        its result: ``response.body`` is the upstream's list of embeddings.

        Timeouts and errors as in :meth:`complete`.
        """
        line = _batch_line(body, custom_id, "embeddings")
        return await self._request_reply(line, job_id, deadline, priority, timeout, raise_on_error)

    async def _request_reply(
        self,
        line: bytes,
        job_id: str | None,
        deadline: datetime | None,
        priority: int | None,
        timeout: float | None,  # noqa: ASYNC109 (JobTimeout names the job)
        raise_on_error: bool,
    ) -> JobResult:
        job_id = job_id or uuid.uuid4().hex
        async with self._waiting(deltas=False) as (correlation_id, waiter):
            try:
                async with asyncio.timeout(timeout):
                    await self._send(line, job_id, correlation_id, deadline, priority)
                    reply = await waiter.replies.get()
            except TimeoutError:
                raise JobTimeout(job_id, timeout or 0) from None
        return _settled(reply, raise_on_error)

    async def stream(
        self,
        body: ChatBody,
        *,
        custom_id: str | None = None,
        deadline: datetime | None = None,
        priority: int | None = None,
        job_id: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (JobTimeout names the job)
        raise_on_error: bool = True,
    ) -> AsyncIterator[Reply]:
        """Submit a job with ``stream: true``; yield its deltas, then its result.

        A delta whose ``attempt`` is higher than the last one's means the worker retried:
        drop the partial text of earlier attempts (:class:`StreamText` does). ``timeout``
        bounds the whole job; errors are raised as in :meth:`complete`.
        """
        line = _batch_line({**_payload(body), "stream": True}, custom_id, "chat")
        job_id = job_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        until = None if timeout is None else loop.time() + timeout
        async with self._waiting(deltas=True) as (correlation_id, waiter):
            try:
                async with asyncio.timeout_at(until):
                    await self._send(line, job_id, correlation_id, deadline, priority)
                while True:
                    # The timeout must not span a `yield`: it would cancel the consumer.
                    async with asyncio.timeout_at(until):
                        reply = await waiter.replies.get()
                    if isinstance(reply, JobDelta):
                        yield reply
                        continue
                    yield _settled(reply, raise_on_error)
                    return
            except TimeoutError:
                raise JobTimeout(job_id, timeout or 0) from None

    async def _send(
        self,
        line: bytes,
        job_id: str,
        correlation_id: str,
        deadline: datetime | None,
        priority: int | None,
    ) -> None:
        reply_to = await self._reply_queue()
        await self.submit_line(
            line,
            reply_to=reply_to,
            deadline=deadline,
            priority=priority,
            job_id=job_id,
            correlation_id=correlation_id,
        )

    @contextlib.asynccontextmanager
    async def _waiting(self, *, deltas: bool) -> AsyncIterator[tuple[str, _Waiter]]:
        correlation_id = uuid.uuid4().hex
        waiter = self._waiters[correlation_id] = _Waiter(deltas)
        try:
            yield correlation_id, waiter
        finally:
            self._waiters.pop(correlation_id, None)

    async def _reply_queue(self) -> str:
        """The client's exclusive reply queue, declared and consumed on first use."""
        async with self._replies_lock:
            if self._replies is None:
                channel = await self.connection.channel(publisher_confirms=False)
                channel.close_callbacks.add(self._on_close)
                queue = await channel.declare_queue(exclusive=True, auto_delete=True)
                await queue.consume(self._on_reply, no_ack=True)
                self._replies = queue
            return self._replies.name

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiter = self._waiters.get(message.correlation_id or "")
        if waiter is None:
            return  # a late reply: its caller timed out or stopped listening
        try:
            reply = _REPLY.validate_json(message.body)
        except ValidationError as exc:
            if message.type == TYPE_DELTA:
                return  # a partial output that cannot be read: the result still comes
            self._waiters.pop(message.correlation_id or "", None)
            job_id = message.headers.get(H_JOB_ID) if message.headers else None
            waiter.replies.put_nowait(
                UnreadableResult(
                    None if job_id is None else str(job_id), _first_problem(exc), message.body
                )
            )
            return
        if isinstance(reply, JobResult):
            # The result is the job's last message: nothing more comes for this id.
            self._waiters.pop(message.correlation_id or "", None)
            waiter.replies.put_nowait(reply)
        elif waiter.deltas:
            waiter.replies.put_nowait(reply)

    def _on_close(self, _: object, exc: BaseException | None = None) -> None:
        self._replies = None
        self._fail_waiters(ConnectionLost(f"the reply channel closed: {exc!r}"))

    def _fail_waiters(self, error: ChatClientError) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.replies.put_nowait(error)


def trace_context() -> dict[str, str]:
    """The W3C trace context headers of a publish: the current span's, else a new trace of
    its own (``traceparent`` version 00, sampled), so that the worker's spans of every job
    belong to a trace the producer can name."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(carrier)
    if "traceparent" not in carrier:
        trace_id = span_id = "0"
        while not int(trace_id, 16):  # all zeros is invalid (W3C); once in 2^128
            trace_id = secrets.token_hex(16)
        while not int(span_id, 16):
            span_id = secrets.token_hex(8)
        carrier = {"traceparent": f"00-{trace_id}-{span_id}-01"}
    return carrier


def connection_user(connection: AbstractConnection) -> str:
    """The user a connection logged in as (AMQP's default, ``guest``, when the URL has none)."""
    url = getattr(connection, "url", None)
    return (url.user if url is not None else None) or "guest"


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(str(part) for part in error['loc']) or 'message'}: {error['msg']}"


def _payload(body: ChatBody | EmbeddingsBody) -> dict[str, Any]:
    if isinstance(body, ChatCompletionRequest | EmbeddingsRequest):
        return body.model_dump(mode="json", exclude_unset=True)
    return dict(body)


def _batch_line(
    body: ChatBody | EmbeddingsBody, custom_id: str | None, endpoint: Endpoint | None
) -> bytes:
    if endpoint is None:
        endpoint = "embeddings" if isinstance(body, EmbeddingsRequest) else "chat"
    url = BATCH_URLS[endpoint]
    line: dict[str, Any] = {"method": "POST", "url": url, "body": _payload(body)}
    if custom_id is not None:
        line = {"custom_id": custom_id, **line}
    return orjson.dumps(line)


def _settled(reply: Reply | ChatClientError, raise_on_error: bool) -> JobResult:
    if isinstance(reply, ChatClientError):
        raise reply
    assert isinstance(reply, JobResult)
    if raise_on_error and reply.error is not None:
        raise JobFailed(reply)
    return reply
