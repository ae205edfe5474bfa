"""OpenAI-shaped HTTP errors: ``{"error": {"message", "type", "param", "code"}}``.

ApiError
├── BadRequest       400 invalid_request_error
├── Unauthorized     401 invalid_request_error (invalid_api_key)
├── NotFound         404 invalid_request_error
└── Conflict         409 invalid_request_error
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

__all__ = ["ApiError", "BadRequest", "Conflict", "NotFound", "Unauthorized", "error_middleware"]

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    status = 500
    kind = "server_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param

    def response(self) -> web.Response:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return web.json_response({"error": error}, status=self.status)


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


def _for_http(exc: web.HTTPException) -> ApiError:
    error = ApiError(exc.reason, code=None)
    error.status = exc.status
    error.kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return error


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
