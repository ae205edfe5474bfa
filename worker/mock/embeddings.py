"""The bundled upstream's ``POST /v1/embeddings``: checked input, deterministic vectors, usage.

A vector is derived from a hash of its input item alone (a string, or a token array), so the
same item gets the same vector in any request, whatever the model. ``dimensions`` (default
:data:`DEFAULT_DIMENSIONS`) takes the first components of one long stream and normalises
them, as a shortened OpenAI embedding is. Components are float32 values, so a ``base64``
answer (little-endian float32, as OpenAI sends it) decodes to exactly the ``float`` one.
Faults, latency and the budget are :mod:`worker.mock.upstream`'s, as for a chat call.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from typing import Any

import orjson

__all__ = [
    "DEFAULT_DIMENSIONS",
    "MAX_DIMENSIONS",
    "embedding_vector",
    "embeddings_reply",
    "input_items",
    "problem",
]

DEFAULT_DIMENSIONS = 8
MAX_DIMENSIONS = 4096  # a mock has no reason to build longer vectors
_BLOCK = 16  # float32 components drawn from one hash


def problem(body: dict[str, Any]) -> tuple[str, str] | None:
    """``(message, param)`` of what OpenAI would refuse in ``body`` with a 400, or None."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "Missing required parameter: 'model'", "model"
    if input_items(body.get("input")) is None:
        return (
            "'input' must be a non-empty string, a list of non-empty strings, a token array "
            "or a list of token arrays",
            "input",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        type(dimensions) is not int or not 1 <= dimensions <= MAX_DIMENSIONS
    ):
        return f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}", "dimensions"
    if body.get("encoding_format") not in (None, "float", "base64"):
        return "'encoding_format' must be 'float' or 'base64'", "encoding_format"
    return None


def input_items(value: Any) -> list[str | list[int]] | None:
    """The items of an ``input``, one vector each; None when it is not a valid input."""
    if isinstance(value, str):
        return [value] if value else None
    if not isinstance(value, list) or not value:
        return None
    if all(_is_token(item) for item in value):
        return [value]  # one token array
    if all(isinstance(item, str) and item for item in value):
        return list(value)
    if all(isinstance(item, list) and item and all(map(_is_token, item)) for item in value):
        return list(value)
    return None


def embedding_vector(item: str | list[int], dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """The unit vector of one input item: float32 components, from a hash of the item."""
    seed = orjson.dumps(item)
    raw: list[float] = []
    block = 0
    while len(raw) < dimensions:
        digest = hashlib.blake2b(seed, digest_size=4 * _BLOCK, salt=block.to_bytes(16, "little"))
        # Each 32-bit word to [-1, 1): a spread of directions, never a zero vector below.
        raw += [word / 2**31 - 1.0 for word in struct.unpack(f"<{_BLOCK}I", digest.digest())]
        block += 1
    raw = raw[:dimensions]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return list(struct.unpack(f"<{dimensions}f", _float32(x / norm for x in raw)))


def embeddings_reply(body: dict[str, Any]) -> dict[str, Any]:
    """The answer to a checked body (see :func:`problem`): OpenAI's ``list`` of embeddings."""
    items = input_items(body["input"]) or []
    dimensions = body.get("dimensions") or DEFAULT_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(items):
        vector = embedding_vector(item, dimensions)
        encoded: list[float] | str = (
            base64.b64encode(_float32(vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(_tokens(item) for item in items)
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _float32(values: Any) -> bytes:
    numbers = list(values)
    return struct.pack(f"<{len(numbers)}f", *numbers)


def _tokens(item: str | list[int]) -> int:
    """As the chat mock counts a prompt: words of a string (at least one), a token array's
    length."""
    return max(1, len(item.split())) if isinstance(item, str) else len(item)


def _is_token(value: Any) -> bool:
    return type(value) is int and value >= 0
