"""Stream chunks → coalesced deltas → the assembled ``chat.completion``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from worker.streaming import CompletionAssembler, DeltaStream, MalformedChunk


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


class Feed:
    """An assembler and its DeltaStream, fed as ``JobRunner._stream_once`` feeds them."""

    def __init__(self, send: Any, interval: float) -> None:
        self.assembler = CompletionAssembler()
        self.stream = DeltaStream(send, interval, self.assembler)

    async def add(self, c: dict[str, Any]) -> bool:
        if self.assembler.add(c):
            await self.stream.output()
            return True
        return False

    async def close(self) -> None:
        await self.stream.close()

    def discard(self) -> None:
        self.stream.discard()

    async def flush(self) -> None:
        await self.stream.flush()


class Recorder:
    """A fake ``send``: records (seq, choices, loop time)."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, list[dict[str, Any]], float]] = []
        self.gate: dict[int, asyncio.Event] = {}

    async def __call__(self, seq: int, choices: list[dict[str, Any]]) -> None:
        if seq in self.gate:
            await self.gate[seq].wait()
        self.sent.append((seq, choices, asyncio.get_running_loop().time()))

    @property
    def seqs(self) -> list[int]:
        return [seq for seq, _, _ in self.sent]

    def contents(self) -> list[str]:
        return [
            "".join(c["delta"].get("content", "") for c in choices) for _, choices, _ in self.sent
        ]


async def test_first_output_is_sent_at_once_then_coalesced() -> None:
    send = Recorder()
    interval = 0.05
    stream = Feed(send, interval)
    loop = asyncio.get_running_loop()
    assert await stream.add(chunk(role="assistant", content="")) is False
    assert send.sent == []
    started = loop.time()
    assert await stream.add(chunk("A")) is True
    assert send.contents() == ["A"]  # at once, before add() returned
    for part in ("B", "C", "D"):
        assert await stream.add(chunk(part)) is True
    assert len(send.sent) == 1  # waiting for the interval
    await asyncio.sleep(interval * 4)
    assert send.contents() == ["A", "BCD"]
    assert send.sent[1][2] - started >= interval * 0.9
    await stream.add(chunk("E"))
    await stream.add(chunk(finish_reason="stop"))
    await stream.close()
    assert send.contents() == ["A", "BCD", "E"]
    assert send.seqs == [0, 1, 2]
    assert send.sent[2][1] == [{"index": 0, "delta": {"content": "E"}, "finish_reason": "stop"}]
    # Nothing is left and no timer fires later.
    await asyncio.sleep(interval * 2)
    assert len(send.sent) == 3


async def test_close_flushes_at_once() -> None:
    send = Recorder()
    stream = Feed(send, 60)
    loop = asyncio.get_running_loop()
    await stream.add(chunk("A"))
    await stream.add(chunk("B"))
    await stream.add(chunk("C"))
    started = loop.time()
    await stream.close()
    assert send.contents() == ["A", "BC"]
    assert send.seqs == [0, 1]
    assert loop.time() - started < 1


async def test_discard_drops_the_buffer() -> None:
    send = Recorder()
    interval = 0.02
    stream = Feed(send, interval)
    await stream.add(chunk("A"))
    await stream.add(chunk("B"))
    stream.discard()
    await asyncio.sleep(interval * 5)
    assert send.contents() == ["A"]
    await stream.close()
    assert send.contents() == ["A"]


async def test_zero_interval_sends_every_chunk() -> None:
    send = Recorder()
    stream = Feed(send, 0)
    for part in "abcde":
        await stream.add(chunk(part))
        assert send.contents()[-1] == part
    await stream.add(USAGE_CHUNK)
    await stream.close()
    assert send.seqs == [0, 1, 2, 3, 4]
    assert send.contents() == list("abcde")


async def test_close_waits_for_a_flush_under_way() -> None:
    """A timer flush still publishing when the stream ends keeps its seq; no gap, no swap."""
    send = Recorder()
    interval = 0.01
    send.gate[1] = asyncio.Event()
    stream = Feed(send, interval)
    await stream.add(chunk("A"))
    await stream.add(chunk("B"))
    await asyncio.sleep(interval * 5)  # the timer fired; seq 1 is stuck in send
    assert send.seqs == [0]
    await stream.add(chunk("C"))
    closing = asyncio.create_task(stream.close())
    await asyncio.sleep(interval * 2)
    assert send.seqs == [0]
    send.gate[1].set()
    await closing
    assert send.seqs == [0, 1, 2]
    assert send.contents() == ["A", "B", "C"]


async def test_failed_send_raises_from_close() -> None:
    async def broken(seq: int, choices: list[dict[str, Any]]) -> None:
        if seq > 0:
            raise ConnectionError("channel closed")

    stream = Feed(broken, 60)
    await stream.add(chunk("A"))
    await stream.add(chunk("B"))
    with pytest.raises(ConnectionError):
        await stream.close()


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
    send = Recorder()

    async def run() -> dict[str, Any]:
        stream = Feed(send, interval)
        assembler = stream.assembler
        for position, c in enumerate(chunks):
            await stream.add(c)
            if position in flushes:
                await stream.flush()  # stands in for the timer at a random moment
        await stream.close()
        return assembler.completion()

    completion = asyncio.run(run())
    assert send.seqs == list(range(len(send.sent)))
    for choice in completion["choices"]:
        index, message = choice["index"], choice["message"]
        parts = [c["delta"] for _, sent, _ in send.sent for c in sent if c["index"] == index]
        assert "".join(p.get("content", "") for p in parts) == (message["content"] or "")
        reasoning = "".join(p.get("reasoning_content", "") for p in parts)
        assert reasoning == message.get("reasoning_content", "")
        finishes = [
            c["finish_reason"] for _, sent, _ in send.sent for c in sent if c["index"] == index
        ]
        assert [f for f in finishes if f] == (
            [choice["finish_reason"]] if choice["finish_reason"] else []
        )
