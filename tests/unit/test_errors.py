"""The error hierarchy: one class per error code, retryable by class, status mapping."""

from __future__ import annotations

import pytest

from worker.errors import (
    AuthenticationFailed,
    Expired,
    ForbiddenReplyTo,
    InvalidMessage,
    InvalidRequest,
    JobError,
    ModelNotAllowed,
    NotFound,
    PermanentError,
    RateLimited,
    RetryableError,
    UpstreamError,
    UpstreamTimeout,
    error_for_status,
)
from worker.messages import ErrorCode, ErrorInfo

# Contract §6, column "retried".
# quota_exceeded, like rate_limited, waits for budget rather than failing at once (§11).
RETRIED = {
    ErrorCode.RATE_LIMITED,
    ErrorCode.QUOTA_EXCEEDED,
    ErrorCode.UPSTREAM_ERROR,
    ErrorCode.TIMEOUT,
}


def _subclasses(cls: type[JobError]) -> list[type[JobError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def _concrete() -> list[type[JobError]]:
    """The classes that name an error code themselves (not inherited)."""
    return [cls for cls in _subclasses(JobError) if "code" in vars(cls)]


def test_every_error_code_has_exactly_one_class() -> None:
    codes = [cls.code for cls in _concrete()]
    assert sorted(codes) == sorted(ErrorCode)
    assert len(codes) == len(set(codes))


def test_contract_error_codes() -> None:
    assert {code.value for code in ErrorCode} == {
        "invalid_message",
        "invalid_request",
        "model_not_allowed",
        "forbidden_reply_to",
        "authentication_error",
        "not_found",
        "expired",
        "rate_limited",
        "quota_exceeded",
        "upstream_error",
        "timeout",
        "budget_exceeded",
        "cancelled",
    }


@pytest.mark.parametrize("cls", _concrete(), ids=lambda cls: cls.__name__)
def test_retryable_flag_matches_contract(cls: type[JobError]) -> None:
    retried = cls.code in RETRIED
    assert cls.retryable is retried
    assert issubclass(cls, RetryableError if retried else PermanentError)
    assert cls("x").retryable is retried


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (InvalidMessage, ErrorCode.INVALID_MESSAGE),
        (InvalidRequest, ErrorCode.INVALID_REQUEST),
        (ModelNotAllowed, ErrorCode.MODEL_NOT_ALLOWED),
        (ForbiddenReplyTo, ErrorCode.FORBIDDEN_REPLY_TO),
        (AuthenticationFailed, ErrorCode.AUTHENTICATION_ERROR),
        (NotFound, ErrorCode.NOT_FOUND),
        (Expired, ErrorCode.EXPIRED),
        (RateLimited, ErrorCode.RATE_LIMITED),
        (UpstreamError, ErrorCode.UPSTREAM_ERROR),
        (UpstreamTimeout, ErrorCode.TIMEOUT),
    ],
)
def test_class_codes(cls: type[JobError], code: ErrorCode) -> None:
    assert cls.code is code


def test_error_keeps_what_the_upstream_said() -> None:
    body = {"error": {"message": "slow down", "type": "rate_limit"}}
    exc = RateLimited(
        "upstream answered 429", status_code=429, response=body, request_id="req-1", retry_after=2.5
    )
    assert str(exc) == "upstream answered 429"
    assert (exc.status_code, exc.response, exc.request_id, exc.retry_after) == (
        429,
        body,
        "req-1",
        2.5,
    )
    assert exc.info() == ErrorInfo(
        code=ErrorCode.RATE_LIMITED, message="upstream answered 429", status_code=429
    )


def test_error_defaults() -> None:
    exc = InvalidMessage("body is not JSON")
    assert exc.status_code is None
    assert exc.response is None
    assert exc.request_id is None
    assert exc.retry_after is None
    assert exc.info().model_dump() == {
        "code": "invalid_message",
        "message": "body is not JSON",
        "status_code": None,
    }


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, InvalidRequest),
        (401, AuthenticationFailed),
        (403, AuthenticationFailed),
        (404, NotFound),
        (408, UpstreamError),
        (409, UpstreamError),
        (413, InvalidRequest),
        (422, InvalidRequest),
        (429, RateLimited),
        (500, UpstreamError),
        (502, UpstreamError),
        (503, UpstreamError),
        (504, UpstreamError),
        (529, UpstreamError),
        (302, UpstreamError),
    ],
)
def test_error_for_status(status: int, cls: type[JobError]) -> None:
    assert error_for_status(status) is cls
