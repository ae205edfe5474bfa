"""The command line's own output: producer text shown as text, one line per common mistake."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from worker.amqp.dlq import DeadLetter
from worker.cli import dead_letters_table, visible


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
