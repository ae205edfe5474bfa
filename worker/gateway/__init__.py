"""The OpenAI-compatible HTTP front door: Files and Batches over the queues (contract §15)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CancelledBatches",
    "Gateway",
    "GatewaySettings",
    "follow_cancellations",
    "load_gateway_settings",
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
    "GatewaySettings": "worker.gateway.config",
    "load_gateway_settings": "worker.gateway.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'worker.gateway' has no attribute {name!r}")
