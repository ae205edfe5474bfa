"""chat-worker: a RabbitMQ worker for OpenAI-compatible chat completions.

    from worker import ChatClient, JobResult, Settings

The worker itself and the producer client are imported on first use, so that reading a
model or a setting does not load the broker client and OpenTelemetry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.messages import BatchRequest, ErrorCode, JobDelta, JobResult
from worker.settings import Settings
from worker.version import __version__

if TYPE_CHECKING:
    from worker.producer.client import (
        ChatClient,
        ChatClientError,
        JobFailed,
        JobTimeout,
        StreamText,
    )
    from worker.service import Worker

__all__ = [
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

_LAZY = {
    "ChatClient": "worker.producer.client",
    "ChatClientError": "worker.producer.client",
    "JobFailed": "worker.producer.client",
    "JobTimeout": "worker.producer.client",
    "StreamText": "worker.producer.client",
    "Worker": "worker.service",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
