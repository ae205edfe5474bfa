"""The text of a streamed job so far, started again by a delta of a retried attempt."""

from __future__ import annotations

from typing import Any

from worker.messages import JobDelta

__all__ = ["StreamText"]


class StreamText:
    """The text of a streamed job so far; a delta of a new attempt starts it again.

    ``text.add(delta)`` for each delta; ``text.content()`` is what the last attempt said
    (choice 0 by default), equal to the result's content once the stream has ended.
    """

    def __init__(self) -> None:
        self.attempt = 0
        self._content: dict[int, list[str]] = {}
        self._reasoning: dict[int, list[str]] = {}
        self._tools: dict[int, dict[int, dict[str, Any]]] = {}

    def add(self, delta: JobDelta) -> None:
        if delta.attempt < self.attempt:
            return  # a straggler of an abandoned attempt
        if delta.attempt > self.attempt:
            self.attempt = delta.attempt
            self._content, self._reasoning, self._tools = {}, {}, {}
        for choice in delta.choices:
            part = choice.delta
            if isinstance(content := part.get("content"), str):
                self._content.setdefault(choice.index, []).append(content)
            if isinstance(reasoning := part.get("reasoning_content"), str):
                self._reasoning.setdefault(choice.index, []).append(reasoning)
            for fragment in part.get("tool_calls") or ():
                _merge_tool_call(self._tools.setdefault(choice.index, {}), fragment)

    def content(self, index: int = 0) -> str:
        return "".join(self._content.get(index, ()))

    def reasoning(self, index: int = 0) -> str:
        return "".join(self._reasoning.get(index, ()))

    def tool_calls(self, index: int = 0) -> list[dict[str, Any]]:
        """The tool calls so far, merged by their ``index`` as in the final message."""
        calls = self._tools.get(index, {})
        return [calls[k] for k in sorted(calls)]

    def __str__(self) -> str:
        return self.content()


def _merge_tool_call(calls: dict[int, dict[str, Any]], fragment: dict[str, Any]) -> None:
    call = calls.setdefault(
        int(fragment.get("index", 0)),
        {"id": None, "type": "function", "function": {"name": None, "arguments": ""}},
    )
    call["id"] = fragment.get("id") or call["id"]
    call["type"] = fragment.get("type") or call["type"]
    function = fragment.get("function") or {}
    call["function"]["name"] = function.get("name") or call["function"]["name"]
    call["function"]["arguments"] += function.get("arguments") or ""
