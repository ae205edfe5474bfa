"""Pure parts of the gateway: the cancelled set, line checks, embeddings bodies, keys."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from worker.amqp.cancellations import CancelledBatches, cancel_message
from worker.gateway.keys import load_keys
from worker.gateway.lines import LineCheck
from worker.gateway.output import outcome_from_result, parse_job_id
from worker.messages import EmbeddingsRequest
from worker.settings import SettingsError

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Delivered:
    """What :meth:`CancelledBatches.take` reads of a delivery: ``type`` and ``body``."""

    def __init__(self, message: aio_pika.Message) -> None:
        self.type, self.body = message.type, message.body


def test_the_cancelled_set_is_bounded_in_size_and_time() -> None:
    clock = Clock()
    cancelled = CancelledBatches(max_size=3, ttl=10, clock=clock)
    for n in range(5):
        cancelled.add(f"batch_{n}")
    assert [f"batch_{n}" in cancelled for n in range(5)] == [False, False, True, True, True]
    clock.now = 5
    cancelled.add("batch_2")  # announced again: kept longer
    clock.now = 11
    assert "batch_2" in cancelled and "batch_3" not in cancelled and len(cancelled) == 1


def test_the_cancelled_set_takes_announcements_and_ignores_heartbeats() -> None:
    cancelled = CancelledBatches()
    assert cancelled.take(Delivered(cancel_message("batch_x"))) == "batch_x"  # type: ignore[arg-type]
    heartbeat = aio_pika.Message(b'{"type": "heartbeat"}', type="chat.heartbeat")
    assert cancelled.take(Delivered(heartbeat)) is None  # type: ignore[arg-type]
    assert "batch_x" in cancelled and len(cancelled) == 1


def line(custom_id: Any = "a", **changes: Any) -> bytes:
    document = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        **changes,
    }
    return orjson.dumps(document)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{", "invalid_json_line"),
        (b"[]", "invalid_json_line"),
        (line(None), "missing_custom_id"),
        (line(method="GET"), "invalid_method"),
        (line(url="/v1/embeddings"), "invalid_url"),
        (line(body={"model": "m", "messages": []}), "invalid_request"),
        (
            line(body={"model": "m", "messages": [{"role": "user"}], "temperature": 3}),
            "invalid_request",
        ),
        (
            line(body={"model": "m", "messages": [{"role": "user"}], "stream": True}),
            "invalid_request",
        ),
    ],
)
def test_bad_lines_are_named_with_a_code(raw: bytes, code: str) -> None:
    check = LineCheck("/v1/chat/completions")
    check.check(7, raw)
    assert [(e.code, e.line) for e in check.errors] == [(code, 7)]


def test_a_custom_id_twice_is_a_duplicate() -> None:
    check = LineCheck("/v1/chat/completions")
    check.check(1, line("x"))
    check.check(2, line("x"))
    assert [(e.code, e.line) for e in check.errors] == [("duplicate_custom_id", 2)]
    assert check.model == "m"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "e", "input": "text"},
        {"model": "e", "input": ["a", "b"], "dimensions": 64, "encoding_format": "base64"},
        {"model": "e", "input": [1, 2, 3]},
        {"model": "e", "input": [[1, 2], [3]], "user": "u", "extra": True},
    ],
)
def test_embeddings_bodies_that_pass(body: dict[str, Any]) -> None:
    EmbeddingsRequest.model_validate(body)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "e"},
        {"model": "e", "input": ""},
        {"model": "e", "input": []},
        {"model": "e", "input": [1.5]},
        {"model": "e", "input": "x", "stream": True},
        {"model": "e", "input": "x", "encoding_format": "int8"},
        {"model": "e", "input": "x", "dimensions": 0},
    ],
)
def test_embeddings_bodies_that_fail(body: dict[str, Any]) -> None:
    check = LineCheck("/v1/embeddings")
    check.check(1, line(url="/v1/embeddings", body=body))
    assert [e.code for e in check.errors] == ["invalid_request"]


def test_a_result_becomes_an_output_line() -> None:
    result = {
        "id": "batch_abc:3",
        "custom_id": "x",
        "response": None,
        "error": {"code": "cancelled", "message": "batch cancelled", "status_code": None},
        "usage": None,
        "metadata": {"cost": None},
    }
    outcome = outcome_from_result(orjson.dumps(result))
    assert outcome is not None
    assert (outcome.batch_id, outcome.line_no, outcome.status) == ("batch_abc", 3, "error")
    shown = orjson.loads(outcome.line)
    assert shown["error"] == {"code": "cancelled", "message": "batch cancelled"}
    assert shown["id"].startswith("batch_req_") and shown["response"] is None
    assert outcome_from_result(b"not json", "batch_abc:4") is not None
    assert outcome_from_result(b"not json", "job-1") is None
    assert parse_job_id("batch_a:b") is None


def test_keys_from_digest_variable_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEAM_B_KEY", "key-b\n")
    (tmp_path / "c.key").write_text("key-c\n")
    digest = hashlib.sha256(b"key-a").hexdigest()
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - {{key_sha256: {digest}, tenant: team-a}}\n"
        "  - {key_env: TEAM_B_KEY, tenant: team-b}\n"
        f"  - {{key_file: {tmp_path / 'c.key'}, tenant: team-c}}\n"
    )
    keys = load_keys(path)
    assert [keys.tenant_of(k) for k in ("key-a", "key-b", "key-c", "nope")] == [
        "team-a",
        "team-b",
        "team-c",
        None,
    ]
    path.write_text("keys:\n  - {key_env: NOT_SET_ANYWHERE, tenant: x}\n")
    with pytest.raises(SettingsError, match="NOT_SET_ANYWHERE"):
        load_keys(path)
    path.write_text("keys:\n  - {tenant: x}\n")
    with pytest.raises(SettingsError, match="exactly one"):
        load_keys(path)
