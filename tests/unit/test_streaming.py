"""Stream chunks → coalesced deltas → the assembled ``chat.completion``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from worker.stream.assemble import CompletionAssembler, MalformedChunk
from worker.stream.relay import DeltaStream


def chunk(
    content: str | None = None,
    *,
    index: int = 0,
    finish_reason: str | None = None,
    **delta: Any,
) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1732500000,
        "model": "gpt-4o-mini",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
        "usage": None,
    }


USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": 3,
    "total_tokens": 12,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 2},
}
USAGE_CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}


def assemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    assembler = CompletionAssembler()
    for c in chunks:
        assembler.add(c)
    return assembler.completion()


# --- CompletionAssembler -----------------------------------------------------------------------


def test_assembles_content_and_usage() -> None:
    completion = assemble(
        [
            chunk(role="assistant", content=""),
            chunk("Hel"),
            chunk("lo"),
            chunk(", world"),
            chunk(finish_reason="stop"),
            USAGE_CHUNK,
        ]
    )
    assert completion == {
        "object": "chat.completion",
        "id": "chatcmpl-1",
        "created": 1732500000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, world"},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }


def test_usage_chunk_with_empty_choices_sets_usage_only() -> None:
    assembler = CompletionAssembler()
    assembler.add(chunk("Hi", finish_reason="stop"))
    assembler.add(USAGE_CHUNK)
    assert assembler.usage == USAGE
    assert assembler.chunks == 2
    assert len(assembler.completion()["choices"]) == 1


def test_no_usage_chunk_means_null_usage() -> None:
    completion = assemble([chunk("Hi", finish_reason="stop")])
    assert completion["usage"] is None


def test_reasoning_content_and_its_reasoning_alias() -> None:
    completion = assemble(
        [
            chunk(reasoning_content="Let me "),
            chunk(reasoning="think. "),
            chunk(reasoning_content="Done."),
            chunk("42", finish_reason="stop"),
        ]
    )
    message = completion["choices"][0]["message"]
    assert message["reasoning_content"] == "Let me think. Done."
    assert message["content"] == "42"


def test_tool_calls_merged_by_index() -> None:
    completion = assemble(
        [
            chunk(
                role="assistant",
                tool_calls=[
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ],
            ),
            chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
            chunk(
                tool_calls=[
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    }
                ]
            ),
            chunk(tool_calls=[{"index": 0, "function": {"arguments": '"Oslo"}'}}]),
            chunk(finish_reason="tool_calls"),
        ]
    )
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            },
        ],
    }


def test_tool_call_without_type_defaults_to_function() -> None:
    completion = assemble(
        [chunk(tool_calls=[{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}])]
    )
    assert completion["choices"][0]["message"]["tool_calls"][0]["type"] == "function"


def test_several_choices() -> None:
    completion = assemble(
        [
            chunk(role="assistant", content="", index=0),
            chunk(role="assistant", content="", index=1),
            chunk("A", index=1),
            chunk("B", index=0),
            chunk("C", index=1),
            chunk("D", index=0, finish_reason="length"),
            chunk(index=1, finish_reason="stop"),
            USAGE_CHUNK,
        ]
    )
    assert [
        (c["index"], c["message"]["content"], c["finish_reason"]) for c in completion["choices"]
    ] == [(0, "BD", "length"), (1, "AC", "stop")]


def test_missing_finish_reason_and_role() -> None:
    completion = assemble([chunk("Hi"), chunk(" there")])
    choice = completion["choices"][0]
    assert choice["finish_reason"] is None
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Hi there"


def test_empty_stream() -> None:
    completion = assemble([])
    assert completion == {"object": "chat.completion", "choices": [], "usage": None}


# --- deltas taken from the assembler ------------------------------------------------------------


def test_take_delta_coalesces_chunks() -> None:
    buffer = CompletionAssembler()
    assert buffer.take_delta() == []
    assert buffer.add(chunk(role="assistant", content="")) is False
    assert buffer.take_delta() == []
    assert buffer.add(chunk("Hel")) is True
    assert buffer.add(chunk("lo", reasoning="r")) is True
    assert buffer.add(chunk(index=1, content="x")) is True
    assert buffer.add(chunk(finish_reason="stop")) is True
    assert buffer.add(USAGE_CHUNK) is False
    assert buffer.take_delta() == [
        {
            "index": 0,
            "delta": {"content": "Hello", "reasoning_content": "r"},
            "finish_reason": "stop",
        },
        {"index": 1, "delta": {"content": "x"}, "finish_reason": None},
    ]
    assert buffer.take_delta() == []


def test_take_delta_merges_tool_call_fragments_within_a_delta() -> None:
    buffer = CompletionAssembler()
    buffer.add(
        chunk(
            tool_calls=[{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}]
        )
    )
    buffer.add(chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"a"'}}]))
    buffer.add(chunk(tool_calls=[{"index": 0, "function": {"arguments": ": 1}"}}]))
    assert buffer.take_delta()[0]["delta"] == {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": '{"a": 1}'},
            }
        ]
    }
    # A later delta carries only the new fragments: id and name came once already.
    buffer.add(chunk(tool_calls=[{"index": 0, "function": {"arguments": "}"}}]))
    assert buffer.take_delta()[0]["delta"] == {
        "tool_calls": [{"index": 0, "function": {"arguments": "}"}}]
    }


def test_deltas_carry_refusal_logprobs_and_audio() -> None:
    buffer = CompletionAssembler()
    entry = {"token": "I", "logprob": -0.1, "bytes": [73], "top_logprobs": []}
    first = chunk(role="assistant", content=None, refusal="")
    buffer.add(first)
    buffer.add(
        {
            **chunk(refusal="I can"),
            "choices": [
                {
                    "index": 0,
                    "delta": {"refusal": "I can"},
                    "finish_reason": None,
                    "logprobs": {"content": None, "refusal": [entry]},
                }
            ],
        }
    )
    buffer.add(chunk(audio={"id": "au_1", "transcript": "Hi", "data": "AA", "expires_at": 9}))
    buffer.add(chunk(audio={"transcript": " you", "data": "BB"}))
    assert buffer.take_delta() == [
        {
            "index": 0,
            "delta": {
                "refusal": "I can",
                "audio": {"id": "au_1", "transcript": "Hi you", "data": "AABB", "expires_at": 9},
            },
            "finish_reason": None,
            "logprobs": {"content": None, "refusal": [entry]},
        }
    ]
    buffer.add(chunk(refusal="not", finish_reason="stop"))
    assert buffer.take_delta() == [
        {"index": 0, "delta": {"refusal": "not"}, "finish_reason": "stop"}
    ]
    message = buffer.completion()["choices"][0]["message"]
    assert message["content"] is None
    assert message["refusal"] == "I cannot"
    assert message["audio"] == {
        "id": "au_1",
        "transcript": "Hi you",
        "data": "AABB",
        "expires_at": 9,
    }


def _choice(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "finish_reason": None, **fields}]}


def _fragment(**fields: Any) -> dict[str, Any]:
    return _choice(delta={"tool_calls": [{"index": 0, **fields}]})


@pytest.mark.parametrize(
    "bad",
    [
        {"choices": {"0": {"delta": {"content": "a"}}}},
        {"choices": ["a"]},
        {"choices": [{"index": "0", "delta": {"content": "a"}}]},
        _choice(delta="a"),
        _choice(delta={"content": ["a"]}),
        _choice(delta={"content": 5}),
        _choice(delta={"tool_calls": {"index": 0}}),
        _choice(delta={"tool_calls": ["f"]}),
        _choice(delta={"content": "a"}, finish_reason=3),
        _choice(delta={"content": "a"}, logprobs=[1]),
        _fragment(index="first"),
        _fragment(function="f"),
        _fragment(function={"name": "f", "arguments": {"a": 1}}),
        _fragment(function={"name": 5}),
        {"choices": [], "usage": "lots"},
    ],
)
def test_malformed_chunk_shape(bad: dict[str, Any]) -> None:
    """What the API reference does not allow fails the attempt, it does not crash it."""
    assembler = CompletionAssembler()
    assembler.add(chunk("a"))
    with pytest.raises(MalformedChunk):
        assembler.add(bad)


def test_item9_chunks_the_reference_allows_are_read() -> None:
    odd = [
        {"choices": None, "usage": None},
        {"object": "chat.completion.chunk"},
        {"object": "chat.completion.chunk", "usage": {"prompt_tokens": 1}},  # no "choices"
        _choice(),
        _choice(delta=None),
        _choice(delta={"content": None, "role": "assistant", "refusal": None}),
        _fragment(id="call_1", type="function", function={"name": "f", "arguments": None}),
        _fragment(function=None),
        {**chunk("a"), "error": None},
    ]
    assembler = CompletionAssembler()
    for c in odd:
        assembler.add(c)
    assert assembler.usage == {"prompt_tokens": 1}
    message = assembler.completion()["choices"][0]["message"]
    assert message["content"] == "a"
    assert message["tool_calls"][0]["id"] == "call_1"


# --- DeltaStream --------------------------------------------------------------------------------


class Recorder:
    """A fake delta sink: records (attempt, seq, choices) and the settles."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, list[dict[str, Any]]]] = []
        self.settled = 0

    async def send(self, attempt: int, seq: int, choices: list[dict[str, Any]]) -> None:
        self.sent.append((attempt, seq, choices))

    async def settle(self) -> None:
        self.settled += 1

    @property
    def seqs(self) -> list[int]:
        return [seq for _, seq, _ in self.sent]

    def contents(self) -> list[str]:
        return [
            "".join(c["delta"].get("content", "") for c in choices) for _, _, choices in self.sent
        ]


async def test_first_output_is_due_at_once_then_an_interval_later() -> None:
    sink, assembler = Recorder(), CompletionAssembler()
    stream = DeltaStream(sink, 2, 0.05, assembler)
    assert stream.next_at is None
    assert assembler.add(chunk(role="assistant", content="")) is False
    await stream.flush(10.0)  # nothing to say: no delta, no seq taken
    assert sink.sent == [] and stream.next_at is None
    assert assembler.add(chunk("A")) is True
    assert stream.due(10.0)
    await stream.flush(10.0)
    assert sink.contents() == ["A"]
    assert stream.next_at == pytest.approx(10.05)
    for part in "BCD":
        assembler.add(chunk(part))
    assert not stream.due(10.02)
    assert stream.due(10.0495)  # a timer a millisecond early is on time
    await stream.flush(10.05)
    assert sink.contents() == ["A", "BCD"]
    assert [attempt for attempt, _, _ in sink.sent] == [2, 2]


async def test_close_publishes_the_rest_then_settles() -> None:
    sink, assembler = Recorder(), CompletionAssembler()
    stream = DeltaStream(sink, 1, 60, assembler)
    assembler.add(chunk("A"))
    await stream.flush(0.0)
    assembler.add(chunk("B"))
    assembler.add(chunk(finish_reason="stop"))
    await stream.close(1.0)  # long before the interval: the stream is over
    assert sink.contents() == ["A", "B"]
    assert sink.seqs == [0, 1]
    assert sink.sent[1][2] == [{"index": 0, "delta": {"content": "B"}, "finish_reason": "stop"}]
    assert sink.settled == 1


async def test_zero_interval_makes_every_output_due() -> None:
    sink, assembler = Recorder(), CompletionAssembler()
    stream = DeltaStream(sink, 1, 0, assembler)
    for part in "abcde":
        assembler.add(chunk(part))
        assert stream.due(0.0)
        await stream.flush(0.0)
    assembler.add(USAGE_CHUNK)
    await stream.close(0.0)
    assert sink.contents() == list("abcde")
    assert sink.seqs == [0, 1, 2, 3, 4]


# --- deltas add up to the completion -----------------------------------------------------------

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=8)


@st.composite
def streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A random chunking of up to two choices, with role, reasoning, empty chunks, usage."""
    choices = draw(st.integers(1, 2))
    out: list[dict[str, Any]] = [
        chunk(role="assistant", content="", index=i) for i in range(choices)
    ]
    for _ in range(draw(st.integers(0, 80))):  # past the point where sent pieces are joined
        index = draw(st.integers(0, choices - 1))
        kind = draw(st.sampled_from(["content", "reasoning", "reasoning_content", "empty"]))
        if kind == "content":
            out.append(chunk(draw(texts), index=index))
        elif kind == "empty":
            out.append(chunk(index=index))
        else:
            out.append(chunk(index=index, **{kind: draw(texts)}))
    for i in range(choices):
        if draw(st.booleans()):
            out.append(chunk(index=i, finish_reason="stop"))
    if draw(st.booleans()):
        out.append(USAGE_CHUNK)
    return out


@hypothesis_settings(database=None, max_examples=150, deadline=None)
@given(chunks=streams(), interval=st.sampled_from([0, 3600]), flushes=st.sets(st.integers(0, 90)))
def test_deltas_add_up_to_the_completion(
    chunks: list[dict[str, Any]], interval: float, flushes: set[int]
) -> None:
    sink = Recorder()

    async def run() -> dict[str, Any]:
        assembler = CompletionAssembler()
        stream = DeltaStream(sink, 1, interval, assembler)
        clock = 0.0
        for position, c in enumerate(chunks):
            clock += 1.0
            if assembler.add(c) and (stream.due(clock) or position in flushes):
                await stream.flush(clock)  # a read at a random moment
        await stream.close(clock)
        return assembler.completion()

    completion = asyncio.run(run())
    assert sink.seqs == list(range(len(sink.sent)))
    assert sink.settled == 1
    for choice in completion["choices"]:
        index, message = choice["index"], choice["message"]
        parts = [c["delta"] for _, _, sent in sink.sent for c in sent if c["index"] == index]
        assert "".join(p.get("content", "") for p in parts) == (message["content"] or "")
        reasoning = "".join(p.get("reasoning_content", "") for p in parts)
        assert reasoning == message.get("reasoning_content", "")
        finishes = [
            c["finish_reason"] for _, _, sent in sink.sent for c in sent if c["index"] == index
        ]
        assert [f for f in finishes if f] == (
            [choice["finish_reason"]] if choice["finish_reason"] else []
        )
