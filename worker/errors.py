"""Why a job failed: one exception per error code, retryable or not by class.

JobError
├── PermanentError                  (never retried)
│   ├── InvalidMessage              invalid_message
│   ├── InvalidRequest              invalid_request       (also upstream 400/422)
│   ├── ModelNotAllowed             model_not_allowed
│   ├── ForbiddenReplyTo            forbidden_reply_to
│   ├── AuthenticationFailed        authentication_error  (upstream 401/403)
│   ├── NotFound                    not_found             (upstream 404)
│   ├── Expired                     expired
│   ├── BudgetExceeded              budget_exceeded       (the tenant's spending limit, §17)
│   └── Cancelled                   cancelled             (the job's batch was cancelled, §15)
└── RetryableError                  (retried with backoff, then final)
    ├── BudgetError                 (waits for budget, not an attempt: contract §11)
    │   ├── RateLimited             rate_limited          (upstream 429)
    │   └── QuotaExceeded           quota_exceeded        (429 insufficient_quota)
    ├── UpstreamError               upstream_error        (5xx, 408, 409, connection, malformed)
    └── UpstreamTimeout             timeout
"""

from __future__ import annotations

from typing import Any, ClassVar

from worker.messages import ErrorCode, ErrorInfo

__all__ = [
    "AuthenticationFailed",
    "BudgetError",
    "BudgetExceeded",
    "Cancelled",
    "Expired",
    "ForbiddenReplyTo",
    "InvalidMessage",
    "InvalidRequest",
    "JobError",
    "ModelNotAllowed",
    "NotFound",
    "PermanentError",
    "QuotaExceeded",
    "RateLimited",
    "RetryableError",
    "UpstreamError",
    "UpstreamTimeout",
    "error_for_code",
    "error_for_status",
]


class JobError(Exception):
    """A job ends (or this attempt ends) with ``code``; ``response`` is the upstream's error."""

    code: ClassVar[ErrorCode]
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        response: dict[str, Any] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        cause: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.response = response
        self.request_id = request_id
        #: seconds the upstream asked us to wait before the next attempt
        self.retry_after = retry_after
        #: why, in a few words of the worker's own (never the upstream's text, which may
        #: quote a key): "connection refused by host:443", "DNS: ...", "status 503"
        self.cause = cause or (f"status {status_code}" if status_code is not None else None)

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, message=self.message, status_code=self.status_code)


class PermanentError(JobError):
    retryable = False


class RetryableError(JobError):
    retryable = True


class InvalidMessage(PermanentError):
    code = ErrorCode.INVALID_MESSAGE


class InvalidRequest(PermanentError):
    code = ErrorCode.INVALID_REQUEST


class ModelNotAllowed(PermanentError):
    code = ErrorCode.MODEL_NOT_ALLOWED


class ForbiddenReplyTo(PermanentError):
    code = ErrorCode.FORBIDDEN_REPLY_TO


class AuthenticationFailed(PermanentError):
    code = ErrorCode.AUTHENTICATION_ERROR


class NotFound(PermanentError):
    code = ErrorCode.NOT_FOUND


class Expired(PermanentError):
    code = ErrorCode.EXPIRED


class BudgetExceeded(PermanentError):
    code = ErrorCode.BUDGET_EXCEEDED


class Cancelled(PermanentError):
    code = ErrorCode.CANCELLED


class BudgetError(RetryableError):
    """The upstream refused the call for budget: the job waits for it (§11), and the
    refused call does not count toward WORKER_MAX_ATTEMPTS."""


class RateLimited(BudgetError):
    code = ErrorCode.RATE_LIMITED


class QuotaExceeded(BudgetError):
    code = ErrorCode.QUOTA_EXCEEDED


class UpstreamError(RetryableError):
    code = ErrorCode.UPSTREAM_ERROR


class UpstreamTimeout(RetryableError):
    code = ErrorCode.TIMEOUT


_BY_STATUS: dict[int, type[JobError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: AuthenticationFailed,
    404: NotFound,
    408: UpstreamError,
    409: UpstreamError,
    422: InvalidRequest,
    429: RateLimited,
}


def error_for_status(status_code: int) -> type[JobError]:
    """The error class for a non-2xx upstream status (contract §6)."""
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    # Other 4xx are the request's fault; 5xx and anything odd may pass on a retry.
    return InvalidRequest if 400 <= status_code < 500 else UpstreamError


def _leaves(cls: type[JobError]) -> list[type[JobError]]:
    found = [cls] if "code" in cls.__dict__ else []
    for sub in cls.__subclasses__():
        found += _leaves(sub)
    return found


_BY_CODE: dict[ErrorCode, type[JobError]] = {cls.code: cls for cls in _leaves(JobError)}


def error_for_code(code: str | None, message: str, status_code: int | None = None) -> JobError:
    """The error a result document names (a stored result read back, §16)."""
    try:
        cls = _BY_CODE[ErrorCode(code or "")]
    except ValueError:
        cls = UpstreamError
    return cls(message, status_code=status_code)
