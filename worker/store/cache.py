"""The answer cache: an upstream's successful answer kept under a hash of what was asked.

Two requests are the same question when their tenant, model and body are, the body's
``stream`` and ``stream_options`` aside (contract §16): a streamed and a plain job share
answers, and one tenant's answers never reach another. The key is the SHA-256 of the
canonical JSON of ``[tenant, model, body]`` (orjson with sorted keys), so key order and
whitespace do not matter; ``{prefix}:cache:<hex>`` in Redis.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel

from worker.store.backend import StoreBackend
from worker.store.circuit import Circuit
from worker.store.metrics import StoreMetrics
from worker.store.outcomes import Skipped

__all__ = [
    "H_CACHE",
    "AnswerCache",
    "CachedAnswer",
    "cache_key",
    "deltas_from_completion",
    "enabled_for",
]

H_CACHE = "x-cache"  # the message header that overrides WORKER_CACHE for one job
DEFAULT_CACHE_TTL = 3600.0
DEFAULT_MAX_BYTES = 1 << 20
_STREAM_FIELDS = ("stream", "stream_options")
_TRUE = frozenset(("true", "on", "1", "yes"))
_FALSE = frozenset(("false", "off", "0", "no"))


def _switch(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    return None


def enabled_for(header: object, default: bool | str) -> bool:
    """Whether a job uses the cache: its ``x-cache`` header (``true``/``false``, as a bool
    or a string) when it has a readable one, else the setting ``WORKER_CACHE`` (on/off)."""
    chosen = _switch(header)
    if chosen is not None:
        return chosen
    return _switch(default) is True


def cache_key(tenant: str | None, body: Mapping[str, Any] | BaseModel) -> str:
    """The hex SHA-256 naming the answer to ``body`` for ``tenant``."""
    fields = (
        body.model_dump(mode="json", exclude_unset=True)
        if isinstance(body, BaseModel)
        else dict(body)
    )
    for name in _STREAM_FIELDS:
        fields.pop(name, None)
    canonical = orjson.dumps([tenant, fields.get("model"), fields], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """What a hit needs to build a whole result: the upstream's status, request id and
    ``chat.completion`` body (its ``usage`` included)."""

    status_code: int
    request_id: str | None
    body: dict[str, Any]

    @property
    def succeeded(self) -> bool:
        """A 2xx answer with choices (or embeddings' data): the only kind worth serving again."""
        return 200 <= self.status_code < 300 and (
            isinstance(self.body.get("choices"), list) or isinstance(self.body.get("data"), list)
        )

    @property
    def usage(self) -> dict[str, Any] | None:
        usage = self.body.get("usage")
        return usage if isinstance(usage, dict) else None

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {"status_code": self.status_code, "request_id": self.request_id, "body": self.body}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedAnswer:
        """Raises ValueError for anything :meth:`to_bytes` did not write."""
        value = orjson.loads(data)
        if not (
            isinstance(value, dict)
            and isinstance(value.get("status_code"), int)
            and isinstance(value.get("request_id"), str | None)
            and isinstance(value.get("body"), dict)
        ):
            raise ValueError("not a cached answer")
        return cls(value["status_code"], value["request_id"], value["body"])


def _delta(message: Mapping[str, Any]) -> dict[str, Any]:
    delta = {k: v for k, v in message.items() if v is not None and k != "tool_calls"}
    if "reasoning" in delta and "reasoning_content" not in delta:
        delta["reasoning_content"] = delta.pop("reasoning")  # the contract's name (§5)
    calls = message.get("tool_calls")
    if calls:
        delta["tool_calls"] = [
            {"index": i, **{k: v for k, v in call.items() if k != "index"}}
            for i, call in enumerate(calls)
        ]
    return delta


def deltas_from_completion(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The choices of one delta message that carries a whole cached ``chat.completion``:
    per choice its message (content, reasoning, tool calls by index, …) and
    ``finish_reason``, so a streamed job answered from the cache still gets its delta.
    Folding them as stream deltas gives the message back."""
    choices: list[dict[str, Any]] = []
    for position, choice in enumerate(body.get("choices") or ()):
        message = choice.get("message")
        entry: dict[str, Any] = {
            "index": choice.get("index", position),
            "delta": _delta(message) if isinstance(message, Mapping) else {},
            "finish_reason": choice.get("finish_reason"),
        }
        if choice.get("logprobs") is not None:
            entry["logprobs"] = choice["logprobs"]
        choices.append(entry)
    return choices


class AnswerCache:
    """Answers by :func:`cache_key`, every call bounded by ``circuit``."""

    def __init__(
        self,
        backend: StoreBackend,
        circuit: Circuit,
        *,
        ttl: float = DEFAULT_CACHE_TTL,
        max_bytes: int = DEFAULT_MAX_BYTES,
        prefix: str = "cw",
        metrics: StoreMetrics | None = None,
    ) -> None:
        self._backend = backend
        self._circuit = circuit
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._prefix = prefix
        self.metrics = metrics if metrics is not None else StoreMetrics()

    def key(self, digest: str) -> str:
        return f"{self._prefix}:cache:{digest}"

    async def get(self, digest: str, *, counted: bool = True) -> CachedAnswer | Skipped | None:
        """The answer stored under ``digest`` (from :func:`cache_key`); None: a miss;
        :class:`Skipped`: Redis unavailable, so the cache is off for this job.
        ``counted=False``: a look ahead, which :meth:`count` counts if it is used."""
        key = self.key(digest)
        found = await self._circuit.call("cache_get", lambda: self._backend.get(key))
        if isinstance(found, Skipped):
            self.metrics.skip(found.op)
            return found
        answer = None
        if found is not None:
            try:
                answer = CachedAnswer.from_bytes(found)
            except ValueError:  # another writer's key, or a format of the past: a miss
                answer = None
        if counted:
            self.count(answer)
        return answer

    def count(self, answer: CachedAnswer | Skipped | None) -> None:
        """Count a lookup's answer as a hit or a miss (a skipped one was counted as such)."""
        if answer is None:
            self.metrics.cache_misses += 1
        elif isinstance(answer, CachedAnswer):
            self.metrics.cache_hits += 1

    async def put(self, digest: str, answer: CachedAnswer, ttl: float | None = None) -> bool:
        """Keep a successful ``answer`` for ``ttl`` seconds (the cache's by default); False:
        not kept (not a success, over the size bound, or Redis unavailable)."""
        if not answer.succeeded:
            return False
        data = answer.to_bytes()
        if len(data) > self.max_bytes:
            self.metrics.oversize("answer")
            return False
        key, seconds = self.key(digest), self.ttl if ttl is None else ttl
        done = await self._circuit.call("cache_put", lambda: self._backend.put(key, data, seconds))
        if isinstance(done, Skipped):
            self.metrics.skip(done.op)
            return False
        self.metrics.cache_stored += 1
        return True
