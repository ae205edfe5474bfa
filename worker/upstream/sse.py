"""The ``text/event-stream`` parser the stream path runs on raw bytes (WHATWG HTML §9.2.6).

Why not ``httpx-sse``: it works on decoded text lines behind httpx's response wrapper, and
on a streamed answer that chain costs more CPU than everything else the worker does per
chunk. This parser takes the bytes as they come off the socket and yields each event's
``data`` as bytes, which ``orjson`` reads without a decode. It follows the grammar:

- lines end with ``\\r\\n``, ``\\n`` or ``\\r`` (a ``\\r`` at the end of a read waits for the
  next read, which may start with its ``\\n``); one leading UTF-8 BOM is dropped;
- ``:`` starts a comment; ``field: value`` drops one space after the colon; a line without
  a colon is a field with an empty value; ``data`` lines join with ``\\n``; ``event`` sets
  the type (``message`` when empty); ``id`` without NUL sets the last event id, which
  persists; ``retry`` and unknown fields are ignored (the worker never reconnects);
- a blank line dispatches the event when a ``data`` line was seen (an event without one is
  not dispatched), and an event the stream ends in the middle of is discarded.

``tests/unit/test_sse.py`` checks it against ``httpx-sse`` on generated streams.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Event", "EventStreamParser"]

_BOM = b"\xef\xbb\xbf"
_new_event = tuple.__new__  # an Event without NamedTuple's Python-level __new__


class Event(NamedTuple):
    """A dispatched event: its type, its data (bytes, as sent) and the last event id."""

    type: str
    data: bytes
    id: str


class EventStreamParser:
    """Feed it the body's bytes as they arrive; each call returns the events completed."""

    __slots__ = ("_data", "_id", "_pending", "_started", "_type")

    def __init__(self) -> None:
        self._pending = b""  # an unterminated line (or a lone trailing \r) from the last read
        self._started = False  # past the place where a BOM may be
        self._data: list[bytes] | None = None
        self._type = ""
        self._id = ""

    def feed(self, chunk: bytes) -> list[Event]:
        if (
            # The common read: one or several `data: ...` events, nothing pending around
            # them (several when the reader rests between reads).
            self._started
            and not self._pending
            and self._data is None
            and not self._type
            and chunk.startswith(b"data: ")
            and chunk.endswith(b"\n\n")
            and b"\r" not in chunk
        ):
            parts = chunk[:-2].split(b"\n\n")
            if chunk.count(b"\n") == 2 * len(parts) and all(
                part.startswith(b"data: ") for part in parts
            ):
                last_id = self._id
                return [_new_event(Event, ("message", part[6:], last_id)) for part in parts]
        if self._pending:
            chunk = self._pending + chunk
        if not self._started:
            if len(chunk) < 3 and _BOM.startswith(chunk):
                self._pending = chunk
                return []
            self._started = True
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
        trailing_cr = chunk.endswith(b"\r")
        if trailing_cr:
            # Perhaps the first half of a \r\n: the line ends when the next read comes.
            chunk = chunk[:-1]
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        self._pending = lines.pop() + b"\r" if trailing_cr else lines.pop()
        return self._lines(lines) if lines else []

    def close(self) -> list[Event]:
        """The end of the body: a pending ``\\r`` still ends its line; an unfinished event
        is dropped."""
        pending, self._pending = self._pending, b""
        self._started = True
        # Only an unterminated line can be pending, with at most its trailing \r.
        return self._lines([pending[:-1]]) if pending.endswith(b"\r") else []

    def _lines(self, lines: list[bytes]) -> list[Event]:
        events: list[Event] = []
        for line in lines:
            if not line:
                if self._data is not None:
                    data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                    events.append(Event(self._type or "message", data, self._id))
                    self._data = None
                self._type = ""
                continue
            if line.startswith(b"data:"):  # the common line first
                value = line[5:]
                if value.startswith(b" "):
                    value = value[1:]
                if self._data is None:
                    self._data = [value]
                else:
                    self._data.append(value)
                continue
            if line.startswith(b":"):
                continue
            name, colon, value = line.partition(b":")
            if colon and value.startswith(b" "):
                value = value[1:]
            if name == b"data":  # "data" with no colon: an empty data line
                if self._data is None:
                    self._data = [value]
                else:
                    self._data.append(value)
            elif name == b"event":
                self._type = value.decode(errors="replace")
            elif name == b"id" and b"\0" not in value:
                self._id = value.decode(errors="replace")
        return events
