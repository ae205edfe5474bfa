"""What the producer client raises about a job: one tree under ``ChatClientError``.

ChatClientError
├── BrokerUnreachable  no broker node answered, or one refused (credentials, vhost)
├── PublishFailed      the broker refused the request or could not route it
├── ConnectionLost     the connection closed while a result was awaited
├── JobTimeout         no result in time (also a ``TimeoutError``)
├── JobFailed          the result is an error; carries it and its ``ErrorCode``
└── UnreadableResult   a result arrived for the job but is not a valid result document
"""

from __future__ import annotations

from worker.messages import ErrorCode, JobResult

__all__ = [
    "BrokerUnreachable",
    "ChatClientError",
    "ConnectionLost",
    "JobFailed",
    "JobTimeout",
    "PublishFailed",
    "UnreadableResult",
]


class ChatClientError(Exception):
    """Base of everything the client raises about a job."""


class BrokerUnreachable(ChatClientError, ConnectionError):
    """No broker node answered (``WORKER_AMQP_URL``), or one refused the connection for
    good (a wrong password, a vhost that does not exist); the message says which."""


class PublishFailed(ChatClientError):
    """The broker nacked the request, or no queue was bound to its routing key."""


class ConnectionLost(ChatClientError):
    """The broker connection closed while a result was awaited: the job may still finish."""


class JobTimeout(ChatClientError, TimeoutError):
    """No result arrived in time. The job is not cancelled: a worker may still run it."""

    def __init__(self, job_id: str, timeout: float) -> None:
        super().__init__(f"no result for job {job_id} within {timeout:g}s")
        self.job_id = job_id
        self.timeout = timeout


class JobFailed(ChatClientError):
    """The job's result is an error (contract §6); ``result`` is the whole result."""

    def __init__(self, result: JobResult) -> None:
        assert result.error is not None
        super().__init__(f"job {result.id} failed: {result.error.code}: {result.error.message}")
        self.result = result
        self.code: ErrorCode = result.error.code


class UnreadableResult(ChatClientError):
    """A message that should be the job's result does not read as one: reported for the
    job rather than ignored (waiting on would only end in :class:`JobTimeout`)."""

    def __init__(self, job_id: str | None, problem: str, body: bytes) -> None:
        super().__init__(f"the result of job {job_id} cannot be read: {problem}")
        self.job_id = job_id
        self.problem = problem
        self.body = body  # the raw message, for whoever can make sense of it
