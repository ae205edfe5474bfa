"""OpenAI-shaped HTTP errors: ``{"error": {"message", "type", "param", "code"}}``.

ApiError
├── BadRequest       400 invalid_request_error
├── Unauthorized     401 invalid_request_error (invalid_api_key)
├── NotFound         404 invalid_request_error
├── Conflict         409 invalid_request_error
├── TooLarge         413 invalid_request_error
└── Unavailable      503 server_error

A failed job becomes an :class:`ApiError` by :func:`job_error` (contract §15, Calls).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

__all__ = [
    "ApiError",
    "BadRequest",
    "Conflict",
    "NotFound",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "error_middleware",
    "job_error",
]

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    status = 500
    kind = "server_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind
        self.headers = headers or {}

    def document(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> web.Response:
        return web.json_response(self.document(), status=self.status, headers=self.headers)


class BadRequest(ApiError):
    status = 400
    kind = "invalid_request_error"


class Unauthorized(ApiError):
    status = 401
    kind = "invalid_request_error"


class NotFound(ApiError):
    status = 404
    kind = "invalid_request_error"


class Conflict(ApiError):
    status = 409
    kind = "invalid_request_error"


class TooLarge(ApiError):
    status = 413
    kind = "invalid_request_error"


class Unavailable(ApiError):
    status = 503
    kind = "server_error"


#: a failed job's HTTP status when the upstream gave none (or a 2xx/3xx with a bad body)
JOB_STATUS = {
    "invalid_message": 400,
    "invalid_request": 400,
    "model_not_allowed": 400,
    "authentication_error": 401,
    "not_found": 404,
    "cancelled": 409,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "budget_exceeded": 429,
    "forbidden_reply_to": 500,
    "upstream_error": 502,
    "timeout": 504,
    "expired": 504,
}
#: OpenAI's error type by status (OpenAI answers an unknown model 404 invalid_request_error)
KIND = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
#: codes that the same request cannot cure soon: the openai SDK is told not to retry them
NOT_RETRIED = frozenset({"quota_exceeded", "budget_exceeded"})


def job_error(error: dict[str, Any], response: dict[str, Any] | None) -> ApiError:
    """A failed job's ``error`` (§4) as OpenAI's error: the upstream's status when it gave
    an error status, else the code's (``JOB_STATUS``); the upstream's ``param``, if any."""
    code = str(error.get("code") or "upstream_error")
    upstream = error.get("status_code")
    status = upstream if isinstance(upstream, int) and upstream >= 400 else JOB_STATUS.get(code)
    status = status or 500
    kind = "server_error" if status >= 500 else KIND.get(status, "invalid_request_error")
    if code in ("quota_exceeded", "budget_exceeded"):
        kind = "insufficient_quota"
    body = (response or {}).get("body")
    upstream_error = body.get("error") if isinstance(body, dict) else None
    param = upstream_error.get("param") if isinstance(upstream_error, dict) else None
    return ApiError(
        str(error.get("message") or code),
        code=code,
        param=param if isinstance(param, str) else None,
        status=status,
        kind=kind,
        headers={"x-should-retry": "false"} if code in NOT_RETRIED else None,
    )


def _for_http(exc: web.HTTPException) -> ApiError:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return ApiError(exc.reason, status=exc.status, kind=kind)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error of the API in OpenAI's shape, never a traceback or an HTML page."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _for_http(exc).response()
    except Exception:
        log.exception("gateway request failed", path=request.path, method=request.method)
        return ApiError("the gateway failed to answer; try again").response()
