"""A streamed job's deltas (§5) as one clean stream of ``chat.completion.chunk`` events.

A job's attempt that fails mid-stream is retried from the start (``attempt`` + 1, ``seq``
0). The client must not see the text twice, so:

- the deltas of the attempt being shown are forwarded as they come;
- when a later attempt starts, its text is held back until, on every field the client
  has seen (each choice's ``content``, ``reasoning_content``, ``refusal``, each tool
  call's ``id``, ``name`` and ``arguments``, …), it has said again at least what was
  sent; then only the rest goes out, and that attempt is the one shown;
- if it says something else instead (a field that is neither a prefix nor an extension
  of what was sent), the stream cannot be mended: :class:`Diverged`, and the gateway
  ends the stream with an error event;
- at the end, the result's assembled ``chat.completion`` is the reference: what the
  client has must be a prefix of it, and whatever it lacks goes out last (so deltas lost
  on the way, or none at all, still give the whole answer).

A field's text is compared as the ``openai`` SDK accumulates it: strings concatenate;
``index``, ``type`` and ``role`` replace. Log probabilities of the held-back text that is
sent on are not repeated.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

__all__ = ["CleanStream", "Diverged", "event"]

#: a field of one choice: (choice index, key, ...), a tool call's index after "tool_calls"
Path = tuple[Any, ...]
_REPLACED = frozenset({"index", "type", "role"})
DONE = b"data: [DONE]\n\n"


class Diverged(Exception):
    """A retried attempt said something else than what the client already has."""


def event(document: dict[str, Any]) -> bytes:
    """One server-sent event of a JSON document."""
    return b"data: " + orjson.dumps(document) + b"\n\n"


def _walk(value: Any, path: Path, into: dict[Path, str]) -> None:
    if isinstance(value, str):
        into[path] = value if path[-1] in _REPLACED else into.get(path, "") + value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key == "tool_calls" and isinstance(item, list):
                for position, call in enumerate(item):
                    if isinstance(call, dict):
                        index = call.get("index", position)
                        rest = {k: v for k, v in call.items() if k != "index"}
                        _walk(rest, (*path, "tool_calls", index), into)
            else:
                _walk(item, (*path, key), into)
    # Numbers, booleans, nulls and other lists carry no text to compare or resend.


def _delta_of(fields: list[tuple[Path, str]]) -> dict[str, Any]:
    """The delta object that says ``fields`` (paths below the choice)."""
    delta: dict[str, Any] = {}
    for path, text in fields:
        node = delta
        keys = list(path)
        while len(keys) > 1:
            key = keys.pop(0)
            if key == "tool_calls":
                index = keys.pop(0)
                calls = node.setdefault("tool_calls", [])
                found = next((c for c in calls if c["index"] == index), None)
                if found is None:
                    found = {"index": index}
                    calls.append(found)
                node = found
            else:
                node = node.setdefault(key, {})
        if keys:
            node[keys[0]] = text
    return delta


def _consistent(sent: str, said: str) -> bool:
    return sent.startswith(said) or said.startswith(sent)


class CleanStream:
    """Folds one call's deltas and result into the events the client is sent."""

    def __init__(self, call_id: str, model: str, include_usage: bool) -> None:
        self._head: dict[str, Any] = {
            "id": f"chatcmpl-{call_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self._include_usage = include_usage
        self.shown: dict[Path, str] = {}  # what the client has, field by field
        self._attempt: int | None = None  # the attempt shown
        self._held: int | None = None  # a later attempt being held back
        self._said: dict[Path, str] = {}  # what the held attempt has said so far
        self._held_finish: dict[int, str] = {}
        self._finished: dict[int, str] = {}  # finish_reason sent, by choice
        self._opened: set[int] = set()  # choices whose role was sent

    # --- chunks -------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        document: dict[str, Any] = {**self._head, "choices": choices}
        if self._include_usage:
            document["usage"] = None
        return event(document)

    def _entry(
        self, index: int, delta: dict[str, Any], finish: str | None, extra: dict[str, Any]
    ) -> dict[str, Any]:
        if index not in self._opened:
            self._opened.add(index)
            delta = {"role": "assistant", **delta}
        if finish is not None:
            if index in self._finished:
                finish = None
            else:
                self._finished[index] = finish
        return {**extra, "index": index, "delta": delta, "finish_reason": finish}

    # --- deltas -------------------------------------------------------------------------

    def delta(self, message: dict[str, Any]) -> list[bytes]:
        """The events for one delta message; raises :class:`Diverged`."""
        attempt = int(message.get("attempt", 1))
        choices = [c for c in message.get("choices") or () if isinstance(c, dict)]
        if self._attempt is None:
            self._attempt = attempt
        if attempt == self._attempt and self._held is None:
            return self._forward(choices)
        if attempt <= self._attempt or (self._held is not None and attempt < self._held):
            return []  # a stale attempt's (a redelivered job's first worker, still going)
        if attempt != self._held:
            self._held, self._said, self._held_finish = attempt, {}, {}
        for choice in choices:
            index = int(choice.get("index", 0))
            _walk(choice.get("delta") or {}, (index,), self._said)
            if (finish := choice.get("finish_reason")) is not None:
                self._held_finish[index] = finish
        return self._catch_up()

    def _forward(self, choices: list[dict[str, Any]]) -> list[bytes]:
        entries = []
        for choice in choices:
            index = int(choice.get("index", 0))
            delta = choice.get("delta") or {}
            _walk(delta, (index,), self.shown)
            extra = {
                k: v for k, v in choice.items() if k not in ("index", "delta", "finish_reason")
            }
            entries.append(self._entry(index, dict(delta), choice.get("finish_reason"), extra))
        return [self._chunk(entries)] if entries else []

    def _catch_up(self) -> list[bytes]:
        """Switch to the held attempt once it has said again all that was sent."""
        for path, sent in self.shown.items():
            said = self._said.get(path, "")
            if not _consistent(sent, said):
                raise Diverged(f"the retried attempt differs from what was sent at {path}")
            if path[0] in self._held_finish and not said.startswith(sent):
                raise Diverged(f"the retried attempt ended before what was sent at {path}")
        if not all(self._said.get(p, "").startswith(s) for p, s in self.shown.items()):
            return []
        events = self._rest(self._said, self._held_finish)
        self._attempt, self._held = self._held, None
        return events

    def _rest(self, said: dict[Path, str], finishes: dict[int, str]) -> list[bytes]:
        """What ``said`` adds to what was shown (then shown), and the finish reasons."""
        by_choice: dict[int, list[tuple[Path, str]]] = {}
        for path, text in said.items():
            sent = self.shown.get(path, "")
            if path[-1] in _REPLACED:
                if text != sent:
                    by_choice.setdefault(path[0], []).append((path[1:], text))
            elif len(text) > len(sent):
                by_choice.setdefault(path[0], []).append((path[1:], text[len(sent) :]))
        self.shown = dict(said)
        entries = []
        for index in sorted(by_choice.keys() | finishes.keys()):
            finish = finishes.get(index)
            if index not in by_choice and (finish is None or index in self._finished):
                continue
            entries.append(self._entry(index, _delta_of(by_choice.get(index, [])), finish, {}))
        return [self._chunk(entries)] if entries else []

    # --- the end ------------------------------------------------------------------------

    def result(self, result: dict[str, Any]) -> list[bytes]:
        """The last events of a successful job: what the client still lacks of the result's
        completion, the usage chunk when asked for, ``[DONE]``; raises :class:`Diverged`."""
        response = result.get("response") or {}
        body = response.get("body") or {}
        final: dict[Path, str] = {}
        finishes: dict[int, str] = {}
        for position, choice in enumerate(body.get("choices") or ()):
            if not isinstance(choice, dict):
                continue
            index = int(choice.get("index", position))
            message = {k: v for k, v in (choice.get("message") or {}).items() if k != "role"}
            _walk(message, (index,), final)
            if (finish := choice.get("finish_reason")) is not None:
                finishes[index] = finish
        for path, sent in self.shown.items():
            if path[-1] not in _REPLACED and not final.get(path, "").startswith(sent):
                raise Diverged(f"the job's answer differs from what was sent at {path}")
        final = {**{p: t for p, t in self.shown.items() if p not in final}, **final}
        events = self._rest(final, finishes)
        if self._include_usage:
            usage = result.get("usage") or body.get("usage")
            events.append(event({**self._head, "choices": [], "usage": usage}))
        events.append(DONE)
        return events
