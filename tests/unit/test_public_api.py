"""The public surface of the ``worker`` package, pinned."""

from __future__ import annotations

from importlib.metadata import version

import pytest

import worker
from worker.messages import BatchRequest, ErrorCode, JobDelta, JobResult
from worker.producer.client import ChatClient, ChatClientError, JobFailed, JobTimeout, StreamText
from worker.service import Worker
from worker.settings import Settings

PUBLIC = [
    "BatchRequest",
    "ChatClient",
    "ChatClientError",
    "ErrorCode",
    "JobDelta",
    "JobFailed",
    "JobResult",
    "JobTimeout",
    "Settings",
    "StreamText",
    "Worker",
    "__version__",
]


def test_all_is_pinned() -> None:
    assert sorted(getattr(worker, "__all__", [])) == sorted(PUBLIC)


@pytest.mark.parametrize(
    ("name", "obj"),
    [
        ("BatchRequest", BatchRequest),
        ("ErrorCode", ErrorCode),
        ("JobDelta", JobDelta),
        ("JobResult", JobResult),
        ("Settings", Settings),
        ("Worker", Worker),
        ("ChatClient", ChatClient),
        ("ChatClientError", ChatClientError),
        ("JobFailed", JobFailed),
        ("JobTimeout", JobTimeout),
        ("StreamText", StreamText),
    ],
)
def test_public_names_are_the_real_objects(name: str, obj: object) -> None:
    assert getattr(worker, name, None) is obj


def test_version_matches_distribution() -> None:
    assert worker.__version__ == version("chat-worker")
