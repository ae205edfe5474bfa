"""The bundled mock's ``POST /v1/embeddings``: deterministic vectors, base64, usage, faults
(over real loopback HTTP, as the worker calls it)."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from worker.mock.budget import request_tokens
from worker.mock.embeddings import DEFAULT_DIMENSIONS, embedding_vector, input_items
from worker.mock.upstream import MockConfig, MockUpstream

MODEL = "text-embedding-3-small"


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    async with MockUpstream(MockConfig(api_key="sk-test")) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-test"}) as client:
        yield client


async def embed(
    session: aiohttp.ClientSession, server: MockUpstream, **body: Any
) -> tuple[int, Any]:
    async with session.post(f"{server.base_url}/embeddings", json={"model": MODEL, **body}) as resp:
        raw = await resp.read()
        try:
            return resp.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, raw


def vectors(answer: dict[str, Any]) -> list[list[float]]:
    assert [item["index"] for item in answer["data"]] == list(range(len(answer["data"])))
    return [item["embedding"] for item in answer["data"]]


def decoded(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


async def test_the_answer_has_openai_shape_and_usage(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    status, answer = await embed(session, mock, input=["a cat sat", "a dog"])
    assert status == 200
    assert answer["object"] == "list" and answer["model"] == MODEL
    assert [item["object"] for item in answer["data"]] == ["embedding", "embedding"]
    assert [len(v) for v in vectors(answer)] == [DEFAULT_DIMENSIONS] * 2
    assert answer["usage"] == {"prompt_tokens": 3 + 2, "total_tokens": 3 + 2}
    (recorded,) = mock.requests
    assert recorded.path == "/v1/embeddings" and recorded.body["input"] == ["a cat sat", "a dog"]
    assert mock.stats.total == 1


async def test_vectors_are_deterministic_unit_and_per_item(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    _, first = await embed(session, mock, input=["a cat", "a dog"])
    _, again = await embed(session, mock, input=["a dog", "a cat"], model="another-model")
    _, alone = await embed(session, mock, input="a cat")
    cat, dog = vectors(first)
    assert vectors(again) == [dog, cat]  # an item's vector depends on the item alone
    assert vectors(alone) == [cat]
    assert cat != dog
    for vector in (cat, dog):
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-6)
        assert all(-1.0 <= x <= 1.0 for x in vector)


@pytest.mark.parametrize(
    ("given", "count", "tokens"),
    [
        ("one string of five words", 1, 5),
        (["a", "b c", "d e f"], 3, 6),
        ([101, 2023, 102], 1, 3),
        ([[101, 2023], [7], [1, 2, 3, 4]], 3, 7),
    ],
    ids=["string", "strings", "token-array", "token-arrays"],
)
async def test_every_input_shape_is_served_and_counted(
    mock: MockUpstream, session: aiohttp.ClientSession, given: Any, count: int, tokens: int
) -> None:
    status, answer = await embed(session, mock, input=given)
    assert status == 200, answer
    assert len(answer["data"]) == count
    assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


@pytest.mark.parametrize("dimensions", [1, 3, 256, 1536])
async def test_dimensions_are_honoured(
    mock: MockUpstream, session: aiohttp.ClientSession, dimensions: int
) -> None:
    status, answer = await embed(session, mock, input=["a", "b"], dimensions=dimensions)
    assert status == 200
    assert [len(v) for v in vectors(answer)] == [dimensions, dimensions]


def test_a_shortened_vector_is_the_normalised_start_of_the_long_one() -> None:
    long, short = embedding_vector("a cat", 64), embedding_vector("a cat", 8)
    norm = math.sqrt(math.fsum(x * x for x in long[:8]))
    assert short == pytest.approx([x / norm for x in long[:8]], rel=1e-5)


async def test_base64_is_the_float32_little_endian_of_the_float_vectors(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    given = ["a cat", "a dog", "a bird"]
    _, floats = await embed(session, mock, input=given, dimensions=16)
    _, packed = await embed(session, mock, input=given, dimensions=16, encoding_format="base64")
    texts = [item["embedding"] for item in packed["data"]]
    assert all(isinstance(text, str) for text in texts)
    assert [decoded(text) for text in texts] == vectors(floats)  # exactly, not approximately
    assert packed["usage"] == floats["usage"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["a", 1]}, "input"),
        ({"input": [[1], []]}, "input"),
        ({"input": [-1]}, "input"),
        ({"input": [True]}, "input"),
        ({}, "input"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "dimensions": 100_000}, "dimensions"),
        ({"input": "a", "dimensions": 8.0}, "dimensions"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "model": ""}, "model"),
    ],
)
async def test_a_bad_request_is_a_400_naming_the_parameter(
    mock: MockUpstream, session: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    status, answer = await embed(session, mock, **body)
    assert status == 400
    assert answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"


async def test_the_key_is_checked(mock: MockUpstream) -> None:
    async with aiohttp.ClientSession() as anonymous:
        status, answer = await embed(anonymous, mock, input="a")
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "path", ["/v1/embeddings", "/embeddings", "/openai/deployments/e5/embeddings"]
)
async def test_the_paths_openai_and_azure_use(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str
) -> None:
    url = mock.base_url.removesuffix("/v1") + path
    async with session.post(url, json={"model": MODEL, "input": "a"}) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("fault", ["400", "401", "404", "429", "500", "503"])
async def test_status_faults_as_for_chat(
    mock: MockUpstream, session: aiohttp.ClientSession, fault: str
) -> None:
    status, answer = await embed(session, mock, input="a", mock={"fault": fault})
    assert status == int(fault)
    assert fault in answer["error"]["message"]
    assert mock.stats.faults[fault] == 1


async def test_faults_honour_times_and_retry_after(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    options = {"fault": "503", "times": 2, "key": "k", "retry_after": 2}
    statuses = [(await embed(session, mock, input="a", mock=options))[0] for _ in range(3)]
    assert statuses == [503, 503, 200]


@pytest.mark.parametrize(
    ("fault", "status"), [("insufficient_quota", 429), ("error_event", 500), ("error_body", 200)]
)
async def test_other_faults_of_a_plain_call(
    mock: MockUpstream, session: aiohttp.ClientSession, fault: str, status: int
) -> None:
    got, answer = await embed(session, mock, input="a", mock={"fault": fault})
    assert got == status and "error" in answer and "data" not in answer


async def test_malformed_disconnect_and_stall(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    status, raw = await embed(session, mock, input="a", mock={"fault": "malformed"})
    assert status == 200 and isinstance(raw, bytes)
    with pytest.raises(aiohttp.ClientError):
        await embed(session, mock, input="a", mock={"fault": "disconnect"})
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.3):
            await embed(session, mock, input="a", mock={"fault": "stall", "stall": 5})
    status, _ = await embed(session, mock, input="a", mock={"fault": "stall", "stall": 0.05})
    assert status == 200


async def test_latency_is_honoured(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, _ = await embed(session, mock, input="a", mock={"latency": 0.2})
    assert status == 200 and loop.time() - started >= 0.2


async def test_a_stream_flag_is_ignored(mock: MockUpstream, session: aiohttp.ClientSession) -> None:
    status, answer = await embed(session, mock, input="a", stream=True)
    assert status == 200 and answer["object"] == "list"


def test_input_items_and_the_budgets_token_count() -> None:
    assert input_items("a") == ["a"]
    assert input_items([1, 2]) == [[1, 2]]
    assert input_items([[1], [2, 3]]) == [[1], [2, 3]]
    assert input_items(["a", [1]]) is None
    assert request_tokens({"model": "m", "input": "x" * 40}) == 10
    assert request_tokens({"model": "m", "input": ["x" * 8, "y" * 4]}) == 3
    assert request_tokens({"model": "m", "input": [[1, 2], [3]]}) == 3
    assert request_tokens({"model": "m", "input": [5, 6, 7, 8]}) == 4
