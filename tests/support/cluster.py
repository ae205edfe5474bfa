"""Workers, producers and result counters of the cluster tests (tests/cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from support.process import free_port
from worker.amqp.connect import Nodes, connect_any

# Each worker: WORKER_CONCURRENCY jobs at once, each held MOCK_LATENCY seconds by the mock:
# a known capacity (2 workers: 32 jobs/s) that a shared two-core machine sustains.
MOCK_LATENCY = 1.0
CONCURRENCY = 16


class WorkerProcess:
    """``python -m worker run`` against the cluster (all three URLs), logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.http_port = free_port()
        self.log_path = log_path
        full = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
        full.update(env)
        full.update(
            {
                "WORKER_HTTP_PORT": str(self.http_port),
                "WORKER_CONCURRENCY": str(CONCURRENCY),
                "WORKER_LOG_LEVEL": "info",
                "WORKER_EVENTS": "false",
                "OTEL_SDK_DISABLED": "true",
            }
        )
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker", "run"], env=full, stdout=log, stderr=log
            )

    @property
    def readyz(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/readyz"

    def deferred_jobs(self) -> set[str]:
        """Ids of the jobs this worker sent round a delay queue (from its log)."""
        found = set()
        for line in self.log_path.read_bytes().splitlines():
            if b'"job deferred"' in line:
                found.add(str(orjson.loads(line)["job_id"]))
        return found

    def finished_at(self) -> list[float]:
        """When this worker settled each job (epoch seconds, from its log)."""
        return [
            datetime.fromisoformat(orjson.loads(line)["timestamp"]).timestamp()
            for line in self.log_path.read_bytes().splitlines()
            if b'"job finished"' in line or b'"job deferred"' in line
        ]

    def exited(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def readyz(session: aiohttp.ClientSession, worker: WorkerProcess) -> tuple[int, Any]:
    try:
        async with session.get(worker.readyz, timeout=aiohttp.ClientTimeout(total=2)) as reply:
            return reply.status, await reply.json()
    except (aiohttp.ClientError, TimeoutError):
        return 0, None


async def wait_ready(worker: WorkerProcess, timeout: float = 60) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
        while True:
            assert worker.exited() is None, f"worker exited; see {worker.log_path}"
            status, body = await readyz(session, worker)
            if status == 200:
                return dict(body)
            await asyncio.sleep(0.25)


@dataclass
class Readiness:
    """Samples every worker's ``/readyz`` twice a second: how long each went unready."""

    workers: list[WorkerProcess]
    samples: dict[int, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    bodies: list[Any] = field(default_factory=list)

    def retire(self, worker: WorkerProcess) -> None:
        """Stop sampling a worker stopped on purpose (a rolling restart)."""
        self.workers.remove(worker)

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                for worker in list(self.workers):
                    status, body = await readyz(session, worker)
                    if worker not in self.workers:
                        continue
                    self.samples[worker.http_port].append((time.monotonic(), status))
                    if body and body.get("status") != "ready":
                        self.bodies.append(body)
                await asyncio.sleep(0.5)

    def longest_unready(self) -> float:
        """The longest stretch, over all workers, of samples that were not 200."""
        longest = 0.0
        for samples in self.samples.values():
            since: float | None = None
            for at, status in samples:
                if status != 200 and since is None:
                    since = at
                elif status == 200 and since is not None:
                    longest = max(longest, at - since)
                    since = None
            if since is not None:
                longest = max(longest, samples[-1][0] - since)
        return longest


def job_body(job_id: str, mock: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"cluster job {job_id}"}],
        "max_tokens": 16,
    }
    if mock:
        body["mock"] = {"key": job_id, **mock}
    return orjson.dumps({"custom_id": job_id, "body": body})


@dataclass
class Producer:
    """Publishes jobs with confirms through any node; a publish cut by a node's death is
    published again on a new connection (so a job may be queued twice, never zero times).

    Closed loop: at most ``window`` jobs without a result yet, so the queue holds a steady
    backlog and results per second measure what the workers achieve.
    """

    urls: list[str]
    queue: str
    results: Results
    window: int = 200
    confirmed: dict[str, float] = field(default_factory=dict)  # job id -> first confirm time
    republished: int = 0
    deferred: set[str] = field(default_factory=set)

    async def publish(
        self,
        count: int | None,
        stop: asyncio.Event | None = None,
        defer_every: int = 0,
        defer_mock: dict[str, Any] | None = None,
    ) -> None:
        nodes = Nodes(self.urls)
        connection: AbstractConnection | None = None
        n = 0
        try:
            while (count is None or n < count) and not (stop and stop.is_set()):
                if len(self.confirmed) - self.results.finished(self.confirmed) >= self.window:
                    await asyncio.sleep(0.02)
                    continue
                job_id = f"job-{n:06d}"
                mock = defer_mock if defer_every and n % defer_every == defer_every - 1 else None
                body = job_body(job_id, mock)
                while True:
                    try:
                        if connection is None or connection.is_closed:
                            connection = await connect_any(nodes, name="cluster-test producer")
                            channel = await connection.channel(publisher_confirms=True)
                        await channel.default_exchange.publish(
                            aio_pika.Message(
                                body,
                                message_id=job_id,
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            ),
                            self.queue,
                            timeout=30,
                        )
                        break
                    except (
                        OSError,
                        aiormq.exceptions.AMQPError,
                        TimeoutError,
                        RuntimeError,
                    ) as exc:
                        self.republished += 1
                        print(f"producer: publish of {job_id} failed ({exc!r}); again")
                        if connection is not None:
                            with contextlib.suppress(Exception):
                                await connection.close()
                        connection = None
                        await asyncio.sleep(0.5)
                self.confirmed[job_id] = time.monotonic()
                if mock:
                    self.deferred.add(job_id)
                n += 1
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()


@dataclass
class Results:
    """Consumes the result queue through any node, reconnecting after a loss.

    A result the collector sees twice because its own connection died before its ack is
    the same message; a second result *from a worker* is a different document. Results
    are counted by distinct body, per job id.
    """

    urls: list[str]
    queue: str
    bodies: dict[str, set[bytes]] = field(default_factory=lambda: defaultdict(set))
    first_at: dict[str, float] = field(default_factory=dict)
    arrived: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    arrivals: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def finished(self, ids: dict[str, float] | set[str]) -> int:
        return sum(1 for job_id in ids if job_id in self.first_at)

    def duplicates(self) -> int:
        return sum(len(bodies) - 1 for bodies in self.bodies.values())

    def _on_result(self, message: AbstractIncomingMessage) -> None:
        document = orjson.loads(message.body)
        job_id = str(document["custom_id"])
        digest = hashlib.blake2b(message.body, digest_size=16).digest()
        if digest not in self.bodies[job_id]:
            self.bodies[job_id].add(digest)
            self.arrivals.append(time.monotonic())
            self.arrived[job_id].append(time.monotonic())
        self.first_at.setdefault(job_id, time.monotonic())
        if document["error"]:
            self.errors[document["error"]["code"]] += 1

    async def run(self) -> None:
        nodes = Nodes(self.urls)
        while True:
            try:
                async with await connect_any(nodes, name="cluster-test results") as connection:
                    channel = await connection.channel()
                    await channel.set_qos(prefetch_count=500)
                    queue = await channel.get_queue(self.queue, ensure=False)
                    async with queue.iterator() as messages:
                        async for message in messages:
                            self._on_result(message)
                            await message.ack()
            except (OSError, aiormq.exceptions.AMQPError, TimeoutError, RuntimeError) as exc:
                print(f"results: connection lost ({exc!r}); again")
                await asyncio.sleep(0.5)


def settled_times(workers: list[WorkerProcess]) -> list[float]:
    """Every job settlement by these workers, in order: consumption as the workers saw it
    (the test's own result collector may lag behind a node's death)."""
    return sorted(t for worker in workers for t in worker.finished_at())


def per_window(times: list[float], start: float, end: float, width: float) -> list[float]:
    """Events per second in consecutive windows of ``width`` seconds."""
    rates = []
    at = start
    while at + width <= end + 1e-6:
        rates.append(sum(1 for t in times if at <= t < at + width) / width)
        at += width
    return rates


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest time without an event between ``start`` and ``end``."""
    inside = [start, *(t for t in times if start <= t <= end), end]
    return max(b - a for a, b in itertools.pairwise(inside))


@contextlib.asynccontextmanager
async def background(coroutine: Any) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.ensure_future(coroutine)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.2)


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """A blocking harness call (rabbitmqctl, a node boot) off the event loop."""
    return await asyncio.to_thread(function, *args)
