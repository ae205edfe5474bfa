"""``chat-worker console``: the operator page over the workers' heartbeats and the broker."""

from __future__ import annotations

from worker.console.app import ConsoleApp, serve_console

__all__ = ["ConsoleApp", "serve_console"]
