"""The contract's message models: request (Batch input line), delta, result, error codes.

The JSON Schemas in ``schemas/`` are generated from these models:
``python -m worker.messages`` rewrites them, and a test fails when they are stale.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "MAX_CUSTOM_ID",
    "BatchRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "DeltaChoice",
    "EmbeddingsRequest",
    "Endpoint",
    "ErrorCode",
    "ErrorInfo",
    "JobDelta",
    "JobResult",
    "ResultMetadata",
    "Tool",
    "UpstreamResponse",
    "Usage",
    "custom_id_of",
]

CHAT_COMPLETIONS_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
EMBEDDINGS_PATHS = frozenset({"/v1/embeddings", "/embeddings"})  # contract §18
Endpoint = Literal["chat", "embeddings"]
"""The upstream endpoint a job calls (``gen_ai.operation.name`` too), chosen by its ``url``."""
ENDPOINTS: tuple[Endpoint, ...] = ("chat", "embeddings")
#: longest ``custom_id`` accepted (OpenAI's Batch API documents no limit; 512 keeps every
#: header the worker writes small); a longer one fails ``invalid_message``.
MAX_CUSTOM_ID = 512

# Where a Batch line's custom_id is looked for without parsing the whole body: its first
# bytes (Batch lines put it first), as a JSON string literal of bounded length.
_CUSTOM_ID_WINDOW = 65536
_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*("(?:[^"\\\x00-\x1f]|\\.){0,4096}")')


def custom_id_of(data: bytes, *, parse_up_to: int = 1 << 20) -> str | None:
    """The ``custom_id`` of a request body, read as cheaply as the body allows: parsed
    whole when it is at most ``parse_up_to`` bytes, else (or when it is not JSON) looked
    for in its first 64 KiB. None when it cannot be read."""
    if len(data) <= parse_up_to:
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            document = None
        if isinstance(document, dict):
            value = document.get("custom_id")
            return value if isinstance(value, str) else None
    match = _CUSTOM_ID.search(data, 0, _CUSTOM_ID_WINDOW)
    if match is None:
        return None
    try:
        value = orjson.loads(match.group(1))
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


class ErrorCode(StrEnum):
    """``error.code`` of a failed job (contract §6)."""

    INVALID_MESSAGE = "invalid_message"
    INVALID_REQUEST = "invalid_request"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    FORBIDDEN_REPLY_TO = "forbidden_reply_to"
    AUTHENTICATION_ERROR = "authentication_error"
    NOT_FOUND = "not_found"
    EXPIRED = "expired"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"
    BUDGET_EXCEEDED = "budget_exceeded"
    CANCELLED = "cancelled"


class _Open(BaseModel):
    """A model that keeps fields it does not know (providers add their own)."""

    model_config = ConfigDict(extra="allow")


# --- request -----------------------------------------------------------------------------


class FunctionCall(_Open):
    name: str | None = None
    arguments: str | None = None


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDefinition(_Open):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Open):
    name: str = Field(min_length=1)


class NamedToolChoice(_Open):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Open):
    include_usage: bool | None = None


# Strict: lax mode would take "stream": "false" or "temperature": true, while the raw value
# goes upstream unchanged, so the worker and the upstream would read the job differently.
Penalty = Annotated[float, Field(ge=-2, le=2, strict=True)]
Count = Annotated[int, Field(ge=0, strict=True)]


class ChatCompletionRequest(_Open):
    """The ``body`` of a job: an OpenAI chat-completion request; unknown fields pass through."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Annotated[float, Field(ge=0, le=2, strict=True)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1, strict=True)] | None = None
    n: Annotated[int, Field(ge=1, strict=True)] | None = None
    stream: Annotated[bool, Field(strict=True)] | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: dict[str, Any] | None = None
    seed: Annotated[int, Field(strict=True)] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None


TokenId = Annotated[int, Field(ge=0, strict=True)]
TokenArray = Annotated[list[TokenId], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]


class EmbeddingsRequest(_Open):
    """The ``body`` of an embeddings job (``url`` ``/v1/embeddings``, contract §18): an
    OpenAI embeddings request; unknown fields pass through. Never streamed."""

    model: str = Field(min_length=1)
    input: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | TokenArray
        | Annotated[list[TokenArray], Field(min_length=1)]
    ) = Field(
        description="a string, a list of strings, a token array or a list of token arrays; "
        "nothing empty"
    )
    dimensions: Annotated[int, Field(ge=1, strict=True)] | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None
    stream: Literal[False] | None = Field(None, description="embeddings are never streamed")

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        # One error that names the item at fault, rather than one per member of the union.
        if (problem := _input_problem(value)) is not None:
            raise PydanticCustomError("embeddings_input", problem)
        return value

    @field_validator("stream", mode="before")
    @classmethod
    def _not_streamed(cls, value: Any) -> Any:
        # `false` is harmless (and `null` means absent); anything else asks for a stream.
        if value is not None and value is not False:
            raise PydanticCustomError(
                "embeddings_stream", "embeddings are never streamed: leave stream out (or false)"
            )
        return value


def _input_problem(value: Any) -> str | None:
    """What is wrong with an embeddings ``input``, or None. A list holds items of one kind,
    the kind of its first item."""
    if isinstance(value, str):
        return "must not be an empty string" if not value else None
    if not isinstance(value, list) or not value:
        return "must be a string or a non-empty list"
    first = value[0]
    if isinstance(first, str):
        kind, fits = "a non-empty string", _is_text
    elif isinstance(first, list):
        kind, fits = "a non-empty token array (integers >= 0)", _is_token_array
    elif isinstance(first, int) and not isinstance(first, bool):
        kind, fits = "a token id (an integer >= 0)", _is_token
    else:
        return "must hold strings, token ids or token arrays"
    bad = next((i for i, item in enumerate(value) if not fits(item)), None)
    if bad is None:
        return None
    return f"item {bad} must be {kind}" + (", like item 0" if bad else "")


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _is_token(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_token_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(map(_is_token, value))


class BatchRequest(BaseModel):
    """A request message: one line of the OpenAI Batch API input format. ``url`` decides
    what ``body`` is: an embeddings request for ``/v1/embeddings``, else a chat completion."""

    model_config = ConfigDict(extra="ignore")

    custom_id: str | None = Field(None, max_length=MAX_CUSTOM_ID)
    method: str | None = Field(None, description="when present: POST")
    url: str | None = Field(
        None,
        description="when present: /v1/chat/completions (or /chat/completions), or "
        "/v1/embeddings (or /embeddings) for an embeddings body",
    )
    body: ChatCompletionRequest | EmbeddingsRequest = Field(
        description="an embeddings request when url is /v1/embeddings, else a chat completion"
    )

    @field_validator("body", mode="wrap")
    @classmethod
    def _body_by_url(cls, value: Any, _: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        # By url, not by shape: the errors then speak of the body the producer meant (a
        # ValidationError raised here keeps its locations, under "body").
        by_url = info.data.get("url") in EMBEDDINGS_PATHS
        return (EmbeddingsRequest if by_url else ChatCompletionRequest).model_validate(value)

    @property
    def endpoint(self) -> Endpoint:
        return "embeddings" if isinstance(self.body, EmbeddingsRequest) else "chat"


# --- results -----------------------------------------------------------------------------


class Usage(_Open):
    """The upstream's usage object, repeated whole (details included when given).

    Counts may be ``null``: some upstreams send that, and the worker passes usage through.
    """

    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    total_tokens: int | None = 0
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str
    status_code: int | None = None


class UpstreamResponse(BaseModel):
    status_code: int
    request_id: str | None = None
    body: dict[str, Any] | None = None


class Cost(_Open):
    input: float
    output: float
    total: float
    currency: Literal["USD"] = "USD"
    source: str = Field(description="upstreams-file, genai-prices, or cache (a hit costs 0)")


class ResultMetadata(_Open):
    attempts: int
    model: str | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    worker: str
    finished_at: datetime
    upstream: str | None = Field(None, description="the upstream of the last attempt (§11)")
    lane: str | None = Field(None, description="the request queue the job came from (§12)")
    tenant: str | None = Field(None, description="AMQP user_id, or trusted x-tenant (§12)")
    rate_limit_wait_ms: float = Field(0, description="time the job waited for budget (§11)")
    calls: int = Field(0, description="upstream HTTP calls made for the job, 429s included (§4)")
    cache: Literal["hit", "miss", "stored"] | None = Field(
        None, description="answered from the cache, called on a miss, or from the result store"
    )
    cost: Cost | None = Field(None, description="what the job cost, null when unknown (§17)")


class JobResult(BaseModel):
    """The one result of a job: always its last message."""

    id: str
    custom_id: str | None = None
    type: Literal["result"] = "result"
    response: UpstreamResponse | None = None
    error: ErrorInfo | None = None
    usage: Usage | None = None
    metadata: ResultMetadata

    @property
    def ok(self) -> bool:
        return self.error is None


class DeltaChoice(_Open):
    index: int
    delta: dict[str, Any]
    finish_reason: str | None = None


class JobDelta(BaseModel):
    """Partial output of a streamed job; ``seq`` restarts at 0 with each ``attempt``."""

    id: str
    custom_id: str | None = None
    type: Literal["delta"] = "delta"
    attempt: int
    seq: int
    choices: list[DeltaChoice]


SCHEMAS: dict[str, type[BaseModel]] = {
    "request.schema.json": BatchRequest,
    "result.schema.json": JobResult,
    "delta.schema.json": JobDelta,
}


def render_schemas() -> dict[str, bytes]:
    """The JSON Schema files of ``schemas/``, by file name."""
    return {
        name: orjson.dumps(model.model_json_schema(), option=orjson.OPT_INDENT_2) + b"\n"
        for name, model in SCHEMAS.items()
    }


def write_schemas(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in render_schemas().items():
        (folder / name).write_bytes(text)


if __name__ == "__main__":
    write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas"))
