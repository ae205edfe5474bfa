"""Stream chunks → the ``chat.completion`` they add up to, and the coalesced deltas on the way.

One :class:`CompletionAssembler` per attempt does both: it keeps each choice's pieces once,
and a delta is the pieces added since the last one (a cursor per list), so nothing is
copied or normalised per chunk. The common chunk (one choice whose delta is only
``content``) takes a short path; anything else goes through :meth:`_Choice.add`.

The result equals what the ``openai`` SDK's ``ChatCompletionStreamState`` builds from the
same chunks, field for field (``tests/integration/test_streams.py`` checks it): strings
concatenate (``content``/``refusal`` stay null until a chunk carries one), ``tool_calls``
merge by ``index``, ``logprobs.content``/``refusal`` lists extend, and other delta fields
(``audio`` with its ``transcript``, ``function_call``, …) merge as the SDK's
``accumulate_delta`` does: strings concatenate, numbers add, objects merge, lists extend.
Two departures, both the contract's: ``role`` is taken once (the SDK would concatenate a
repeated one), and ``reasoning`` is renamed ``reasoning_content``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CompletionAssembler", "MalformedChunk"]

_HEAD = ("id", "created", "model", "system_fingerprint", "service_tier")
_COLLAPSE = 32  # content pieces kept apart before the sent ones are joined into one
_KNOWN = frozenset(("role", "content", "refusal", "reasoning_content", "reasoning", "tool_calls"))


class MalformedChunk(ValueError):
    """A chunk whose shape the API reference does not allow (the attempt fails as
    ``upstream_error``, it does not crash the job)."""


def _text(value: Any, what: str) -> str | None:
    if value is None or type(value) is str:
        return value
    raise MalformedChunk(f"{what} is not a string")


class _Text(list[str]):
    """A string being concatenated, kept as its pieces until it is rendered."""


def _merge(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    """The SDK's ``accumulate_delta`` for fields without an ``index``: strings concatenate,
    numbers add, objects merge, lists extend; ``index`` and ``type`` replace; a null adds
    nothing to a value already there."""
    for key, value in delta.items():
        current = acc.get(key)
        if current is None:
            acc[key] = value if key in ("index", "type") else _start(value)
        elif value is None:
            continue
        elif key in ("index", "type"):
            acc[key] = value
        elif type(current) is _Text and type(value) is str:
            current.append(value)
        elif type(current) is dict and type(value) is dict:
            _merge(current, value)
        elif type(current) is list and type(value) is list:
            current.extend(value)
        elif type(current) in (int, float) and type(value) in (int, float):
            acc[key] = current + value
        else:
            acc[key] = _start(value)


def _start(value: Any) -> Any:
    if type(value) is str:
        return _Text((value,))
    if type(value) is dict:
        merged: dict[str, Any] = {}
        _merge(merged, value)
        return merged
    if type(value) is list:
        return list(value)
    return value


def _render(value: Any) -> Any:
    if type(value) is _Text:
        return "".join(value)
    if type(value) is dict:
        return {key: _render(item) for key, item in value.items()}
    return value


class _ToolCall:
    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []

    def add(self, fragment: dict[str, Any]) -> None:
        self.id = _text(fragment.get("id"), "a tool call id") or self.id
        self.type = _text(fragment.get("type"), "a tool call type") or self.type
        function = fragment.get("function")
        if function is None:
            return
        if type(function) is not dict:
            raise MalformedChunk("a tool call fragment has no function object")
        self.name = _text(function.get("name"), "a function name") or self.name
        if arguments := _text(function.get("arguments"), "function arguments"):
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

    def as_call(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type or "function",
            "function": {"name": self.name, "arguments": "".join(self.arguments)},
        }


class _Choice:
    """One choice: its pieces so far, and where the last delta ended in each."""

    __slots__ = (
        "content",
        "extra",
        "finish_reason",
        "logprobs",
        "pending_calls",
        "pending_extra",
        "pending_finish",
        "reasoning",
        "refusal",
        "role",
        "sent",
        "tool_calls",
    )

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] | None = None
        self.refusal: list[str] | None = None
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, _ToolCall] = {}
        self.extra: dict[str, Any] = {}  # audio, function_call, …: merged as the SDK does
        self.logprobs: list[list[Any] | None] | None = None  # [content, refusal]
        self.finish_reason: str | None = None
        # For the next delta: cursors into content, refusal, reasoning, logprobs content
        # and refusal; fragments merged since the last delta.
        self.sent = [0, 0, 0, 0, 0]
        self.pending_calls: dict[int, _ToolCall] = {}
        self.pending_extra: dict[str, Any] = {}
        self.pending_finish = False

    def add(self, delta: dict[str, Any]) -> bool:
        """Any delta but the plain-content one; True when a consumer would see something."""
        seen = False
        if (role := delta.get("role")) is not None:
            self.role = self.role or _text(role, "role")
        if (content := _text(delta.get("content"), "content")) is not None:
            if self.content is None:
                self.content = []
            self.content.append(content)
            seen = seen or bool(content)
        if (refusal := _text(delta.get("refusal"), "refusal")) is not None:
            if self.refusal is None:
                self.refusal = []
            self.refusal.append(refusal)
            seen = seen or bool(refusal)
        reasoning = _text(delta.get("reasoning_content"), "reasoning_content") or _text(
            delta.get("reasoning"), "reasoning"
        )
        if reasoning:
            self.reasoning.append(reasoning)
            seen = True
        if (calls := delta.get("tool_calls")) is not None:
            if type(calls) is not list:
                raise MalformedChunk("tool_calls is not an array")
            for fragment in calls:
                if type(fragment) is not dict:
                    raise MalformedChunk("a tool call fragment is not an object")
                index = fragment.get("index", len(self.tool_calls))
                if type(index) is not int:
                    raise MalformedChunk("a tool call fragment has no integer index")
                self.tool_calls.setdefault(index, _ToolCall()).add(fragment)
                self.pending_calls.setdefault(index, _ToolCall()).add(fragment)
                seen = True
        if len(delta) > len(_KNOWN.intersection(delta)):
            other = {k: v for k, v in delta.items() if k not in _KNOWN}
            _merge(self.extra, other)
            _merge(self.pending_extra, other)
            seen = seen or any(value is not None for value in other.values())
        return seen

    def add_logprobs(self, logprobs: Any) -> bool:
        if type(logprobs) is not dict:
            raise MalformedChunk("logprobs is not an object")
        content, refusal = logprobs.get("content"), logprobs.get("refusal")
        if not isinstance(content, list | None) or not isinstance(refusal, list | None):
            raise MalformedChunk("logprobs content or refusal is not an array")
        if self.logprobs is None:
            self.logprobs = [
                None if content is None else list(content),
                None if refusal is None else list(refusal),
            ]
        else:
            for slot, entries in ((0, content), (1, refusal)):
                if entries:
                    current = self.logprobs[slot]
                    if current is None:
                        self.logprobs[slot] = list(entries)
                    else:
                        current.extend(entries)
        return bool(content or refusal)

    def take(self, index: int) -> dict[str, Any] | None:
        """The delta message's entry for this choice since the last one, or None."""
        sent = self.sent
        delta: dict[str, Any] = {}
        if self.content is not None and len(self.content) > sent[0]:
            if text := "".join(self.content[sent[0] :]):
                delta["content"] = text
            if len(self.content) > _COLLAPSE:
                # Sent pieces are one string from now on: a long stream holds its text,
                # not hundreds of small objects (about 60 bytes each besides the text).
                self.content[:] = ["".join(self.content)]
            sent[0] = len(self.content)
        if self.refusal is not None and len(self.refusal) > sent[1]:
            if text := "".join(self.refusal[sent[1] :]):
                delta["refusal"] = text
            sent[1] = len(self.refusal)
        if len(self.reasoning) > sent[2]:
            delta["reasoning_content"] = "".join(self.reasoning[sent[2] :])
            sent[2] = len(self.reasoning)
        if self.pending_calls:
            delta["tool_calls"] = [
                call.as_fragment(i) for i, call in sorted(self.pending_calls.items())
            ]
            self.pending_calls = {}
        if self.pending_extra:
            delta.update(_render(self.pending_extra))
            self.pending_extra = {}
        entry: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": None}
        if self.logprobs is not None:
            content, refusal = self.logprobs
            new_content = content[sent[3] :] if content else []
            new_refusal = refusal[sent[4] :] if refusal else []
            if new_content or new_refusal:
                entry["logprobs"] = {"content": new_content or None, "refusal": new_refusal or None}
                sent[3], sent[4] = len(content or ()), len(refusal or ())
        if self.pending_finish:
            entry["finish_reason"] = self.finish_reason
            self.pending_finish = False
        elif not delta and "logprobs" not in entry:
            return None
        return entry

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": self.role or "assistant",
            "content": None if self.content is None else "".join(self.content),
        }
        if self.refusal is not None:
            message["refusal"] = "".join(self.refusal)
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [call.as_call() for _, call in sorted(self.tool_calls.items())]
        for key, value in self.extra.items():
            message.setdefault(key, _render(value))
        return message


class CompletionAssembler:
    """Builds the ``chat.completion`` a streamed call amounts to, and its deltas."""

    __slots__ = ("_choices", "_head", "chunks", "usage")

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}
        self._head: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self.chunks = 0

    def add(self, chunk: dict[str, Any]) -> bool:
        """Take a parsed chunk; True when it carried anything a consumer would see.
        Raises :class:`MalformedChunk` for a shape the API does not allow."""
        self.chunks += 1
        if self._head is None:
            self._head = {key: chunk[key] for key in _HEAD if key in chunk}
        if (usage := chunk.get("usage")) is not None:
            if type(usage) is not dict:
                raise MalformedChunk("usage is not an object")
            self.usage = usage
        choices = chunk.get("choices")
        if not choices:  # absent, null or [] (the usage chunk): nothing for the choices
            return False
        if type(choices) is not list:
            raise MalformedChunk("choices is not an array")
        seen = False
        for choice in choices:
            if type(choice) is not dict:
                raise MalformedChunk("a choice is not an object")
            index = choice.get("index", 0)
            if type(index) is not int:
                raise MalformedChunk("a choice has no integer index")
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = _Choice()
            delta = choice.get("delta")
            if delta:
                if type(delta) is not dict:
                    raise MalformedChunk("a delta is not an object")
                content = delta.get("content")
                if len(delta) == 1 and type(content) is str and state.content is not None:
                    state.content.append(content)  # the common chunk
                    seen = seen or bool(content)
                else:
                    seen = state.add(delta) or seen
            elif delta is not None and type(delta) is not dict:
                raise MalformedChunk("a delta is not an object")
            if (finish := choice.get("finish_reason")) is not None:
                state.finish_reason = _text(finish, "finish_reason") or state.finish_reason
                state.pending_finish = seen = True
            if (logprobs := choice.get("logprobs")) is not None:
                seen = state.add_logprobs(logprobs) or seen
        return seen

    @property
    def finished(self) -> bool:
        """Every choice has a finish_reason (and there is one): the answer is whole."""
        return bool(self._choices) and all(c.finish_reason for c in self._choices.values())

    def take_delta(self) -> list[dict[str, Any]]:
        """The delta message's ``choices``: what each choice said since the last call."""
        out = []
        for index, state in sorted(self._choices.items()):
            if (entry := state.take(index)) is not None:
                out.append(entry)
        return out

    def completion(self) -> dict[str, Any]:
        choices = []
        for index, state in sorted(self._choices.items()):
            entry: dict[str, Any] = {
                "index": index,
                "message": state.message(),
                "finish_reason": state.finish_reason,
            }
            if state.logprobs is not None:
                entry["logprobs"] = {"content": state.logprobs[0], "refusal": state.logprobs[1]}
            choices.append(entry)
        body: dict[str, Any] = {"object": "chat.completion", **(self._head or {})}
        body["choices"] = choices
        body["usage"] = self.usage
        return body
