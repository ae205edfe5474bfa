"""The command line's own output: producer text shown as text, one line per common mistake."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from worker.amqp.dlq import DeadLetter
from worker.dlq_cli import dead_letters_table, visible


def render(letters: list[DeadLetter]) -> str:
    """The table as a colour terminal would receive it (links and escapes included)."""
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=400, color_system="truecolor").print(
        dead_letters_table(letters)
    )
    return out.getvalue()


def letter(**fields: object) -> DeadLetter:
    values: dict[str, object] = {
        "job_id": "job-1",
        "error_code": "invalid_request",
        "error_message": "upstream answered 400",
        "attempts": 1,
        "size": 10,
        "reason": "worker",
        "custom_id": "c-1",
    }
    values.update(fields)
    return DeadLetter(**values)  # type: ignore[arg-type]


# Issue 22 item 15: producer text (job id = message_id, custom id, error message) is text.
@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("job_id", "[/]", "[/]"),
        ("custom_id", "[bold red]alarm[/bold red]", "[bold red]alarm[/bold red]"),
        ("error_message", "[link=https://evil.test]click[/link]", "[link=https://evil.test]"),
        ("job_id", "a\x1b[2Jb", "a\\x1b[2Jb"),
        ("error_message", "x\x1b]8;;https://evil.test\x07y", "x\\x1b]8;;https://evil.test\\x07y"),
        ("custom_id", "left\u202eright", "left\\u202eright"),
        ("reason", "rejected\nfake line", "rejected\\nfake line"),
    ],
    ids=["close-tag", "style", "link", "csi", "osc8", "bidi", "newline"],
)
def test_item15_dlq_list_shows_producer_text_as_text(field: str, value: str, shown: str) -> None:
    output = render([letter(**{field: value})])
    assert shown in output
    assert "\x1b]8;" not in output, "no hyperlink reaches the terminal"
    assert "\x1b[2J" not in output and "\u202e" not in output and "\x07" not in output


def test_visible_keeps_printable_text_and_escapes_controls() -> None:
    assert visible("plain text: é, 東京, [x]") == "plain text: é, 東京, [x]"
    assert visible("\x00\x7f\x9b\u200b") == "\\x00\\x7f\\x9b\\u200b"


# --- issue 27 item 4: common mistakes are one line, not a traceback ---------------------------


def chat_worker(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    clean |= {"WORKER_SECRETS_DIR": str(cwd), "OTEL_SDK_DISABLED": "true", **env}
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=clean,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on (on every address, as the worker's health server)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("command", ["run", "console", "mock-upstream"])
def test_item4_a_port_in_use_is_one_line(tmp_path: Path, taken_port: int, command: str) -> None:
    port = str(taken_port)
    if command == "run":
        done = chat_worker(
            "run", cwd=tmp_path, WORKER_HTTP_PORT=port, WORKER_UPSTREAM_BASE_URL="http://x/v1"
        )
        hint = "WORKER_HTTP_PORT"
    else:
        done = chat_worker(command, "--host", "0.0.0.0", "--port", port, cwd=tmp_path)
        hint = "pass --port"
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"chat-worker {command}: cannot listen on 0.0.0.0:{port}: address already in use "
        f"({hint}{'; 0 turns it off' if command == 'run' else ''})"
    ]
    assert done.stdout == ""


@pytest.mark.parametrize("args", [["dlq", "list"], ["dlq", "replay", "--all"]])
def test_item4_dlq_with_the_broker_down_is_one_line(tmp_path: Path, args: list[str]) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = chat_worker(*args, cwd=tmp_path, WORKER_AMQP_URL=f"amqp://u:pw-9f3@127.0.0.1:{port}/")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"chat-worker {' '.join(args[:2])}: cannot reach the broker: amqp://u@127.0.0.1:{port}/: "
        "connection refused (is RabbitMQ running on that port?)"
    ]
    assert "pw-9f3" not in done.stderr


@pytest.mark.parametrize("args", [["dlq", "replay"], ["dlq", "list"]])
def test_item27_an_unknown_error_code_is_refused(tmp_path: Path, args: list[str]) -> None:
    """Before, `dlq replay --code no_such_code` replayed nothing and said so, exit 0."""
    done = chat_worker(*args, "--code", "no_such_code", cwd=tmp_path)
    assert done.returncode == 2
    assert "'no_such_code' is not an error code; one of: authentication_error," in done.stderr
    assert "Traceback" not in done.stderr


def test_item27_codes_and_the_brokers_reasons_are_known(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = f"amqp://guest:guest@127.0.0.1:{port}/"
    for code in ("rate_limited", "delivery_limit"):
        done = chat_worker("dlq", "replay", "--code", code, cwd=tmp_path, WORKER_AMQP_URL=down)
        assert done.returncode == 1 and "cannot reach the broker" in done.stderr, done.stderr
