"""The OpenAI-compatible HTTP front door: Files and Batches over the queues (contract §15)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Gateway",
    "GatewaySettings",
    "load_gateway_settings",
    "serve_gateway",
]

# Lazy: importing the package does not load the server.
_LAZY = {
    "Gateway": "worker.gateway.app",
    "serve_gateway": "worker.gateway.app",
    "GatewaySettings": "worker.gateway.config",
    "load_gateway_settings": "worker.gateway.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'worker.gateway' has no attribute {name!r}")
