"""The body of an embeddings request (contract §18), checked before any call."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

__all__ = ["EmbeddingsRequest"]

Tokens = Annotated[list[StrictInt], Field(min_length=1)]


class EmbeddingsRequest(BaseModel):
    """``model``, ``input`` (a string, strings, a token array or token arrays),
    ``dimensions``, ``encoding_format``, ``user``; unknown fields pass through;
    ``stream`` is refused (embeddings do not stream)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: (
        Annotated[StrictStr, Field(min_length=1)]
        | Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1)]
        | Tokens
        | Annotated[list[Tokens], Field(min_length=1)]
    )
    dimensions: Annotated[int, Field(ge=1, strict=True)] | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_stream(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("stream") not in (None, False):
            raise ValueError("stream: embeddings do not stream")
        return data
