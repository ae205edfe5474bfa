"""The clean stream: a job's deltas as ``chat.completion.chunk`` events, a retried attempt
never shown twice; and a failed job's error as OpenAI's (``job_error``)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.gateway.chunks import CleanStream, Diverged
from worker.gateway.errors import job_error

pytestmark = pytest.mark.unit


def delta(attempt: int, seq: int, text: str | None = None, finish: str | None = None, **more: Any):
    body: dict[str, Any] = dict(more)
    if text is not None:
        body["content"] = text
    choice = {"index": 0, "delta": body, "finish_reason": finish}
    return {"id": "j", "type": "delta", "attempt": attempt, "seq": seq, "choices": [choice]}


def result(content: str, usage: dict[str, int] | None = None, **message: Any) -> dict[str, Any]:
    body = {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, **message},
                "finish_reason": "stop",
            }
        ],
    }
    return {
        "type": "result",
        "response": {"status_code": 200, "body": body},
        "error": None,
        "usage": usage,
    }


def chunks(events: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for data in events:
        for block in data.split(b"\n\n"):
            if block.startswith(b"data: ") and block != b"data: [DONE]":
                out.append(orjson.loads(block[6:]))
    return out


def text_of(events: list[bytes]) -> str:
    return "".join(
        c["delta"].get("content") or "" for chunk in chunks(events) for c in chunk["choices"]
    )


def test_one_attempt_is_forwarded_as_it_comes() -> None:
    stream = CleanStream("c1", "gpt", include_usage=True)
    events = stream.delta(delta(1, 0, "Hel")) + stream.delta(delta(1, 1, "lo", "stop"))
    events += stream.result(result("Hello", {"prompt_tokens": 1, "total_tokens": 3}))
    assert text_of(events) == "Hello"
    sent = chunks(events)
    assert sent[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-c1" for c in sent)
    assert [c["finish_reason"] for chunk in sent for c in chunk["choices"]] == [None, "stop"]
    assert sent[-1]["choices"] == [] and sent[-1]["usage"]["total_tokens"] == 3
    assert events[-1] == b"data: [DONE]\n\n"


def test_a_retry_is_held_back_until_it_covers_what_was_sent() -> None:
    stream = CleanStream("c1", "gpt", include_usage=False)
    events = stream.delta(delta(1, 0, "Hello wo"))
    assert stream.delta(delta(2, 0, "Hel")) == []  # behind what the client has: held back
    assert stream.delta(delta(2, 1, "lo")) == []
    more = stream.delta(delta(2, 2, " world"))  # past it: only the new part goes
    assert text_of(more) == "rld"
    events += more + stream.delta(delta(2, 3, "!", "stop"))
    events += stream.result(result("Hello world!"))
    assert text_of(events) == "Hello world!"
    assert sum(c["finish_reason"] == "stop" for x in chunks(events) for c in x["choices"]) == 1
    assert "usage" not in chunks(events)[-1]


def test_a_retry_that_says_something_else_cannot_be_mended() -> None:
    stream = CleanStream("c1", "gpt", include_usage=False)
    stream.delta(delta(1, 0, "Hello"))
    with pytest.raises(Diverged):
        stream.delta(delta(2, 0, "Howdy"))


def test_a_retry_that_ends_short_of_what_was_sent_diverges() -> None:
    stream = CleanStream("c1", "gpt", include_usage=False)
    stream.delta(delta(1, 0, "Hello world"))
    with pytest.raises(Diverged):
        stream.delta(delta(2, 0, "Hello", "stop"))


def test_a_stale_attempt_is_ignored_and_a_third_replaces_the_second() -> None:
    stream = CleanStream("c1", "gpt", include_usage=False)
    events = stream.delta(delta(2, 0, "Hi"))
    assert stream.delta(delta(1, 5, "zzz")) == []
    assert stream.delta(delta(3, 0, "H")) == []
    assert stream.delta(delta(2, 1, "xx")) == []  # the shown attempt is being replaced
    events += stream.delta(delta(3, 1, "i there"))
    events += stream.result(result("Hi there"))
    assert text_of(events) == "Hi there"


def test_the_result_fills_in_what_no_delta_brought() -> None:
    stream = CleanStream("c1", "gpt", include_usage=False)
    events = stream.delta(delta(1, 0, "Hel")) + stream.result(result("Hello"))
    assert text_of(events) == "Hello"
    other = CleanStream("c3", "gpt", include_usage=False)
    other.delta(delta(1, 0, "Bye"))
    with pytest.raises(Diverged):
        other.result(result("Hello"))


def test_a_result_without_deltas_is_one_whole_chunk() -> None:
    events = CleanStream("c1", "gpt", include_usage=False).result(result("All at once"))
    sent = chunks(events)
    assert len(sent) == 1
    assert sent[0]["choices"][0]["delta"] == {"role": "assistant", "content": "All at once"}
    assert sent[0]["choices"][0]["finish_reason"] == "stop"


def test_tool_calls_are_compared_and_resent_by_index() -> None:
    def call(attempt: int, seq: int, fragment: dict[str, Any], finish: str | None = None):
        return delta(attempt, seq, None, finish, tool_calls=[fragment])

    head = {"index": 0, "id": "call_0", "type": "function", "function": {"name": "f"}}
    stream = CleanStream("c1", "gpt", include_usage=False)
    events = stream.delta(call(1, 0, {**head, "function": {"name": "f", "arguments": '{"a"'}}))
    assert stream.delta(call(2, 0, {**head, "function": {"name": "f", "arguments": '{"'}})) == []
    more = stream.delta(call(2, 1, {"index": 0, "function": {"arguments": 'a": 1}'}}, "stop"))
    assert chunks(more)[0]["choices"][0]["delta"] == {
        "tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]
    }
    final = result(
        "",
        tool_calls=[
            {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
        ],
    )
    final["response"]["body"]["choices"][0]["message"]["content"] = None
    events += more + stream.result(final)
    arguments = "".join(
        t["function"].get("arguments", "")
        for x in chunks(events)
        for c in x["choices"]
        for t in c["delta"].get("tool_calls", [])
    )
    assert arguments == '{"a": 1}'


@pytest.mark.parametrize(
    ("code", "upstream", "status", "kind"),
    [
        ("invalid_request", 400, 400, "invalid_request_error"),
        ("invalid_request", None, 400, "invalid_request_error"),
        ("invalid_message", None, 400, "invalid_request_error"),
        ("model_not_allowed", None, 400, "invalid_request_error"),
        ("authentication_error", 401, 401, "authentication_error"),
        ("authentication_error", 403, 403, "permission_error"),
        ("not_found", 404, 404, "invalid_request_error"),
        ("rate_limited", 429, 429, "rate_limit_error"),
        ("rate_limited", None, 429, "rate_limit_error"),
        ("quota_exceeded", 429, 429, "insufficient_quota"),
        ("budget_exceeded", None, 429, "insufficient_quota"),
        ("timeout", None, 504, "server_error"),
        ("expired", None, 504, "server_error"),
        ("upstream_error", None, 502, "server_error"),
        ("upstream_error", 503, 503, "server_error"),
        ("upstream_error", 200, 502, "server_error"),  # a 200 with a malformed body
    ],
)
def test_a_failed_job_maps_to_openais_error(
    code: str, upstream: int | None, status: int, kind: str
) -> None:
    response = {"status_code": upstream, "body": {"error": {"message": "m", "param": "model"}}}
    error = job_error({"code": code, "message": "it failed", "status_code": upstream}, response)
    assert (error.status, error.kind, error.code) == (status, kind, code)
    assert error.document()["error"]["message"] == "it failed"
    assert error.param == "model"
    retry = error.headers.get("x-should-retry")
    assert retry == ("false" if code in ("quota_exceeded", "budget_exceeded") else None)
