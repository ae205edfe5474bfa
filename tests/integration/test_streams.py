"""Streamed and plain results that must not be reported wrong (issue 10, items 8-12), end to
end: the real broker, a worker in this loop, the bundled mock upstream over loopback, and the
``openai`` SDK's own stream accumulator as the reference for what a stream adds up to."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from openai import AsyncOpenAI
from pamqp.commands import Basic
from support.broker import Replies, publish

from worker.job import Job, JobOutcome
from worker.messages import JobDelta, JobResult
from worker.mock.upstream import MockUpstream
from worker.service import Worker
from worker.stream.relay import DeltaSink

StartWorker = Callable[..., Awaitable[Worker]]
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    }
]


def chat(mock: dict[str, Any] | None = None, **body: Any) -> dict[str, Any]:
    """A chat body of this test alone (the mock's answer depends on the messages)."""
    key = uuid.uuid4().hex
    out = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"stream {key}"}]}
    if mock is not None:
        out["mock"] = {"key": key, **mock}
    return {**out, **body}


def calls(mock: MockUpstream, body: dict[str, Any]) -> int:
    return sum(1 for r in mock.requests if r.body.get("messages") == body["messages"])


async def run_job(
    connection: AbstractConnection, replies: Replies, queue: str, body: dict[str, Any]
) -> tuple[JobResult, list[JobDelta]]:
    await publish(connection, queue, {"custom_id": "s", "body": body}, reply_to=replies.name)
    *deltas, last = await replies.until_results(1, timeout=30)
    return (
        JobResult.model_validate_json(last.body),
        [JobDelta.model_validate_json(m.body) for m in deltas],
    )


def last_attempt(deltas: list[JobDelta], attempt: int) -> list[JobDelta]:
    mine = [d for d in deltas if d.attempt == attempt]
    assert [d.seq for d in mine] == list(range(len(mine))), "seq has a gap"
    return mine


# --- item 8: a stream that just stops is broken ------------------------------------------


async def test_item8_stream_without_done_or_finish_reason_is_upstream_error_and_retried(
    start_worker: StartWorker, connection: AbstractConnection, replies: Replies, mock: MockUpstream
) -> None:
    worker = await start_worker(max_attempts=2)
    body = chat({"fault": "truncated", "chunks": 6}, stream=True)
    result, deltas = await run_job(connection, replies, worker.settings.request_queue, body)
    assert result.error is not None
    assert result.error.code == "upstream_error"
    assert "[DONE]" in result.error.message
    assert result.metadata.attempts == 2
    assert calls(mock, body) == 2
    assert {d.attempt for d in deltas} == {1, 2}  # each attempt's partial text went out


@pytest.mark.parametrize("fault", ["no_done", "no_finish_reason"])
async def test_item8_a_stream_missing_only_one_of_the_two_ends_is_whole(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    fault: str,
) -> None:
    worker = await start_worker(max_attempts=2)
    body = chat({"fault": fault, "chunks": 4}, stream=True)
    result, _ = await run_job(connection, replies, worker.settings.request_queue, body)
    assert result.error is None
    assert result.metadata.attempts == 1


# --- item 9: a usage chunk without "choices" ---------------------------------------------


async def test_item9_usage_chunk_without_choices_key_is_read(
    start_worker: StartWorker, connection: AbstractConnection, replies: Replies, mock: MockUpstream
) -> None:
    worker = await start_worker(max_attempts=2)
    body = chat({"usage_choices": False, "chunks": 4}, stream=True)
    result, deltas = await run_job(connection, replies, worker.settings.request_queue, body)
    assert result.error is None, result.error
    assert result.metadata.attempts == 1
    assert result.usage is not None and result.usage.total_tokens > 0
    assert result.response is not None and result.response.body is not None
    content = result.response.body["choices"][0]["message"]["content"]
    assert content == "".join(d.choices[0].delta.get("content", "") for d in deltas)
    recorded = [r for r in mock.requests if r.body.get("messages") == body["messages"]]
    assert recorded[0].body["stream_options"] == {"include_usage": True}


# --- item 10: refusal, logprobs, audio: as the openai SDK adds them up -------------------

_MESSAGE_FIELDS = ("role", "content", "refusal", "audio", "function_call")


def _view(completion: dict[str, Any]) -> dict[str, Any]:
    """The fields the SDK's ``ChatCompletion`` defines, absent read as null; tool calls
    without the SDK's own ``parsed_arguments`` and its kept ``index``."""
    choices = []
    for choice in completion["choices"]:
        message = choice["message"]
        calls = message.get("tool_calls") or None
        choices.append(
            {
                "index": choice["index"],
                "finish_reason": choice.get("finish_reason"),
                "logprobs": choice.get("logprobs"),
                "message": {
                    **{field: message.get(field) for field in _MESSAGE_FIELDS},
                    "tool_calls": calls
                    and [
                        {
                            "id": c["id"],
                            "type": c["type"],
                            "function": {
                                "name": c["function"]["name"],
                                "arguments": c["function"]["arguments"],
                            },
                        }
                        for c in calls
                    ],
                },
            }
        )
    top = ("object", "model", "system_fingerprint", "service_tier", "usage")
    return {**{key: completion.get(key) for key in top}, "choices": choices}


async def sdk_final(mock: MockUpstream, body: dict[str, Any]) -> dict[str, Any]:
    """What the openai SDK's ``chat.completions.stream`` accumulates from the same mock."""
    fields = {k: v for k, v in body.items() if k not in ("stream", "mock", "model", "messages")}
    client = AsyncOpenAI(base_url=mock.base_url, api_key=mock.config.api_key or "none")
    try:
        async with client.chat.completions.stream(
            model=body["model"],
            messages=body["messages"],
            stream_options={"include_usage": True},
            extra_body={"mock": body["mock"]},
            **fields,
        ) as stream:
            final = await stream.get_final_completion()
    finally:
        await client.close()
    return final.model_dump(mode="json", exclude_unset=True)


@pytest.mark.parametrize(
    ("mock_options", "fields"),
    [
        ({"chunks": 5}, {"logprobs": True}),
        ({"chunks": 5, "refusal": "I can't help with that."}, {"logprobs": True}),
        (
            {"chunks": 5},
            {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"}},
        ),
        ({"chunks": 3, "tool_calls": 2}, {"tools": WEATHER}),
        ({"chunks": 4, "reasoning": True}, {"n": 2, "logprobs": True}),
    ],
    ids=["logprobs", "refusal", "audio", "tool-calls", "two-choices"],
)
async def test_item10_streamed_result_equals_the_openai_sdk_accumulation(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    mock_options: dict[str, Any],
    fields: dict[str, Any],
) -> None:
    worker = await start_worker(stream_flush_interval=0.01)
    body = chat(mock_options, stream=True, **fields)
    result, deltas = await run_job(connection, replies, worker.settings.request_queue, body)
    assert result.error is None, result.error
    assert result.response is not None and result.response.body is not None
    ours = result.response.body
    theirs = await sdk_final(mock, body)
    assert _view(ours) == _view(theirs)

    # Deltas carry the same fields: added up per choice, they give the result.
    mine = last_attempt(deltas, result.metadata.attempts)
    for choice in ours["choices"]:
        parts = [c for d in mine for c in d.choices if c.index == choice["index"]]
        message = choice["message"]
        for field in ("content", "refusal"):
            text = "".join(p.delta.get(field) or "" for p in parts)
            assert text == (message.get(field) or "")
        transcript = "".join((p.delta.get("audio") or {}).get("transcript", "") for p in parts)
        assert transcript == (message.get("audio") or {}).get("transcript", "")
        logprobs = [
            entry
            for p in parts
            for entry in ((p.model_extra or {}).get("logprobs") or {}).get("content") or []
        ]
        assert logprobs == ((choice.get("logprobs") or {}).get("content") or [])
    if "refusal" in mock_options:
        assert ours["choices"][0]["message"]["refusal"] == mock_options["refusal"]
        assert ours["choices"][0]["message"]["content"] is None


# --- item 11: a 200 that is an error -----------------------------------------------------


async def test_item11_plain_200_with_error_body_is_upstream_error_and_retried(
    start_worker: StartWorker, connection: AbstractConnection, replies: Replies, mock: MockUpstream
) -> None:
    worker = await start_worker(max_attempts=2)
    body = chat({"fault": "error_body"})
    result, _ = await run_job(connection, replies, worker.settings.request_queue, body)
    assert result.error is not None
    assert result.error.code == "upstream_error"
    assert result.error.status_code == 200
    assert result.response is not None and result.response.body is not None
    assert "error" in result.response.body
    assert result.metadata.attempts == 2
    assert calls(mock, body) == 2


# --- item 12: a coalesced delta the broker refuses ---------------------------------------


async def test_item12_a_refused_coalesced_delta_fails_the_attempt(
    start_worker: StartWorker, connection: AbstractConnection, replies: Replies, mock: MockUpstream
) -> None:
    """The first delta goes at once; the second an interval later, coalesced. When that
    publish fails (as a broker nack raises), the attempt must fail: no ``ok`` result whose
    deltas have a gap. The delivery comes back and a clean attempt completes."""
    worker = await start_worker(stream_flush_interval=0.05, max_attempts=3)
    run = worker.runner.run
    failures: list[tuple[int, int]] = []

    async def run_with_a_failing_timer_flush(
        job: Job, send_delta: DeltaSink, **options: Any
    ) -> Any:
        class FailingSecond:
            async def send(self, attempt: int, seq: int, choices: list[dict[str, Any]]) -> None:
                if seq == 1 and not failures:
                    failures.append((attempt, seq))
                    raise aiormq.exceptions.DeliveryError(None, Basic.Nack(delivery_tag=1))
                await send_delta.send(attempt, seq, choices)

            async def settle(self) -> None:
                await send_delta.settle()

        outcome: JobOutcome | Any = await run(job, FailingSecond(), **options)
        return outcome

    worker.runner.run = run_with_a_failing_timer_flush  # type: ignore[method-assign]
    body = chat({"chunks": 20, "chunk_interval": 0.01}, stream=True)
    result, deltas = await run_job(connection, replies, worker.settings.request_queue, body)
    assert failures == [(1, 1)]
    assert result.error is None
    assert result.metadata.attempts == 2  # the failed attempt counts
    assert [d.seq for d in deltas if d.attempt == 1] == [0]  # nothing after the failure
    mine = last_attempt(deltas, 2)
    assert result.response is not None and result.response.body is not None
    content = result.response.body["choices"][0]["message"]["content"]
    assert content == "".join(d.choices[0].delta.get("content", "") for d in mine)
    assert calls(mock, body) == 2
