"""Checking a batch's input lines before anything is published (contract §15)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from worker.messages import MAX_CUSTOM_ID, ChatCompletionRequest, EmbeddingsRequest

__all__ = ["ENDPOINTS", "LineCheck", "LineError"]

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
ENDPOINTS: dict[str, type[BaseModel]] = {CHAT: ChatCompletionRequest, EMBEDDINGS: EmbeddingsRequest}


@dataclass(frozen=True, slots=True)
class LineError:
    """One bad line, as OpenAI's ``errors.data`` shows it."""

    code: str
    message: str
    line: int
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "line": self.line, "param": self.param}


@dataclass(slots=True)
class LineCheck:
    """Checks the lines of one file, in order, for one endpoint: JSON, ``custom_id``
    present and unique, ``method`` POST, ``url`` the endpoint, the body valid."""

    endpoint: str
    errors: list[LineError] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)
    model: str | None = None  # the first line's model, shown on the batch

    def check(self, line_no: int, raw: bytes) -> None:
        problem = self._problem(line_no, raw)
        if problem is not None:
            self.errors.append(problem)

    def _problem(self, line_no: int, raw: bytes) -> LineError | None:
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return LineError("invalid_json_line", f"not JSON: {exc}", line_no)
        if not isinstance(document, dict):
            return LineError("invalid_json_line", "not a JSON object", line_no)
        custom_id = document.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return LineError("missing_custom_id", "custom_id: a string is required", line_no)
        if len(custom_id) > MAX_CUSTOM_ID:
            return LineError(
                "invalid_custom_id", f"custom_id: at most {MAX_CUSTOM_ID} characters", line_no
            )
        if custom_id in self.seen:
            first = self.seen[custom_id]
            return LineError(
                "duplicate_custom_id",
                f"custom_id {custom_id!r} is already used on line {first}",
                line_no,
                "custom_id",
            )
        self.seen[custom_id] = line_no
        if document.get("method") != "POST":
            return LineError("invalid_method", "method: must be POST", line_no, "method")
        if document.get("url") != self.endpoint:
            return LineError(
                "invalid_url", f"url: must be the batch's endpoint {self.endpoint}", line_no, "url"
            )
        return self._body_problem(line_no, document.get("body"))

    def _body_problem(self, line_no: int, body: Any) -> LineError | None:
        if not isinstance(body, dict):
            return LineError("invalid_request", "body: a JSON object is required", line_no, "body")
        if self.endpoint == CHAT and body.get("stream") not in (None, False):
            return LineError("invalid_request", "body.stream: a batch does not stream", line_no)
        try:
            ENDPOINTS[self.endpoint].model_validate(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            param = f"body.{where}" if where else "body"
            return LineError("invalid_request", f"{param}: {message}", line_no, param)
        if self.model is None and isinstance(body.get("model"), str):
            self.model = body["model"]
        return None
