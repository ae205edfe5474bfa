"""Stream chunks → coalesced deltas, and the complete ``chat.completion`` they add up to."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ChoiceDelta",
    "ChoicePart",
    "CompletionAssembler",
    "DeltaBuffer",
    "DeltaStream",
    "choice_parts",
    "normalise_delta",
]


def normalise_delta(delta: dict[str, Any]) -> dict[str, Any]:
    """The parts of an upstream ``delta`` a consumer needs, under the contract's names.

    Some servers (vLLM, OpenRouter) call the thinking ``reasoning``; the contract says
    ``reasoning_content``.
    """
    out: dict[str, Any] = {}
    if content := delta.get("content"):
        out["content"] = content
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if reasoning and isinstance(reasoning, str):
        out["reasoning_content"] = reasoning
    if tool_calls := delta.get("tool_calls"):
        out["tool_calls"] = tool_calls
    return out


@dataclass(slots=True)
class _ToolCall:
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)

    def add(self, fragment: dict[str, Any]) -> None:
        self.id = fragment.get("id") or self.id
        self.type = fragment.get("type") or self.type
        function = fragment.get("function") or {}
        self.name = function.get("name") or self.name
        if arguments := function.get("arguments"):
            self.arguments.append(arguments)

    def as_fragment(self, index: int) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index}
        if self.id:
            out["id"] = self.id
        if self.type:
            out["type"] = self.type
        function: dict[str, Any] = {"arguments": "".join(self.arguments)}
        if self.name:
            function = {"name": self.name, **function}
        out["function"] = function
        return out


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice said over a span of chunks, fragments merged."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    role: str | None = None
    finish_reason: str | None = None

    def add(self, delta: dict[str, Any], finish_reason: str | None) -> None:
        if content := delta.get("content"):
            self.content.append(content)
        if reasoning := delta.get("reasoning_content"):
            self.reasoning.append(reasoning)
        for fragment in delta.get("tool_calls") or ():
            index = fragment.get("index", len(self.tool_calls))
            self.tool_calls.setdefault(index, _ToolCall()).add(fragment)
        if finish_reason:
            self.finish_reason = finish_reason

    def delta(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.content:
            out["content"] = "".join(self.content)
        if self.reasoning:
            out["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            out["tool_calls"] = [call.as_fragment(i) for i, call in sorted(self.tool_calls.items())]
        return out


ChoicePart = tuple[int, dict[str, Any], str | None]
"""``(index, normalised delta, finish_reason)`` of one choice in one chunk."""


def choice_parts(chunk: dict[str, Any]) -> list[ChoicePart]:
    return [
        (
            choice.get("index", 0),
            normalise_delta(choice.get("delta") or {}),
            choice.get("finish_reason"),
        )
        for choice in chunk.get("choices") or ()
    ]


class DeltaBuffer:
    """Chunks waiting to be published as one delta message."""

    def __init__(self) -> None:
        self._choices: dict[int, ChoiceDelta] = {}

    def add(self, chunk: dict[str, Any]) -> bool:
        """Buffer a chunk; True when it carried anything a consumer would see."""
        return self.add_parts(choice_parts(chunk))

    def add_parts(self, parts: Iterable[ChoicePart]) -> bool:
        seen = False
        for index, delta, finish_reason in parts:
            if delta or finish_reason:
                self._choices.setdefault(index, ChoiceDelta()).add(delta, finish_reason)
                seen = True
        return seen

    def __bool__(self) -> bool:
        return bool(self._choices)

    def take(self) -> list[dict[str, Any]]:
        """The buffered choices as the delta message's ``choices``; empties the buffer."""
        choices = [
            {"index": i, "delta": c.delta(), "finish_reason": c.finish_reason}
            for i, c in sorted(self._choices.items())
        ]
        self._choices = {}
        return choices


class CompletionAssembler:
    """Builds the ``chat.completion`` a streamed call amounts to."""

    def __init__(self) -> None:
        self._choices: dict[int, ChoiceDelta] = {}
        self._head: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.chunks = 0

    def add(self, chunk: dict[str, Any]) -> list[ChoicePart]:
        """Take a chunk; returns its normalised choices (for the deltas, parsed once)."""
        self.chunks += 1
        if not self._head:
            self._head = {
                k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if k in chunk
            }
        if usage := chunk.get("usage"):
            self.usage = usage
        parts = choice_parts(chunk)
        for (index, delta, finish_reason), choice in zip(
            parts, chunk["choices"] or (), strict=True
        ):
            state = self._choices.setdefault(index, ChoiceDelta())
            if role := (choice.get("delta") or {}).get("role"):
                state.role = role
            state.add(delta, finish_reason)
        return parts

    def completion(self) -> dict[str, Any]:
        choices = []
        for index, state in sorted(self._choices.items()):
            message: dict[str, Any] = {
                "role": state.role or "assistant",
                "content": "".join(state.content) if state.content else None,
            }
            if state.reasoning:
                message["reasoning_content"] = "".join(state.reasoning)
            if state.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": call.type or "function",
                        "function": {"name": call.name, "arguments": "".join(call.arguments)},
                    }
                    for _, call in sorted(state.tool_calls.items())
                ]
            choices.append(
                {"index": index, "message": message, "finish_reason": state.finish_reason}
            )
        body: dict[str, Any] = {"object": "chat.completion", **self._head, "choices": choices}
        body["usage"] = self.usage
        return body


class DeltaStream:
    """Publishes an attempt's deltas: the first at once, later chunks coalesced over
    ``interval`` seconds, ``seq`` counting 0, 1, 2, … without gaps."""

    def __init__(
        self, send: Callable[[int, list[dict[str, Any]]], Awaitable[None]], interval: float
    ) -> None:
        self._send = send
        self._interval = interval
        self._buffer = DeltaBuffer()
        self._seq = 0
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    async def add(self, chunk: dict[str, Any]) -> bool:
        """Take a chunk; True when it carried output (the caller times the first one)."""
        return await self.add_parts(choice_parts(chunk))

    async def add_parts(self, parts: Iterable[ChoicePart]) -> bool:
        if not self._buffer.add_parts(parts):
            return False
        if self._seq == 0 or self._interval <= 0:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._fire)
        return True

    def _fire(self) -> None:
        self._timer = None
        task = asyncio.create_task(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        async with self._lock:
            if not self._buffer:
                return
            seq, self._seq = self._seq, self._seq + 1
            await self._send(seq, self._buffer.take())

    async def close(self) -> None:
        """Publish what is still buffered (the stream ended well); raise a failed publish."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # A flush under way has taken a seq number: let it finish, or the seq has a gap.
        await asyncio.gather(*self._flushing)
        await self.flush()

    def discard(self) -> None:
        """Drop what is buffered (the attempt failed; a retry starts again at seq 0)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._flushing:
            task.cancel()
        self._buffer = DeltaBuffer()
