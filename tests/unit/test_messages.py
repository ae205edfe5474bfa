"""The contract's message models and the JSON Schemas generated from them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from worker.messages import (
    MAX_CUSTOM_ID,
    BatchRequest,
    ChatCompletionRequest,
    EmbeddingsRequest,
    ErrorCode,
    JobDelta,
    JobResult,
    ResultMetadata,
    Usage,
    custom_id_of,
    render_schemas,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

# Every body field of the API reference (/v1/chat/completions, "Request").
DOCUMENTED_FIELDS = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "tools",
    "tool_choice",
    "response_format",
    "seed",
    "reasoning_effort",
    "modalities",
    "audio",
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

FULL_BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": "answer in English"},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}], "name": "alice"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "the user wants the weather",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "call_1"},
    ],
    "temperature": 0.7,
    "top_p": 0.9,
    "n": 2,
    "stream": True,
    "stream_options": {"include_usage": True},
    "stop": "\n\n",
    "max_tokens": 256,
    "max_completion_tokens": 256,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logit_bias": {"50256": -100},
    "user": "user-42",
    "tools": [WEATHER_TOOL],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {}}},
    "seed": 7,
    "reasoning_effort": "medium",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
}


def body(**changes: Any) -> dict[str, Any]:
    """A minimal valid body with ``changes`` applied."""
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], **changes}


def valid(data: dict[str, Any]) -> bool:
    try:
        ChatCompletionRequest.model_validate(data)
    except ValidationError:
        return False
    return True


# --- schemas -------------------------------------------------------------------------------


def test_schemas_are_current() -> None:
    rendered = render_schemas()
    on_disk = {path.name: path.read_bytes() for path in SCHEMAS.glob("*.json")}
    assert on_disk == rendered, "schemas/ is stale: run `make schemas` and commit the result"


def test_schemas_are_json_schema() -> None:
    for name, text in render_schemas().items():
        schema = orjson.loads(text)
        assert schema["type"] == "object", name
        assert "properties" in schema, name


def test_request_schema_states_the_ranges() -> None:
    schema = orjson.loads(render_schemas()["request.schema.json"])
    fields = schema["$defs"]["ChatCompletionRequest"]["properties"]
    temperature = fields["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    assert fields["n"]["anyOf"][0]["minimum"] == 1
    assert set(DOCUMENTED_FIELDS) <= set(fields)


# --- request -------------------------------------------------------------------------------


def test_model_knows_every_documented_field() -> None:
    assert set(ChatCompletionRequest.model_fields) == DOCUMENTED_FIELDS


def test_every_documented_field_accepted() -> None:
    request = ChatCompletionRequest.model_validate(FULL_BODY)
    assert request.model_extra == {}
    dumped = request.model_dump(mode="json", exclude_unset=True)
    assert dumped == FULL_BODY


def test_batch_line_accepted() -> None:
    line = {
        "custom_id": "order-42",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": FULL_BODY,
    }
    request = BatchRequest.model_validate_json(orjson.dumps(line))
    assert request.custom_id == "order-42"
    assert request.body.model == "gpt-4o-mini"


def test_batch_line_needs_only_a_body() -> None:
    request = BatchRequest.model_validate({"body": body()})
    assert (request.custom_id, request.method, request.url) == (None, None, None)


@pytest.mark.parametrize(
    "line",
    [
        {},
        {"custom_id": "x"},
        {"body": "not an object"},
        {"body": {"messages": [{"role": "user", "content": "Hi"}]}},
        {"body": {"model": "m"}},
        {"body": {"model": "m", "messages": []}},
        {"body": {"model": "", "messages": [{"role": "user", "content": "Hi"}]}},
        {"body": {"model": "m", "messages": [{"content": "no role"}]}},
        {"body": {"model": "m", "messages": [{"role": "robot", "content": "Hi"}]}},
        {"body": body(), "custom_id": 42},
    ],
)
def test_batch_line_rejected(line: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        BatchRequest.model_validate(line)


def test_unknown_body_fields_are_kept() -> None:
    data = body(
        top_k=40,
        repetition_penalty=1.1,
        chat_template_kwargs={"enable_thinking": False},
        messages=[{"role": "user", "content": "Hi", "cache_control": {"type": "ephemeral"}}],
    )
    request = ChatCompletionRequest.model_validate(data)
    assert request.model_extra == {
        "top_k": 40,
        "repetition_penalty": 1.1,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    assert request.model_dump(exclude_unset=True) == data


def test_validation_does_not_change_the_input() -> None:
    data = copy.deepcopy(FULL_BODY)
    ChatCompletionRequest.model_validate(data)
    assert data == FULL_BODY


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0),
        ("temperature", 2),
        ("top_p", 0),
        ("top_p", 1),
        ("n", 1),
        ("n", 8),
        ("presence_penalty", -2),
        ("presence_penalty", 2),
        ("frequency_penalty", -2),
        ("frequency_penalty", 2),
        ("tool_choice", "none"),
        ("tool_choice", "auto"),
        ("tool_choice", "required"),
        ("tool_choice", {"type": "function", "function": {"name": "get_weather"}}),
        ("reasoning_effort", "low"),
        ("reasoning_effort", "medium"),
        ("reasoning_effort", "high"),
        ("modalities", []),
        ("modalities", ["text"]),
        ("modalities", ["audio"]),
        ("modalities", ["text", "audio"]),
        ("stop", ["END", "STOP"]),
    ],
)
def test_in_range_accepted(field: str, value: Any) -> None:
    assert valid(body(**{field: value}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.01),
        ("temperature", 2.01),
        ("top_p", -0.1),
        ("top_p", 1.5),
        ("n", 0),
        ("n", -1),
        ("n", 1.5),
        ("presence_penalty", -2.5),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("frequency_penalty", 3),
        ("tool_choice", "any"),
        ("tool_choice", "function"),
        ("tool_choice", {"type": "function"}),
        ("tool_choice", {"type": "function", "function": {}}),
        ("tool_choice", {"type": "function", "function": {"name": ""}}),
        ("tool_choice", {"type": "web_search", "function": {"name": "f"}}),
        ("reasoning_effort", "extreme"),
        ("reasoning_effort", "LOW"),
        ("modalities", ["video"]),
        ("modalities", ["text", "image"]),
        ("modalities", "text"),
        ("tools", [{"type": "function", "function": {"description": "no name"}}]),
        ("tools", [{"type": "retrieval", "function": {"name": "f"}}]),
        ("messages", [{"role": "user", "content": 42}]),
        ("stream", "yes please"),
    ],
)
def test_out_of_range_rejected(field: str, value: Any) -> None:
    assert not valid(body(**{field: value}))


def test_range_error_names_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        BatchRequest.model_validate({"body": body(temperature=3)})
    assert caught.value.errors()[0]["loc"][:2] == ("body", "temperature")


RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}


@st.composite
def out_of_range(draw: st.DrawFn) -> tuple[str, float]:
    field = draw(st.sampled_from(sorted(RANGES)))
    low, high = RANGES[field]
    value = draw(
        st.floats(max_value=low, exclude_max=True, allow_nan=False, allow_infinity=False)
        | st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False)
    )
    return field, value


@hypothesis_settings(database=None, max_examples=200)
@given(
    temperature=st.floats(0, 2),
    top_p=st.floats(0, 1),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
)
def test_any_in_range_sampling_validates(
    temperature: float, top_p: float, presence_penalty: float, frequency_penalty: float
) -> None:
    request = ChatCompletionRequest.model_validate(
        body(
            temperature=temperature,
            top_p=top_p,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
        )
    )
    assert request.temperature == temperature
    assert request.top_p == top_p


@hypothesis_settings(database=None, max_examples=200)
@given(case=out_of_range())
def test_any_out_of_range_sampling_fails(case: tuple[str, float]) -> None:
    field, value = case
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body(**{field: value}))
    assert caught.value.errors()[0]["loc"][0] == field


# --- results and deltas --------------------------------------------------------------------


def test_result_document_round_trips() -> None:
    document = {
        "id": "job-1",
        "custom_id": "order-42",
        "type": "result",
        "response": {
            "status_code": 200,
            "request_id": "req-1",
            "body": {"object": "chat.completion", "choices": []},
        },
        "error": None,
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 12,
            "total_tokens": 21,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        "metadata": {
            "attempts": 1,
            "model": "gpt-4o-mini",
            "latency_ms": 812.4,
            "ttft_ms": None,
            "worker": "host/1",
            "finished_at": "2025-11-25T18:00:00Z",
            "upstream": "openai",
            "lane": "chat.requests",
            "tenant": None,
            "rate_limit_wait_ms": 0.0,
            "calls": 1,
            "cache": None,
            "cost": {
                "input": 0.0000014,
                "output": 0.0000072,
                "total": 0.0000086,
                "currency": "USD",
                "source": "genai-prices",
            },
        },
    }
    result = JobResult.model_validate(document)
    assert result.ok
    assert orjson.loads(result.model_dump_json()) == document


def test_failed_result() -> None:
    result = JobResult.model_validate(
        {
            "id": "job-1",
            "error": {"code": "rate_limited", "message": "slow down", "status_code": 429},
            "metadata": {"attempts": 5, "worker": "host/1", "finished_at": "2025-11-25T18:00Z"},
        }
    )
    assert not result.ok
    assert result.error is not None and result.error.code is ErrorCode.RATE_LIMITED
    assert result.usage is None


def test_usage_keeps_unknown_detail_fields() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "cost": 0.001}
    document = {
        "id": "j",
        "usage": usage,
        "metadata": {"attempts": 1, "worker": "w", "finished_at": "2025-11-25T18:00:00Z"},
    }
    result = JobResult.model_validate(document)
    assert result.usage is not None
    assert result.usage.model_dump(exclude_unset=True) == usage


def test_delta_document() -> None:
    document = {
        "id": "job-1",
        "custom_id": "order-42",
        "type": "delta",
        "attempt": 1,
        "seq": 0,
        "choices": [
            {
                "index": 0,
                "delta": {
                    "content": "Hel",
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a"'},
                        }
                    ],
                },
                "finish_reason": None,
            }
        ],
    }
    assert orjson.loads(JobDelta.model_validate(document).model_dump_json()) == document


# --- strict types and the custom_id limit (issue 10) --------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", "false"),
        ("stream", "true"),
        ("stream", 0),
        ("stream", 1),
        ("temperature", True),
        ("temperature", "1"),
        ("top_p", False),
        ("top_p", "0.5"),
        ("presence_penalty", True),
        ("frequency_penalty", "1"),
        ("n", True),
        ("n", "2"),
        ("n", 2.0),
        ("max_tokens", True),
        ("max_tokens", "100"),
        ("max_completion_tokens", "100"),
        ("seed", "7"),
        ("seed", False),
    ],
)
def test_lax_values_are_rejected(field: str, value: Any) -> None:
    """The raw body goes upstream: a value the worker would read otherwise than the upstream
    (``"stream": "false"`` is truthy text) must fail ``invalid_message``."""
    assert not valid(body(**{field: value}))


@pytest.mark.parametrize(
    ("field", "value"),
    [("stream", False), ("temperature", 1), ("top_p", 0), ("seed", -3), ("max_tokens", 0)],
)
def test_strict_fields_take_their_json_types(field: str, value: Any) -> None:
    assert valid(body(**{field: value}))


def test_custom_id_limit() -> None:
    assert BatchRequest.model_validate({"custom_id": "x" * MAX_CUSTOM_ID, "body": body()})
    with pytest.raises(ValidationError, match=str(MAX_CUSTOM_ID)):
        BatchRequest.model_validate({"custom_id": "x" * (MAX_CUSTOM_ID + 1), "body": body()})


def test_result_usage_counts_may_be_null() -> None:
    usage = Usage.model_validate({"prompt_tokens": None, "completion_tokens": 2})
    assert usage.prompt_tokens is None and usage.completion_tokens == 2


# --- embeddings (contract §18) ------------------------------------------------------------------


def embeddings_line(**changes: Any) -> dict[str, Any]:
    body = {"model": "text-embedding-3-small", "input": "a cat", **changes}
    return {"custom_id": "e-1", "method": "POST", "url": "/v1/embeddings", "body": body}


@pytest.mark.parametrize(
    "given",
    [
        "a cat",
        ["a cat", "a dog"],
        [1, 2, 3],
        [0],
        [[1, 2], [3]],
        ["x" * 10_000],
    ],
    ids=["string", "strings", "token-array", "token-zero", "token-arrays", "long-string"],
)
def test_every_embeddings_input_shape_accepted(given: Any) -> None:
    request = BatchRequest.model_validate(embeddings_line(input=given))
    assert isinstance(request.body, EmbeddingsRequest)
    assert request.body.input == given
    assert request.endpoint == "embeddings"


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("", "must not be an empty string"),
        ([], "must be a string or a non-empty list"),
        ({"text": "a"}, "must be a string or a non-empty list"),
        (42, "must be a string or a non-empty list"),
        (None, "must be a string or a non-empty list"),
        ([""], "item 0 must be a non-empty string"),
        (["a", ""], "item 1 must be a non-empty string, like item 0"),
        (["a", 1], "item 1 must be a non-empty string, like item 0"),
        ([1, -1], "item 1 must be a token id (an integer >= 0), like item 0"),
        ([1, "a"], "item 1 must be a token id"),
        ([1, 2.0], "item 1 must be a token id"),
        ([[]], "item 0 must be a non-empty token array"),
        ([[1], []], "item 1 must be a non-empty token array"),
        ([[1], [True]], "item 1 must be a non-empty token array"),
        ([[1], 2], "item 1 must be a non-empty token array"),
        ([True], "must hold strings, token ids or token arrays"),
        ([1.5], "must hold strings, token ids or token arrays"),
        ([{"text": "a"}], "must hold strings, token ids or token arrays"),
    ],
)
def test_embeddings_input_rejected_with_one_error(given: Any, problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        BatchRequest.model_validate(embeddings_line(input=given))
    (error,) = caught.value.errors()
    assert error["loc"] == ("body", "input")
    assert error["msg"].startswith(problem), error["msg"]


def test_embeddings_input_is_required() -> None:
    line = embeddings_line()
    del line["body"]["input"]
    with pytest.raises(ValidationError, match=r"body\.input"):
        BatchRequest.model_validate(line)


@pytest.mark.parametrize("stream", [True, "false", 0, 1, {}])
def test_embeddings_are_never_streamed(stream: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        BatchRequest.model_validate(embeddings_line(stream=stream))
    (error,) = caught.value.errors()
    assert error["loc"] == ("body", "stream")
    assert "never streamed" in error["msg"]


@pytest.mark.parametrize("stream", [False, None])
def test_embeddings_stream_false_or_null_is_harmless(stream: Any) -> None:
    request = BatchRequest.model_validate(embeddings_line(stream=stream))
    assert isinstance(request.body, EmbeddingsRequest) and not request.body.stream


@pytest.mark.parametrize(
    ("changes", "ok"),
    [
        ({"dimensions": 1}, True),
        ({"dimensions": 3072}, True),
        ({"dimensions": 0}, False),
        ({"dimensions": -8}, False),
        ({"dimensions": 8.0}, False),
        ({"dimensions": "8"}, False),
        ({"dimensions": True}, False),
        ({"encoding_format": "float"}, True),
        ({"encoding_format": "base64"}, True),
        ({"encoding_format": "int8"}, False),
        ({"user": "u-1"}, True),
        ({"user": 7}, False),
        ({"model": ""}, False),
    ],
)
def test_embeddings_parameters(changes: dict[str, Any], ok: bool) -> None:
    try:
        BatchRequest.model_validate(embeddings_line(**changes))
    except ValidationError:
        assert not ok
    else:
        assert ok


def test_embeddings_unknown_fields_are_kept() -> None:
    line = embeddings_line(input_type="query", truncate="END")
    request = BatchRequest.model_validate(line)
    assert request.body.model_extra == {"input_type": "query", "truncate": "END"}


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        (None, "chat"),
        ("/v1/chat/completions", "chat"),
        ("/chat/completions", "chat"),
        ("/v1/embeddings", "embeddings"),
        ("/embeddings", "embeddings"),
        ("/v1/completions", "chat"),  # decode_job refuses the url itself (invalid_request)
    ],
)
def test_the_url_decides_the_body(url: str | None, endpoint: str) -> None:
    embeddings = {"model": "m", "input": "a cat"}
    chat = body()
    fits, other = (embeddings, chat) if endpoint == "embeddings" else (chat, embeddings)
    assert BatchRequest.model_validate({"url": url, "body": fits}).endpoint == endpoint
    with pytest.raises(ValidationError):
        BatchRequest.model_validate({"url": url, "body": other})


def test_request_schema_documents_both_bodies() -> None:
    schema = orjson.loads(render_schemas()["request.schema.json"])
    refs = {option["$ref"] for option in schema["properties"]["body"]["anyOf"]}
    assert refs == {"#/$defs/ChatCompletionRequest", "#/$defs/EmbeddingsRequest"}
    fields = schema["$defs"]["EmbeddingsRequest"]["properties"]
    assert {"model", "input", "dimensions", "encoding_format", "user"} <= set(fields)
    assert fields["dimensions"]["anyOf"][0]["minimum"] == 1
    assert fields["stream"]["anyOf"][0]["const"] is False
    assert "/v1/embeddings" in schema["properties"]["url"]["description"]


def test_item27_the_documented_result_lists_every_metadata_field() -> None:
    """docs/messages.md's result example shows every field of ``metadata``."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "messages.md").read_text()
    example = text.split("## Result", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    metadata = orjson.loads("{" + example.split('"metadata": {', 1)[1].rsplit("}", 1)[0])
    assert set(metadata) == set(ResultMetadata.model_fields)
    ResultMetadata.model_validate(metadata)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"custom_id": "a\\"b", "body": {}}', 'a"b'),
        (b'{"custom_id": 3, "body": {}}', None),
        (b'{"body": {}}', None),
        (b"not json", None),
    ],
)
def test_custom_id_of_a_body(data: bytes, expected: str | None) -> None:
    assert custom_id_of(data) == expected


def test_custom_id_of_a_large_body_reads_only_its_first_bytes() -> None:
    first = b'{"custom_id": "x\\u00e9", "body": {"messages": "' + b"y" * 2_000_000 + b'"}}'
    assert custom_id_of(first, parse_up_to=0) == "xé"
    last = b'{"body": {"messages": "' + b"y" * 2_000_000 + b'"}, "custom_id": "z"}'
    assert custom_id_of(last, parse_up_to=0) is None
