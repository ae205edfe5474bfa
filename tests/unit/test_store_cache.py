"""The answer cache: keys, the x-cache switch, sizes, and deltas made from a cached answer."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.messages import ChatCompletionRequest
from worker.store import (
    AnswerCache,
    CachedAnswer,
    Circuit,
    Skipped,
    cache_key,
    deltas_from_completion,
    enabled_for,
)
from worker.store.backends import MemoryBackend

pytestmark = pytest.mark.unit

BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Hi"}],
    "temperature": 0.5,
}


def answer(content: str = "Hello", status: int = 200) -> CachedAnswer:
    body = {
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content},
             "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }  # fmt: skip
    return CachedAnswer(status, "req-1", body)


# --- keys --------------------------------------------------------------------------------


def test_stream_and_stream_options_do_not_change_the_key() -> None:
    plain = cache_key("acme", BODY)
    streamed = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    assert cache_key("acme", streamed) == plain
    assert cache_key("acme", {**BODY, "stream": False}) == plain


def test_key_order_does_not_change_the_key() -> None:
    reordered = dict(reversed(list(BODY.items())))
    reordered["messages"] = [{"content": "Hi", "role": "user"}]
    assert cache_key("acme", reordered) == cache_key("acme", BODY)


def test_a_validated_request_has_the_key_of_its_raw_body() -> None:
    request = ChatCompletionRequest.model_validate({**BODY, "stream": True})
    assert cache_key("acme", request) == cache_key("acme", BODY)


@pytest.mark.parametrize(
    ("tenant", "body"),
    [
        ("other", BODY),
        (None, BODY),
        ("acme", {**BODY, "model": "gpt-4o"}),
        ("acme", {**BODY, "temperature": 0.6}),
        ("acme", {**BODY, "messages": [{"role": "user", "content": "Hi!"}]}),
        ("acme", {**BODY, "seed": 1}),
    ],
)
def test_another_tenant_model_or_body_is_another_key(tenant: str | None, body: Any) -> None:
    assert cache_key(tenant, body) != cache_key("acme", BODY)


def test_the_key_is_a_sha256() -> None:
    key = cache_key("acme", BODY)
    assert len(key) == 64
    assert int(key, 16) >= 0


# --- the switch --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "default", "expected"),
    [
        (None, "off", False),
        (None, "on", True),
        (None, True, True),
        (True, "off", True),
        (False, "on", False),
        ("true", "off", True),
        ("False", "on", False),
        (b"true", "off", True),
        ("maybe", "on", True),
        ("maybe", "off", False),
        (1, "off", False),
    ],
)
def test_enabled_for(header: object, default: bool | str, expected: bool) -> None:
    assert enabled_for(header, default) is expected


# --- get and put -------------------------------------------------------------------------


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
def cache(backend: MemoryBackend) -> AnswerCache:
    return AnswerCache(backend, Circuit(errors=backend.errors), ttl=60, max_bytes=2000)


async def test_miss_put_hit(cache: AnswerCache, backend: MemoryBackend) -> None:
    key = cache_key("acme", BODY)
    assert await cache.get(key) is None
    assert await cache.put(key, answer())
    hit = await cache.get(key)
    assert hit == answer()
    assert isinstance(hit, CachedAnswer)
    assert hit.usage == {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
    assert backend.keys() == [f"cw:cache:{key}"]
    metrics = cache.metrics
    assert (metrics.cache_misses, metrics.cache_stored, metrics.cache_hits) == (1, 1, 1)


async def test_only_successes_are_kept(cache: AnswerCache) -> None:
    assert not await cache.put("k", answer(status=500))
    assert not await cache.put("k", CachedAnswer(200, None, {"error": "no choices"}))
    assert await cache.get("k") is None
    assert cache.metrics.cache_stored == 0


async def test_an_answer_over_the_bound_is_not_kept(cache: AnswerCache) -> None:
    assert not await cache.put("k", answer("x" * 2000))
    assert cache.metrics.too_large == {"answer": 1}


async def test_something_unreadable_is_a_miss(cache: AnswerCache, backend: MemoryBackend) -> None:
    await backend.put(cache.key("k"), b'{"not": "an answer"}', 60)
    assert await cache.get("k") is None
    await backend.put(cache.key("k"), b"\xff", 60)
    assert await cache.get("k") is None


async def test_down_is_skipped(cache: AnswerCache, backend: MemoryBackend) -> None:
    backend.fail = True
    assert isinstance(await cache.get("k"), Skipped)
    assert not await cache.put("k", answer())
    assert cache.metrics.skipped == {"cache_get": 1, "cache_put": 1}
    assert cache.metrics.cache_misses == 0


# --- deltas from a cached answer ---------------------------------------------------------


def assemble(deltas: list[list[dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """A plain stream assembler: per choice index, strings concatenate, tool calls merge
    by index (id and type taken, name and arguments concatenated), the last finish_reason."""
    choices: dict[int, dict[str, Any]] = {}
    for message in deltas:
        for choice in message:
            state = choices.setdefault(
                choice["index"], {"message": {}, "calls": {}, "finish_reason": None}
            )
            for field, value in choice["delta"].items():
                if field == "tool_calls":
                    for fragment in value:
                        call = state["calls"].setdefault(
                            fragment["index"], {"function": {"name": "", "arguments": ""}}
                        )
                        for key in ("id", "type"):
                            if fragment.get(key) is not None:
                                call[key] = fragment[key]
                        for key in ("name", "arguments"):
                            call["function"][key] += fragment["function"].get(key) or ""
                elif field == "role":
                    state["message"]["role"] = value
                else:
                    state["message"][field] = state["message"].get(field, "") + value
            if choice.get("finish_reason") is not None:
                state["finish_reason"] = choice["finish_reason"]
    for state in choices.values():
        if state["calls"]:
            state["message"]["tool_calls"] = [state["calls"][i] for i in sorted(state["calls"])]
        del state["calls"]
    return choices


text = st.text(max_size=40)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.text(min_size=1, max_size=8),
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": st.text(min_size=1, max_size=8), "arguments": text}
            ),
        }
    ),
    min_size=1,
    max_size=3,
)
messages = st.fixed_dictionaries(
    {"role": st.just("assistant")},
    optional={
        "content": text,
        "reasoning_content": text,
        "refusal": text,
        "tool_calls": tool_calls,
    },
)
completions = st.lists(
    st.tuples(messages, st.sampled_from(["stop", "length", "tool_calls", "content_filter"])),
    min_size=1,
    max_size=3,
).map(
    lambda choices: {
        "object": "chat.completion",
        "choices": [
            {"index": i, "message": message, "finish_reason": reason}
            for i, (message, reason) in enumerate(choices)
        ],
    }
)


@given(completions)
def test_deltas_fold_back_into_the_cached_answer(body: dict[str, Any]) -> None:
    deltas = deltas_from_completion(body)
    assert len(deltas) == len(body["choices"])  # one delta message carries every choice
    folded = assemble([deltas])
    for choice in body["choices"]:
        got = folded[choice["index"]]
        assert got["message"] == choice["message"]
        assert got["finish_reason"] == choice["finish_reason"]


def test_deltas_rename_reasoning_and_skip_nulls() -> None:
    body = {
        "choices": [
            {"index": 0, "finish_reason": "stop", "logprobs": {"content": []},
             "message": {"role": "assistant", "content": None, "reasoning": "hmm",
                         "tool_calls": None}}
        ]
    }  # fmt: skip
    assert deltas_from_completion(body) == [
        {"index": 0, "delta": {"role": "assistant", "reasoning_content": "hmm"},
         "finish_reason": "stop", "logprobs": {"content": []}}
    ]  # fmt: skip


def test_no_choices_no_deltas() -> None:
    assert deltas_from_completion({"choices": []}) == []
    assert deltas_from_completion({}) == []
