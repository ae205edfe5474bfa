"""The OpenAI-compatible HTTP front door: Files, Batches and calls over the queues (§15)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CancelledBatches",
    "Gateway",
    "follow_cancellations",
    "publish_cancel",
    "serve_gateway",
]

# Lazy: a worker following cancellations imports worker.gateway.cancel without the server.
_LAZY = {
    "CancelledBatches": "worker.gateway.cancel",
    "follow_cancellations": "worker.gateway.cancel",
    "publish_cancel": "worker.gateway.cancel",
    "Gateway": "worker.gateway.app",
    "serve_gateway": "worker.gateway.app",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'worker.gateway' has no attribute {name!r}")
