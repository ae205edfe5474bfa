"""The bundled upstream's faults: their names, status faults, mid-stream faults and the
OpenAI-shaped error answers."""

from __future__ import annotations

import asyncio
import email.utils
import http
import math
import time
from typing import Any

import orjson
from aiohttp import web

from worker.mock.compose import Plan

__all__ = [
    "FAULTS",
    "MALFORMED",
    "QUOTA_FAULT",
    "RANDOM_FAULTS",
    "STATUS_FAULTS",
    "BadRequest",
    "error_response",
    "interrupt",
    "status_fault",
]

STATUS_FAULTS = frozenset(
    ("400", "401", "403", "404", "408", "409", "422", "429", "500", "502", "503")
)
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
QUOTA_FAULT = "insufficient_quota"  # a 429 whose code says the account's credit is spent
_OTHER_FAULTS = (
    QUOTA_FAULT,
    "stall",
    "malformed",
    "error_event",
    "disconnect",
    "no_done",
    "no_finish_reason",
    "truncated",  # a stream that ends cleanly with neither a finish_reason nor [DONE]
    "error_body",  # a 200 whose body is {"error": ...} without choices, as some proxies send
)
FAULTS = STATUS_FAULTS.union(_OTHER_FAULTS)
RANDOM_FAULTS = ("429", "500", "503", "stall", "malformed", "error_event", "disconnect")
MALFORMED = b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess'


class BadRequest(Exception):
    def __init__(self, message: str, code: str, param: str | None = "mock") -> None:
        super().__init__(message)
        self.code, self.param = code, param


async def status_fault(plan: Plan, opts: dict[str, Any], headers: dict[str, str]) -> web.Response:
    status = int(plan.fault) if plan.fault in STATUS_FAULTS else 500
    if "retry_after" in opts or opts.get("retry_after_date"):
        secs = float(opts.get("retry_after", 1))
        headers["Retry-After"] = (
            email.utils.formatdate(time.time() + secs, usegmt=True)
            if opts.get("retry_after_date")
            else str(math.ceil(secs))
        )
    if "retry_after_ms" in opts:
        headers["retry-after-ms"] = str(int(opts["retry_after_ms"]))
    if plan.latency > 0:
        await asyncio.sleep(plan.latency)
    phrase = http.HTTPStatus(status).phrase
    kind = "server_error" if status >= 500 else _ERROR_TYPES.get(status, "invalid_request_error")
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    return error_response(status, f"Mock fault {plan.fault}: {phrase}", code, None, headers, kind)


async def interrupt(request: web.Request, response: web.StreamResponse, plan: Plan) -> bool:
    """Apply a mid-stream fault; True when the stream ends here."""
    if plan.fault == "stall":
        await asyncio.sleep(plan.stall)
        return False
    if plan.fault == "disconnect":
        # close(), not abort(): the chunks already written must still reach the client.
        if request.transport is not None:
            request.transport.close()
        return True
    if plan.fault == "malformed":
        await response.write(b"data: " + MALFORMED + b"\n\n")
    elif plan.fault == "error_event":
        error = {"message": "Mock fault error_event", "type": "server_error", "code": "mock_error"}
        await response.write(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
    else:
        return False
    await response.write_eof()
    return True


def error_response(
    status: int,
    message: str,
    code: str,
    param: str | None,
    headers: dict[str, str],
    kind: str = "invalid_request_error",
) -> web.Response:
    error = {"message": message, "type": kind, "code": code, "param": param}
    body = orjson.dumps({"error": error})
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)
