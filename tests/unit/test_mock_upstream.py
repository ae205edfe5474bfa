"""Tests for the bundled OpenAI-compatible mock server, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
import pytest

from worker.mock.upstream import MockConfig, MockUpstream

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there world"},
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {}}}


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    async with MockUpstream() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def request(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": MESSAGES, **extra}


async def call(
    session: aiohttp.ClientSession,
    mock: MockUpstream,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, Mapping[str, str], Any]:
    url = f"{mock.base_url}/chat/completions"
    async with session.post(url, json=body, headers=headers) as resp:
        raw = await resp.read()
        return resp.status, resp.headers, orjson.loads(raw)


async def stream(
    session: aiohttp.ClientSession,
    mock: MockUpstream,
    body: dict[str, Any],
    read_timeout: float | None = None,
) -> tuple[list[str], BaseException | None]:
    """Every non-blank SSE line received, and the error that cut the stream short, if any."""
    lines: list[str] = []
    client_timeout = aiohttp.ClientTimeout(sock_read=read_timeout)
    url = f"{mock.base_url}/chat/completions"
    try:
        async with session.post(url, json={**body, "stream": True}, timeout=client_timeout) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream"
            async for raw in r.content:
                if line := raw.decode().rstrip("\n"):
                    lines.append(line)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return lines, exc
    return lines, None


def chunks_of(lines: list[str]) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in lines if line.startswith("data: {")]


def content_pieces(chunks: list[dict[str, Any]], index: int = 0) -> list[str]:
    return [
        c["choices"][0]["delta"]["content"]
        for c in chunks
        if c["choices"] and c["choices"][0]["index"] == index
        if c["choices"][0]["delta"].get("content")
    ]


async def test_plain_reply_has_the_openai_shape_and_usage(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    status, headers, body = await call(session, mock, request())
    assert status == 200
    assert headers["x-request-id"] == "req_1"
    assert headers["Content-Type"] == "application/json"
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-test"
    assert isinstance(body["created"], int)
    assert body["system_fingerprint"]
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("Mock reply to 2 messages: ")
    assert "tool_calls" not in choice["message"]
    assert "reasoning_content" not in choice["message"]
    words = len(choice["message"]["content"].split())
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": words,
        "total_tokens": 5 + words,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "text_tokens": 5,
            "audio_tokens": 0,
            "image_tokens": 0,
        },
        "completion_tokens_details": {
            "text_tokens": words,
            "audio_tokens": 0,
            "reasoning_tokens": 0,
        },
    }


async def test_prompt_tokens_count_content_parts_and_are_at_least_one(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "two words"}]}]
    _, _, body = await call(session, mock, request(messages=parts))
    assert body["usage"]["prompt_tokens"] == 2
    _, _, body = await call(session, mock, request(messages=[{"role": "user", "content": ""}]))
    assert body["usage"]["prompt_tokens"] == 1


async def test_replies_are_deterministic_and_depend_on_the_messages(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    _, first, one = await call(session, mock, request())
    _, second, two = await call(session, mock, request())
    other_messages = [{"role": "user", "content": "something else"}]
    _, _, other = await call(session, mock, request(messages=other_messages))
    assert one["choices"] == two["choices"]
    assert one["usage"] == two["usage"]
    assert first["x-request-id"] != second["x-request-id"]
    assert other["choices"][0]["message"]["content"] != one["choices"][0]["message"]["content"]


async def test_streamed_pieces_concatenate_to_the_non_streamed_content(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    _, _, whole = await call(session, mock, request())
    lines, error = await stream(session, mock, request())
    assert error is None
    chunks = chunks_of(lines)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = content_pieces(chunks)
    assert len(pieces) == mock.config.chunks
    assert all(pieces)
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks)


async def test_content_and_chunks_options_split_the_given_text(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    body = request(mock={"content": "one two three four five", "chunks": 5})
    lines, _ = await stream(session, mock, body)
    assert content_pieces(chunks_of(lines)) == ["one ", "two ", "three ", "four ", "five"]
    _, _, whole = await call(session, mock, request(mock={"content": "abc", "chunks": 2}))
    assert whole["choices"][0]["message"]["content"] == "abc"
    lines, _ = await stream(session, mock, request(mock={"content": "abc", "chunks": 2}))
    assert content_pieces(chunks_of(lines)) == ["a", "bc"]


async def test_n_gives_several_choices(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    _, _, body = await call(session, mock, request(n=3))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    contents = [c["message"]["content"] for c in body["choices"]]
    lines, _ = await stream(session, mock, request(n=3))
    chunks = chunks_of(lines)
    assert ["".join(content_pieces(chunks, i)) for i in range(3)] == contents
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2]
    total_words = sum(len(c.split()) for c in contents)
    assert body["usage"]["completion_tokens"] == total_words


async def test_max_tokens_cuts_the_reply_with_finish_reason_length(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    _, _, body = await call(session, mock, request(max_tokens=3))
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Mock reply to"
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    _, _, body = await call(session, mock, request(max_completion_tokens=4))
    assert len(body["choices"][0]["message"]["content"].split()) == 4


async def test_include_usage_adds_a_final_usage_chunk(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    _, _, whole = await call(session, mock, request())
    lines, error = await stream(session, mock, request(stream_options={"include_usage": True}))
    assert error is None
    assert lines[0] == ": keep-alive"
    assert lines[-1] == "data: [DONE]"
    chunks = chunks_of(lines)
    *body_chunks, last = chunks
    assert last["choices"] == []
    assert last["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in body_chunks)
    assert body_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in body_chunks[:-1])


async def test_tool_call_fragments_carry_id_and_name_only_first(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    body = request(tools=[WEATHER, SEARCH], mock={"tool_calls": 2})
    lines, error = await stream(session, mock, body)
    assert error is None
    chunks = chunks_of(lines)
    fragments = [f for c in chunks for f in c["choices"][0]["delta"].get("tool_calls", [])]
    assert {f["index"] for f in fragments} == {0, 1}
    for k in (0, 1):
        first, *rest = [f for f in fragments if f["index"] == k]
        assert first["id"] == f"call_{k}"
        assert first["type"] == "function"
        assert first["function"] == {"name": "get_weather", "arguments": ""}
        assert len(rest) >= 3
        assert all(set(f) == {"index", "function"} for f in rest)
        assert all(set(f["function"]) == {"arguments"} for f in rest)
        arguments = orjson.loads("".join(f["function"]["arguments"] for f in rest))
        assert set(arguments) == {"city", "days"}
        assert isinstance(arguments["city"], str)
        assert isinstance(arguments["days"], int)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert content_pieces(chunks) == []


async def test_non_streamed_tool_calls_and_tool_choice(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    _, _, body = await call(session, mock, request(tools=[WEATHER, SEARCH]))
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [tool_call] = choice["message"]["tool_calls"]
    assert tool_call["id"] == "call_0"
    assert tool_call["function"]["name"] == "get_weather"
    assert set(orjson.loads(tool_call["function"]["arguments"])) == {"city", "days"}

    named = {"type": "function", "function": {"name": "search"}}
    _, _, body = await call(session, mock, request(tools=[WEATHER, SEARCH], tool_choice=named))
    [tool_call] = body["choices"][0]["message"]["tool_calls"]
    assert tool_call["function"]["name"] == "search"
    assert isinstance(orjson.loads(tool_call["function"]["arguments"]), dict)

    _, _, body = await call(session, mock, request(tools=[WEATHER], tool_choice="none"))
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in body["choices"][0]["message"]


async def test_reasoning_is_returned_and_counted(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    _, _, body = await call(session, mock, request(reasoning_effort="low"))
    message = body["choices"][0]["message"]
    reasoning_words = len(message["reasoning_content"].split())
    content_words = len(message["content"].split())
    details = body["usage"]["completion_tokens_details"]
    assert details["reasoning_tokens"] == reasoning_words > 0
    assert details["text_tokens"] == content_words
    assert body["usage"]["completion_tokens"] == reasoning_words + content_words

    lines, _ = await stream(session, mock, request(reasoning_effort="low"))
    deltas = [c["choices"][0]["delta"] for c in chunks_of(lines)]
    kinds = [next(iter(d)) for d in deltas[1:] if d]
    assert kinds == ["reasoning_content"] * 8 + ["content"] * 8
    streamed = "".join(d["reasoning_content"] for d in deltas if "reasoning_content" in d)
    assert streamed == message["reasoning_content"]


async def test_reasoning_field_option_uses_the_reasoning_key(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    options = {"reasoning": True, "reasoning_field": "reasoning"}
    _, _, body = await call(session, mock, request(mock=options))
    message = body["choices"][0]["message"]
    assert message["reasoning"].startswith("Thinking about")
    assert "reasoning_content" not in message
    lines, _ = await stream(session, mock, request(mock=options))
    deltas = [c["choices"][0]["delta"] for c in chunks_of(lines)]
    assert "".join(d.get("reasoning", "") for d in deltas) == message["reasoning"]
    assert not any("reasoning_content" in d for d in deltas)


@pytest.mark.parametrize(
    "fault", ["400", "401", "403", "404", "408", "409", "422", "429", "500", "502", "503"]
)
async def test_status_faults_return_openai_error_bodies(
    mock: MockUpstream, session: aiohttp.ClientSession, fault: str
) -> None:
    for streamed in (False, True):
        status, headers, body = await call(
            session, mock, request(stream=streamed, mock={"fault": fault})
        )
        assert status == int(fault)
        assert headers["Content-Type"] == "application/json"
        assert set(body["error"]) == {"message", "type", "code", "param"}
        assert fault in body["error"]["message"]
    assert mock.stats.faults[fault] == 2


async def test_error_event_is_a_500_when_not_streamed(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    status, _, body = await call(session, mock, request(mock={"fault": "error_event"}))
    assert status == 500
    assert body["error"]["type"] == "server_error"


async def test_error_event_mid_stream(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    lines, error = await stream(
        session, mock, request(mock={"fault": "error_event", "after_chunks": 3})
    )
    assert error is None
    *good, last = [line for line in lines if line.startswith("data: ")]
    assert len(good) == 3
    assert orjson.loads(last[6:])["error"]["type"] == "server_error"
    assert "data: [DONE]" not in lines


async def test_malformed_replies(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    url = f"{mock.base_url}/chat/completions"
    async with session.post(url, json=request(mock={"fault": "malformed"})) as resp:
        assert resp.status == 200
        raw = await resp.read()
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)

    lines, _ = await stream(session, mock, request(mock={"fault": "malformed", "after_chunks": 2}))
    data = [line[6:] for line in lines if line.startswith("data: ")]
    assert len(data) == 3
    assert all(isinstance(orjson.loads(d), dict) for d in data[:2])
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(data[2])


async def test_disconnect_before_a_non_streamed_reply(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(session, mock, request(mock={"fault": "disconnect"}))
    status, _, _ = await call(session, mock, request())
    assert status == 200


async def test_disconnect_mid_stream(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    lines, error = await stream(
        session, mock, request(mock={"fault": "disconnect", "after_chunks": 2})
    )
    assert isinstance(error, aiohttp.ClientPayloadError)
    assert len(chunks_of(lines)) == 2


async def test_stall_delays_a_non_streamed_reply(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    started = time.perf_counter()
    status, _, _ = await call(session, mock, request(mock={"fault": "stall", "stall": 0.3}))
    assert status == 200
    assert time.perf_counter() - started >= 0.3

    url = f"{mock.base_url}/chat/completions"
    body, timeout = request(mock={"fault": "stall"}), aiohttp.ClientTimeout(total=0.3)
    with pytest.raises(TimeoutError):
        await session.post(url, json=body, timeout=timeout)


async def test_stall_mid_stream_goes_silent(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    lines, error = await stream(
        session, mock, request(mock={"fault": "stall", "after_chunks": 2}), read_timeout=0.3
    )
    assert isinstance(error, TimeoutError)
    assert len(chunks_of(lines)) == 2

    body = request(mock={"fault": "stall", "after_chunks": 2, "stall": 0.2})
    lines, error = await stream(session, mock, body)
    assert error is None
    assert lines[-1] == "data: [DONE]"


async def test_stop_does_not_wait_for_a_stalled_request() -> None:
    async with MockUpstream() as server, aiohttp.ClientSession() as client:
        url = f"{server.base_url}/chat/completions"
        pending = asyncio.ensure_future(client.post(url, json=request(mock={"fault": "stall"})))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        await server.stop()
        assert time.perf_counter() - started < 5
        with pytest.raises(aiohttp.ClientError):
            await pending


async def test_no_done_and_no_finish_reason(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    lines, error = await stream(session, mock, request(mock={"fault": "no_done"}))
    assert error is None
    assert "data: [DONE]" not in lines
    assert chunks_of(lines)[-1]["choices"][0]["finish_reason"] == "stop"

    lines, error = await stream(session, mock, request(mock={"fault": "no_finish_reason"}))
    assert error is None
    assert lines[-1] == "data: [DONE]"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks_of(lines))
    assert len(content_pieces(chunks_of(lines))) == 8

    _, _, body = await call(session, mock, request(mock={"fault": "no_finish_reason"}))
    assert body["choices"][0]["finish_reason"] is None


async def test_times_limits_a_fault_per_key(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    fault = {"fault": "503", "times": 2, "key": "job-1"}
    statuses = [(await call(session, mock, request(mock=fault)))[0] for _ in range(3)]
    assert statuses == [503, 503, 200]
    other = {**fault, "key": "job-2"}
    assert (await call(session, mock, request(mock=other)))[0] == 503

    # Without a key, requests with the same messages share one counter.
    once = {"fault": "429", "times": 1}
    first = (
        await call(session, mock, request(messages=[{"role": "user", "content": "x"}], mock=once))
    )[0]
    again = (
        await call(session, mock, request(messages=[{"role": "user", "content": "x"}], mock=once))
    )[0]
    fresh = (
        await call(session, mock, request(messages=[{"role": "user", "content": "y"}], mock=once))
    )[0]
    assert (first, again, fresh) == (429, 200, 429)
    assert mock.stats.faults == {"503": 3, "429": 2}
    assert mock.stats.total == 7

    mock.reset()
    assert (await call(session, mock, request(mock=fault)))[0] == 503
    assert mock.stats.total == 1


async def test_retry_after_header_forms(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    _, headers, _ = await call(session, mock, request(mock={"fault": "429", "retry_after": 2}))
    assert headers["Retry-After"] == "2"
    assert "retry-after-ms" not in headers

    _, headers, _ = await call(
        session, mock, request(mock={"fault": "503", "retry_after_ms": 1500})
    )
    assert headers["retry-after-ms"] == "1500"
    assert "Retry-After" not in headers

    options = {"fault": "429", "retry_after": 30, "retry_after_date": True}
    _, headers, _ = await call(session, mock, request(mock=options))
    ahead = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp() - time.time()
    assert 25 < ahead <= 31

    _, headers, _ = await call(session, mock, request(mock={"fault": "500"}))
    assert "Retry-After" not in headers


async def test_x_mock_header_and_body_precedence(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    header = {"X-Mock": orjson.dumps({"fault": "429", "retry_after": 1}).decode()}
    status, headers, _ = await call(session, mock, request(), headers=header)
    assert status == 429
    assert headers["Retry-After"] == "1"
    status, _, _ = await call(session, mock, request(mock={"fault": "502"}), headers=header)
    assert status == 502
    status, _, body = await call(session, mock, request(), headers={"X-Mock": "{nope"})
    assert status == 400
    assert body["error"]["param"] == "mock"


async def test_api_key_is_enforced(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(MockConfig(api_key="sk-good")) as server:
        status, _, body = await call(session, server, request())
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer sk-bad"}
        assert (await call(session, server, request(), headers=wrong))[0] == 401
        right = {"Authorization": "Bearer sk-good"}
        assert (await call(session, server, request(), headers=right))[0] == 200


async def test_invalid_requests_get_400(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    status, _, body = await call(session, mock, {"messages": MESSAGES})
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "model"
    status, _, body = await call(session, mock, {"model": "m", "messages": "hi"})
    assert (status, body["error"]["param"]) == (400, "messages")
    status, _, body = await call(session, mock, request(mock={"fault": "418"}))
    assert status == 400
    url = f"{mock.base_url}/chat/completions"
    async with session.post(url, data=b"not json") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"


async def test_requests_are_recorded(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    body = request(mock={"content": "hi"}, temperature=0.2)
    await call(session, mock, body, headers={"X-Job-ID": "job-7"})
    [recorded] = mock.requests
    assert recorded.path == "/v1/chat/completions"
    assert recorded.body == body
    assert recorded.headers["x-job-id"] == "job-7"
    assert recorded.headers["content-type"] == "application/json"

    async with session.get(f"{mock.base_url[:-3]}/mock/requests") as resp:
        rows = await resp.json()
    assert rows == [
        {
            "path": recorded.path,
            "query": {},
            "headers": recorded.headers,
            "body": body,
            "peer": recorded.peer,
        }
    ]
    assert recorded.peer.startswith("127.0.0.1:")
    async with session.get(f"{mock.base_url[:-3]}/mock/stats") as resp:
        assert await resp.json() == {"total": 1, "faults": {}}
    async with session.post(f"{mock.base_url[:-3]}/mock/reset") as resp:
        assert resp.status == 200
    assert len(mock.requests) == 0
    assert mock.stats.total == 0
    async with session.get(f"{mock.base_url[:-3]}/healthz") as resp:
        assert resp.status == 200


async def test_route_without_v1_prefix_and_record_off(session: aiohttp.ClientSession) -> None:
    async with MockUpstream(MockConfig(record=False)) as server:
        url = server.base_url.removesuffix("/v1") + "/chat/completions"
        async with session.post(url, json=request()) as resp:
            assert resp.status == 200
            assert (await resp.json())["object"] == "chat.completion"
        assert len(server.requests) == 0
        assert server.stats.total == 1


async def test_latency_and_chunk_interval(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    started = time.perf_counter()
    await call(session, mock, request(mock={"latency": 0.2}))
    assert time.perf_counter() - started >= 0.2
    started = time.perf_counter()
    lines, _ = await stream(session, mock, request(mock={"chunk_interval": 0.05, "chunks": 4}))
    assert time.perf_counter() - started >= 0.05 * 4
    assert len(content_pieces(chunks_of(lines))) == 4


async def test_random_faults_follow_the_seed(session: aiohttp.ClientSession) -> None:
    config = MockConfig(fault_rate=0.5, random_faults=("500", "429"), seed=7)
    async with MockUpstream(config) as server:
        first = [(await call(session, server, request()))[0] for _ in range(20)]
        server.reset()
        second = [(await call(session, server, request()))[0] for _ in range(20)]
        assert first == second
        assert {200, 500, 429} == set(first)
        assert sum(server.stats.faults.values()) == sum(s != 200 for s in second)


def test_config_rejects_unknown_faults() -> None:
    with pytest.raises(ValueError, match="unknown mock faults"):
        MockConfig(random_faults=("500", "explode"))
    with pytest.raises(ValueError, match="fault_rate"):
        MockConfig(fault_rate=1.5)


def test_base_url_needs_a_started_server() -> None:
    with pytest.raises(RuntimeError):
        _ = MockUpstream().base_url


async def test_serve_runs_until_sigterm(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = f"from worker.mock.upstream import MockConfig, serve; serve(MockConfig(), port={port})"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.DEVNULL
    )
    try:
        for _ in range(100):
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    assert resp.status == 200
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("serve() never answered /healthz")
        process.terminate()
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_query_and_azure_paths_are_recorded_and_api_key_accepted(
    session: aiohttp.ClientSession,
) -> None:
    async with MockUpstream(MockConfig(api_key="sk-az")) as server:
        root = server.base_url.removesuffix("/v1")
        url = f"{root}/openai/deployments/mini/chat/completions?api-version=2024-10-21"
        async with session.post(url, json=request(), headers={"api-key": "sk-az"}) as resp:
            assert resp.status == 200
        async with session.post(url, json=request(), headers={"api-key": "sk-wrong"}) as resp:
            assert resp.status == 401
        first = server.requests[0]
        assert first.path == "/openai/deployments/mini/chat/completions"
        assert first.query == {"api-version": "2024-10-21"}
        assert first.headers["api-key"] == "sk-az"
