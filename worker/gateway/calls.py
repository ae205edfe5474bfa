"""``POST /v1/chat/completions`` and ``POST /v1/embeddings``: each call is one job on
``WORKER_GATEWAY_LANE``, answered with its result or, streamed, with its deltas (§15).

A call registers for its replies, publishes its job (confirmed), waits, answers, and
unregisters however it ends: a client that goes away cancels its handler, and nothing of
the call stays behind (the job runs on; its replies are dropped on arrival).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiormq
import orjson
from aio_pika.abc import AbstractChannel
from aiohttp import web
from pamqp.commands import Basic
from pydantic import ValidationError

from worker.amqp.outbox import RobustOutbox, encode_publish
from worker.amqp.topology import H_DEADLINE, H_JOB_ID
from worker.gateway.chunks import CleanStream, Diverged, event
from worker.gateway.errors import ApiError, BadRequest, TooLarge, Unavailable, job_error
from worker.gateway.keys import tenant_of
from worker.gateway.lines import CHAT, EMBEDDINGS, ENDPOINTS
from worker.gateway.metrics import GatewayMetrics
from worker.gateway.replies import CallInbox, CallReplies, Reply
from worker.settings import Settings
from worker.tenants import H_TENANT

__all__ = ["CALLS", "Calls", "add_routes"]

APP_ID = "chat-worker-gateway"
#: beyond its deadline, how long a call still waits for the worker's own answer
GRACE = 5.0
#: a quiet stream gets a comment this often, so that nothing on the way closes it
KEEPALIVE = 15.0
KEEPALIVE_EVENT = b": keep-alive\n\n"
#: room in WORKER_MAX_MESSAGE_BYTES for the job's envelope around the body
ENVELOPE_BYTES = 512
READ_CHUNK = 64 * 1024


class Calls:
    """What the call handlers share: the publishing channel, the replies, the settings."""

    def __init__(
        self,
        channel: AbstractChannel,
        replies: CallReplies,
        settings: Settings,
        metrics: GatewayMetrics,
    ) -> None:
        self.channel = channel
        self.replies = replies
        self.settings = settings
        self.metrics = metrics
        self.lane = settings.call_lane
        self._outbox = RobustOutbox(channel)

    async def publish(self, call: Call, raw: bytes, tenant: str | None) -> None:
        """The call as one request message (§3), confirmed by the broker.

        Encoded here and written through the worker's :class:`Outbox`: the calls published
        in one loop iteration leave in one write (under load, a write per call was the
        gateway's largest cost after the HTTP answer itself).
        """
        line = orjson.dumps(
            {
                "custom_id": call.id,
                "method": "POST",
                "url": call.endpoint,
                "body": orjson.Fragment(raw),
            }
        )
        headers: dict[str, Any] = {H_DEADLINE: call.deadline.isoformat()}
        if tenant is not None:
            headers[H_TENANT] = tenant
        properties = Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=call.id,
            correlation_id=call.id,
            reply_to=self.replies.name,
            headers=headers,
            app_id=APP_ID,
        )
        try:
            outbox = await self._outbox.get()
            await outbox.send(encode_publish(outbox.channel, self.lane, properties, line), call.id)
        except aiormq.exceptions.PublishError:
            raise Unavailable(f"no queue {self.lane!r} takes calls (WORKER_GATEWAY_LANE)") from None
        except aiormq.exceptions.DeliveryError:
            raise Unavailable("the broker refused the call; try again") from None
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError):
            raise Unavailable("the broker is out of reach; try again") from None


CALLS = web.AppKey("calls", Calls)


@dataclass(slots=True)
class Call:
    """One call: its job's id, what it asks, and how long it may wait."""

    id: str
    endpoint: str
    body: dict[str, Any]
    deadline: datetime
    until: float  # the time.monotonic() after which the call gives up
    idle: float  # after each reply, the wait allowed for the next
    outcome: str = "client_gone"  # for the metrics: ok, or the error code

    @property
    def stream(self) -> bool:
        return self.endpoint == CHAT and self.body.get("stream") is True

    @property
    def include_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    async def next(self, inbox: CallInbox, at_most: float | None = None) -> Reply | None:
        """The next reply; None when ``at_most`` seconds passed first (the call still has
        time); :class:`ApiError` 504 when the call's time is up."""
        left = self.until - time.monotonic()
        wait = left if at_most is None else min(left, at_most)
        try:
            reply = await inbox.get(wait)
        except TimeoutError:
            if wait < left:
                return None
            raise ApiError(
                "the job did not answer in time (WORKER_REQUEST_TIMEOUT)",
                code="timeout",
                status=504,
                kind="server_error",
            ) from None
        self.until = max(self.until, time.monotonic() + self.idle)
        return reply


async def _read(request: web.Request, limit: int) -> bytes:
    """The request's body, refused past ``limit`` bytes before more is read."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the request body is larger than {limit} bytes")
    data = bytearray()
    while chunk := await request.content.read(READ_CHUNK):
        data += chunk
        if len(data) > limit:
            raise TooLarge(f"the request body is larger than {limit} bytes")
    return bytes(data)


def _checked(raw: bytes, endpoint: str) -> dict[str, Any]:
    """The body, checked as a worker would check it (§3, §18) before anything is sent."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    try:
        ENDPOINTS[endpoint].model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or None
        message = error["msg"].removeprefix("Value error, ")
        raise BadRequest(
            f"{where}: {message}" if where else message, code="invalid_request", param=where
        ) from None
    return body


def _answer(call: Call, result: dict[str, Any]) -> web.Response:
    """A finished job as the HTTP answer: the upstream's status and body, or its error."""
    error, response = result.get("error"), result.get("response")
    if error is not None:
        raise job_error(error, response)
    if not isinstance(response, dict):
        raise ApiError("the job ended without a response", code="upstream_error", status=502)
    headers = {H_JOB_ID: call.id}
    if response.get("request_id"):
        headers["x-request-id"] = str(response["request_id"])
    return web.Response(
        body=orjson.dumps(response.get("body") or {}),
        status=int(response.get("status_code") or 200),
        content_type="application/json",
        headers=headers,
    )


def _result_of(reply: Reply) -> dict[str, Any]:
    try:
        document = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise ApiError("the job's reply was not readable", code="upstream_error", status=502)
    return document


async def _plain(call: Call, inbox: CallInbox) -> web.Response:
    while True:
        reply = await call.next(inbox)
        if reply is not None and reply.final:
            return _answer(call, _result_of(reply))


async def _streamed(request: web.Request, call: Call, inbox: CallInbox) -> web.StreamResponse:
    """Deltas as ``chat.completion.chunk`` events. Until the first one, a failure is an
    HTTP error; after it, an error event ends the stream."""
    fold = CleanStream(call.id, str(call.body.get("model")), call.include_usage)
    response: web.StreamResponse | None = None
    ended = False
    failure: str | None = None
    try:
        while not ended:
            try:
                reply = await call.next(inbox, KEEPALIVE if response is not None else None)
                if reply is None:
                    assert response is not None
                    await response.write(KEEPALIVE_EVENT)
                    continue
                document = _result_of(reply)
                ended = reply.final
                if not ended:
                    events = fold.delta(document)
                elif document.get("error") is not None:
                    raise job_error(document["error"], document.get("response"))
                else:
                    events = fold.result(document)
            except Diverged as exc:
                raise ApiError(
                    f"the job was retried and its new attempt differs from the text already "
                    f"sent ({exc}); the stream ends here",
                    code="stream_diverged",
                    status=502,
                ) from None
            except ApiError as error:
                if response is None:
                    raise
                failure = error.code or str(error.status)
                await response.write(event(error.document()))
                break
            if events:
                if response is None:
                    response = web.StreamResponse(
                        headers={
                            "Content-Type": "text/event-stream",
                            "Cache-Control": "no-cache",
                            H_JOB_ID: call.id,
                        }
                    )
                    await response.prepare(request)
                await response.write(b"".join(events))
        assert response is not None
        await response.write_eof()
        call.outcome = failure or "ok"
    except ConnectionError:
        pass  # the client went away mid-stream (outcome client_gone): nothing to tell it
    assert response is not None
    return response


async def _serve(request: web.Request, endpoint: str) -> web.StreamResponse:
    calls = request.app[CALLS]
    settings = calls.settings
    started = time.perf_counter()
    outcome = "client_gone"
    try:
        raw = await _read(request, settings.max_message_bytes - ENVELOPE_BYTES)
        body = _checked(raw, endpoint)
        timeout = settings.request_timeout
        call = Call(
            id=f"call-{uuid.uuid4().hex}",
            endpoint=endpoint,
            body=body,
            deadline=datetime.now(UTC) + timedelta(seconds=timeout),
            until=time.monotonic() + timeout + GRACE,
            idle=timeout + GRACE,
        )
        with calls.replies.waiting(call.id) as inbox:
            await calls.publish(call, raw, tenant_of(request))
            if call.stream:
                answer = await _streamed(request, call, inbox)
            else:
                answer = await _plain(call, inbox)
                call.outcome = "ok"
        outcome = call.outcome
        return answer
    except ApiError as exc:
        outcome = exc.code or str(exc.status)
        raise
    finally:
        calls.metrics.calls.labels(endpoint, outcome).inc()
        calls.metrics.call_seconds.labels(endpoint).observe(time.perf_counter() - started)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, CHAT)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _serve(request, EMBEDDINGS)


def add_routes(app: web.Application, calls: Calls) -> None:
    app[CALLS] = calls
    app.router.add_post(CHAT, chat_completions)
    app.router.add_post(EMBEDDINGS, embeddings)
    calls.metrics.calls_waiting.set_function(lambda: calls.replies.pending)
