"""A worker in a process of its own, and results counted by job id."""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from worker.messages import JobResult
from worker.settings import Settings


class WorkerProcess:
    """``python -m worker run`` with the test's settings, in its own process."""

    def __init__(
        self, settings: Settings, *, extra_env: Mapping[str, str] | None = None, **overrides: Any
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
        env.update(settings.model_copy(update=overrides).to_env())
        env["WORKER_LOG_LEVEL"] = "warning"
        env.update(extra_env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            while (code := self.process.poll()) is None:
                await asyncio.sleep(0.05)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class Results:
    """Counts results by job id as they land on the durable result queue."""

    def __init__(self) -> None:
        self.by_id: collections.Counter[str] = collections.Counter()
        self.changed = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        result = JobResult.model_validate_json(message.body)
        assert result.error is None, result.error
        self.by_id[result.id] += 1
        self.changed.set()

    async def until(self, predicate: Any, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def report(self, expected: set[str], label: str) -> tuple[int, int]:
        lost = len(expected - set(self.by_id))
        duplicated = sum(n - 1 for n in self.by_id.values())
        print(f"\n{label}: jobs {len(expected)}, lost {lost}, duplicated {duplicated}")
        return lost, duplicated


def free_port() -> int:
    """A TCP port free on loopback now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
