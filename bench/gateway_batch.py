"""Gateway bench: an N-line batch through one gateway and two workers against the
zero-latency mock, against the same jobs published straight to the queue; and the
gateway's RSS while a large file is uploaded and downloaded, against idle.

    python bench/gateway_batch.py [--lines 50000] [--upload-mb 190]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import psutil

from worker.amqp.topology import DELAY_TIERS, delay_queue_name

AMQP = os.environ.get("WORKER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def line(n: int, pad: int = 0) -> bytes:
    content = f"hello {n}" + (" x" * (pad // 2))
    return orjson.dumps(
        {
            "custom_id": f"r-{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]},
        }
    )


class Fleet:
    """A mock upstream, two workers and one gateway, each a process of its own."""

    def __init__(self, folder: Path) -> None:
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.queue = f"{prefix}.requests"
        self.mock_port, self.port = free_port(), free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
        self.env = {
            **base,
            "WORKER_AMQP_URL": AMQP,
            "WORKER_REQUEST_QUEUE": self.queue,
            "WORKER_RESULT_EXCHANGE": f"{prefix}.results",
            "WORKER_RESULT_QUEUE": f"{prefix}.results",
            "WORKER_DEAD_LETTER_QUEUE": f"{prefix}.dlq",
            "WORKER_EVENTS_EXCHANGE": f"{prefix}.events",
            "WORKER_UPSTREAM_BASE_URL": f"http://127.0.0.1:{self.mock_port}/v1",
            "WORKER_HTTP_PORT": "0",
            "WORKER_LOG_LEVEL": "warning",
            "WORKER_CONCURRENCY": "128",
            "WORKER_DATABASE_URL": f"sqlite:///{folder / 'bench.db'}",
            "WORKER_GATEWAY_PORT": str(self.port),
            "WORKER_GATEWAY_RESULTS_QUEUE": f"{prefix}.gateway",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    async def start(self) -> None:
        self.spawn("mock-upstream", "--port", str(self.mock_port))
        await asyncio.sleep(1.0)
        self.gateway = self.spawn("gateway")
        await self.ready(f"http://127.0.0.1:{self.port}/readyz")
        self.spawn("run")
        self.spawn("run")
        await asyncio.sleep(2.0)

    async def ready(self, url: str) -> None:
        async with asyncio.timeout(30), aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except OSError:
                    pass
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    async def cleanup(self) -> None:
        connection = await aio_pika.connect(AMQP)
        channel = await connection.channel()
        for name in ("WORKER_REQUEST_QUEUE", "WORKER_RESULT_QUEUE", "WORKER_DEAD_LETTER_QUEUE"):
            await channel.queue_delete(self.env[name])
        for seconds in DELAY_TIERS:
            await channel.queue_delete(delay_queue_name(self.queue, seconds, "quorum"))
        await channel.queue_delete(self.env["WORKER_GATEWAY_RESULTS_QUEUE"])
        await connection.close()


async def chunks(data: list[bytes]) -> AsyncIterator[bytes]:
    for piece in data:
        yield piece


async def upload(session: aiohttp.ClientSession, port: int, body: Any) -> str:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", body, filename="in.jsonl", content_type="application/jsonl")
    async with session.post(f"http://127.0.0.1:{port}/v1/files", data=form) as response:
        document = await response.json()
        assert response.status == 200, document
        return str(document["id"])


async def through_gateway(fleet: Fleet, lines: int) -> float:
    data = b"".join(line(n) + b"\n" for n in range(lines))
    async with aiohttp.ClientSession() as session:
        file_id = await upload(session, fleet.port, data)
        started = time.perf_counter()
        create = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        async with session.post(f"http://127.0.0.1:{fleet.port}/v1/batches", json=create) as r:
            batch_id = (await r.json())["id"]
        while True:
            async with session.get(f"http://127.0.0.1:{fleet.port}/v1/batches/{batch_id}") as r:
                batch = await r.json()
            if batch["status"] in ("completed", "failed", "expired", "cancelled"):
                break
            await asyncio.sleep(0.05)
        assert batch["request_counts"]["completed"] == lines, batch
        return time.perf_counter() - started


async def straight_to_queue(fleet: Fleet, lines: int) -> float:
    connection = await aio_pika.connect(AMQP)
    channel = await connection.channel(publisher_confirms=True)
    replies = await channel.declare_queue(exclusive=True, auto_delete=True)
    done = asyncio.Event()
    seen = 0

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen
        seen += message.type == "chat.result"
        if seen >= lines:
            done.set()

    await replies.consume(on_reply, no_ack=True)
    started = time.perf_counter()
    batch = []
    for n in range(lines):
        message = aio_pika.Message(
            line(n), message_id=f"direct-{n}", reply_to=replies.name, delivery_mode=2
        )
        batch.append(channel.default_exchange.publish(message, fleet.queue))
        if len(batch) >= 500:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)
    await done.wait()
    elapsed = time.perf_counter() - started
    await connection.close()
    return elapsed


async def peak_rss(pid: int, work: Awaitable[Any]) -> tuple[float, Any]:
    process = psutil.Process(pid)
    peak = process.memory_info().rss
    task = asyncio.ensure_future(work)
    while not task.done():
        peak = max(peak, process.memory_info().rss)
        await asyncio.sleep(0.02)
    return peak / 2**20, task.result()


async def memory(fleet: Fleet, megabytes: int) -> dict[str, float]:
    pad = 4000
    count = megabytes * 2**20 // (len(line(0, pad)) + 1)
    data = [
        b"".join(line(n, pad) + b"\n" for n in range(k, min(k + 500, count)))
        for k in range(0, count, 500)
    ]
    idle = psutil.Process(fleet.gateway.pid).memory_info().rss / 2**20
    async with aiohttp.ClientSession() as session:
        up, file_id = await peak_rss(fleet.gateway.pid, upload(session, fleet.port, chunks(data)))

        async def download() -> int:
            size = 0
            url = f"http://127.0.0.1:{fleet.port}/v1/files/{file_id}/content"
            async with session.get(url) as response:
                async for piece in response.content.iter_chunked(1 << 20):
                    size += len(piece)
            return size

        down, size = await peak_rss(fleet.gateway.pid, download())
    assert size == sum(map(len, data))
    return {"idle": idle, "upload": up, "download": down, "mb": size / 2**20}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user + system CPU seconds so far of each named process (0 for one that is gone)."""
    found = {}
    for name, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
            found[name] = times.user + times.system
        except psutil.Error:
            found[name] = 0.0
    return found


def broker_pid() -> int | None:
    """The local RabbitMQ's Erlang VM (beam.smp), if this machine runs one."""
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] and "beam" in process.info["name"]:
            cmdline = " ".join(process.info["cmdline"] or [])
            if "rabbit" in cmdline and "cw1@" not in cmdline:
                return int(process.pid)
    return None


async def measured(pids: dict[str, int], work: Awaitable[float]) -> tuple[float, dict[str, float]]:
    """``work``'s seconds, and the CPU seconds each process spent meanwhile."""
    before = cpu_seconds(pids)
    seconds = await work
    after = cpu_seconds(pids)
    return seconds, {name: after[name] - before[name] for name in pids}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--upload-mb", type=int, default=190)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        fleet = Fleet(Path(folder))
        await fleet.start()
        try:
            pids = {
                "gateway": fleet.procs[1].pid,
                "worker 1": fleet.procs[2].pid,
                "worker 2": fleet.procs[3].pid,
                "mock": fleet.procs[0].pid,
                "bench (publisher, collector)": os.getpid(),
            }
            if (broker := broker_pid()) is not None:
                pids["broker"] = broker
            direct, direct_cpu = await measured(pids, straight_to_queue(fleet, args.lines))
            gateway, gateway_cpu = await measured(pids, through_gateway(fleet, args.lines))
            rss = await memory(fleet, args.upload_mb)
        finally:
            fleet.stop()
            await fleet.cleanup()
    print(f"\n{'path':<28}{'lines':>8}{'seconds':>10}{'lines/s':>10}")
    for name, seconds in (("straight to the queue", direct), ("through the gateway", gateway)):
        print(f"{name:<28}{args.lines:>8}{seconds:>10.2f}{args.lines / seconds:>10.0f}")
    print(f"\nCPU seconds (machine: {os.cpu_count()} CPUs){'straight':>14}{'gateway':>10}")
    for name in direct_cpu:
        print(f"  {name:<36}{direct_cpu[name]:>10.1f}{gateway_cpu[name]:>10.1f}")
    total_direct, total_gateway = sum(direct_cpu.values()), sum(gateway_cpu.values())
    print(f"  {'all':<36}{total_direct:>10.1f}{total_gateway:>10.1f}")
    print(
        f"  gateway per line: {gateway_cpu['gateway'] / args.lines * 1e6:.0f} us; CPU busy: "
        f"{total_direct / direct / (os.cpu_count() or 1):.0%} straight, "
        f"{total_gateway / gateway / (os.cpu_count() or 1):.0%} through the gateway"
    )
    print(
        f"\ngateway RSS, MiB ({rss['mb']:.0f} MiB file): idle {rss['idle']:.0f}, "
        f"upload peak {rss['upload']:.0f}, download peak {rss['download']:.0f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
