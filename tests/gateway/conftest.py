"""Fixtures of the gateway tests: a gateway in this event loop (or in a process of its own),
its own database and results queue, batch files, and an ``AsyncOpenAI`` client."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import prometheus_client
import pytest
from aio_pika.abc import AbstractConnection
from openai import AsyncOpenAI

from worker.gateway.app import Gateway
from worker.settings import Settings


def chat_line(custom_id: str, content: str = "Hello", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": content}],
            **body,
        },
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def gateway_settings(settings: Settings, database_url: str, **overrides: Any) -> Settings:
    """The test's settings with a gateway's: its database, a free port, its own results
    queue, a brisk pace."""
    values: dict[str, Any] = {
        **dict(settings),
        "database_url": database_url,
        "gateway_port": 0,
        "gateway_results_queue": f"{settings.request_queue}.gateway",
        "gateway_lease_seconds": 2.0,
        "gateway_cancel_grace": 1.0,
        "gateway_sweep_interval": 0.2,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gateway.db'}"


@pytest.fixture
async def start_gateway(
    settings: Settings, names: dict[str, str], connection: AbstractConnection, database_url: str
) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Start gateways in this event loop; each is stopped, and its queue deleted, after."""
    started: list[Gateway] = []

    async def start(**overrides: Any) -> Gateway:
        overrides.setdefault("database_url", database_url)
        keys = overrides.pop("keys", None)
        gateway = Gateway(
            gateway_settings(settings, **overrides),
            keys=keys,
            registry=prometheus_client.CollectorRegistry(),
        )
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop()
    channel = await connection.channel()
    await channel.queue_delete(f"{names['request_queue']}.gateway")
    await channel.close()


def client_for(gateway: Gateway | int, api_key: str = "none") -> AsyncOpenAI:
    port = gateway if isinstance(gateway, int) else gateway.port
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0)


async def wait_batch(
    client: AsyncOpenAI, batch_id: str, statuses: set[str], timeout: float = 60
) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            batch = await client.batches.retrieve(batch_id)
            if batch.status in statuses:
                return batch
            await asyncio.sleep(0.1)


async def file_lines(client: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [orjson.loads(line) for line in content.read().splitlines()]


class GatewayProcess:
    """``python -m worker gateway`` with the test's settings, in its own process."""

    def __init__(self, settings: Settings, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
        env.update(settings.to_env())
        env["WORKER_GATEWAY_PORT"] = str(port)
        env["WORKER_LOG_LEVEL"] = "warning"
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "gateway"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_ready(self, timeout: float = 20) -> None:
        import aiohttp

        async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
            while True:
                assert self.process.poll() is None, "the gateway process ended"
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as response:
                        if response.status == 200:
                            return
                except OSError:
                    pass
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
