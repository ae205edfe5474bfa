"""The OpenAI-compatible HTTP front door: Files, Batches and calls over the queues (§15)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Gateway",
    "serve_gateway",
]

# Lazy: importing the package does not load the server.
_LAZY = {
    "Gateway": "worker.gateway.app",
    "serve_gateway": "worker.gateway.app",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'worker.gateway' has no attribute {name!r}")
