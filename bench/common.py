"""The benchmarks' plumbing: run names, request bodies, queues, and the child processes
(mock upstream, workers). Measuring a run is :mod:`measure`'s job."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import psutil
from aio_pika.abc import AbstractChannel

from worker.amqp.topology import declare, delay_queues
from worker.settings import Settings

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PYTHON = sys.executable
CHAT_WORKER = str(Path(PYTHON).parent / "chat-worker")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL = "bench-model"


# --- names and jobs -----------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """Queue and exchange names of one run alone: the broker is shared."""

    prefix: str

    @classmethod
    def unique(cls, tag: str) -> Names:
        return cls(f"bench-{tag}-{uuid.uuid4().hex[:8]}")

    @property
    def request_queue(self) -> str:
        return f"{self.prefix}.requests"

    @property
    def result_exchange(self) -> str:
        return f"{self.prefix}.results"

    @property
    def result_queue(self) -> str:
        return f"{self.prefix}.results"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.dlq"

    def settings(self) -> Settings:
        # Explicit values only: no .env file, and the defaults of contract §2 otherwise.
        return Settings(
            _env_file=None,
            amqp_url=AMQP_URL,
            queue_type="quorum",
            request_queue=self.request_queue,
            result_exchange=self.result_exchange,
            result_queue=self.result_queue,
            dead_letter_queue=self.dead_letter_queue,
        )

    def queues(self) -> list[str]:
        delays = delay_queues(self.settings(), self.request_queue)
        return [self.request_queue, self.result_queue, self.dead_letter_queue, *delays]


def job_body(job_id: str, *, stream: bool = False) -> bytes:
    """A Batch-format request line; the job id is in the prompt so the mock can tell jobs
    apart (see ``timed_mock.py``)."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"job {job_id}: say hello"}],
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(
        {"custom_id": job_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


def job_id_of_prompt(body: dict[str, Any]) -> str | None:
    """The job id a :func:`job_body` prompt carries, from the upstream request body."""
    try:
        content = body["messages"][-1]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, str) or not content.startswith("job "):
        return None
    return content[4:].split(":", 1)[0]


# --- broker -------------------------------------------------------------------------------


async def declare_topology(connection: aio_pika.abc.AbstractConnection, names: Names) -> None:
    """The worker's own topology (quorum request and result queues, DLQ, delay queues), so
    every contender of a scenario runs against the same broker objects."""
    await declare(connection, names.settings())


async def delete_topology(connection: aio_pika.abc.AbstractConnection, names: Names) -> None:
    """Delete the run's queues and exchange; a failed delete closes its channel, so each
    one gets a fresh channel."""
    deletions = [("queue_delete", queue) for queue in names.queues()]
    deletions.append(("exchange_delete", names.result_exchange))
    for method, name in deletions:
        with contextlib.suppress(Exception):
            channel = await connection.channel()
            try:
                await getattr(channel, method)(name)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()


async def fill_queue(
    channel: AbstractChannel,
    queue: str,
    jobs: int,
    *,
    stream: bool = False,
    reply_to: str | None = None,
    batch: int = 500,
    ids: str = "j",
) -> None:
    """Publish ``jobs`` persistent requests (confirmed) and wait until the queue holds them.

    Job ``i`` is ``f"{ids}{i}"`` (id, correlation id, and in its prompt): with a result
    store, give each run ids of its own, or a run is answered from an earlier one's results.
    """
    exchange = channel.default_exchange
    for start in range(0, jobs, batch):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        job_body(f"{ids}{i}", stream=stream),
                        message_id=f"{ids}{i}",
                        correlation_id=f"{ids}{i}",
                        reply_to=reply_to,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    queue,
                )
                for i in range(start, min(start + batch, jobs))
            )
        )
    deadline = time.monotonic() + 30
    while (await queue_counts(channel, queue))[0] < jobs:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{queue} never reported {jobs} messages")
        await asyncio.sleep(0.05)


async def queue_counts(channel: AbstractChannel, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) as the broker reports them."""
    declared = await channel.declare_queue(queue, passive=True)
    result = declared.declaration_result
    return result.message_count, result.consumer_count


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any WORKER_*/OTEL_* a developer may have set, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "OTEL_"))}
    env.update(extra)
    return env


class Proc:
    """A child process of the benchmark, its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd or log_dir,
            )
        self.pid = self.popen.pid
        self.ps = psutil.Process(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """CPU time of the process and its children so far (0 once it is gone)."""
        try:
            procs = [self.ps, *self.ps.children(recursive=True)]
            total = 0.0
            for proc in procs:
                times = proc.cpu_times()
                total += times.user + times.system
            return total
        except psutil.Error:
            return 0.0

    def rss(self) -> int:
        try:
            return int(self.ps.memory_info().rss)
        except psutil.Error:
            return 0

    def stop(self, sig: int = signal.SIGTERM, wait: float = 15.0) -> int | None:
        """Signal the process, wait for it, kill it if it does not go."""
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass(frozen=True)
class MockArgs:
    """The mock upstream's command line (``chat-worker mock-upstream``)."""

    latency: float = 0.0
    chunks: int = 8
    chunk_interval: float = 0.0
    timed: bool = False  # the bench's wrapper that records first-content send times

    def argv(self, port: int) -> list[str]:
        options = [
            "--port",
            str(port),
            "--latency",
            str(self.latency),
            "--chunks",
            str(self.chunks),
            "--chunk-interval",
            str(self.chunk_interval),
        ]
        if self.timed:
            return [PYTHON, str(BENCH / "timed_mock.py"), *options]
        return [CHAT_WORKER, "mock-upstream", *options]


async def start_mock(args: MockArgs, log_dir: Path) -> tuple[Proc, str]:
    """Start the mock upstream; return it and its base URL once it answers."""
    port = free_port()
    proc = Proc("mock", args.argv(port), log_dir, env=clean_env())
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while True:
            if not proc.alive():
                raise RuntimeError(f"mock upstream exited:\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{base}/healthz") as response:
                    if response.status == 200:
                        return proc, f"{base}/v1"
            if time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError(f"mock upstream did not answer:\n{proc.tail()}")
            await asyncio.sleep(0.05)


@dataclass(frozen=True)
class RunContext:
    """What a worker factory needs to start the processes under test."""

    names: Names
    upstream: str  # base URL, ending in /v1
    log_dir: Path


WorkerFactory = Callable[[RunContext], list[Proc]]


def chat_worker(concurrency: int = 64, processes: int = 1, **env: str) -> WorkerFactory:
    """``chat-worker run`` processes, configured only through WORKER_* variables."""

    def spawn(ctx: RunContext) -> list[Proc]:
        procs = []
        for index in range(processes):
            variables = clean_env(
                **{
                    "WORKER_AMQP_URL": AMQP_URL,
                    "WORKER_UPSTREAM_BASE_URL": ctx.upstream,
                    "WORKER_REQUEST_QUEUE": ctx.names.request_queue,
                    "WORKER_RESULT_EXCHANGE": ctx.names.result_exchange,
                    "WORKER_RESULT_QUEUE": ctx.names.result_queue,
                    "WORKER_DEAD_LETTER_QUEUE": ctx.names.dead_letter_queue,
                    "WORKER_CONCURRENCY": str(concurrency),
                    "WORKER_HTTP_PORT": str(free_port()),
                    "WORKER_SECRETS_DIR": str(ctx.log_dir / "no-secrets"),
                    **env,  # a scenario may override any of these (S5: the lanes)
                }
            )
            procs.append(Proc(f"worker{index}", [CHAT_WORKER, "run"], ctx.log_dir, env=variables))
        return procs

    return spawn


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def run_main(coroutine: Any) -> Any:
    """Run the orchestrator on uvloop when installed: the collector must not be the limit."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


# --- redis --------------------------------------------------------------------------------


async def redis_keys(pattern: str, *, delete: bool = False, url: str = REDIS_URL) -> int:
    """How many keys match ``pattern`` (SCAN, so a shared Redis is not blocked); with
    ``delete``, delete them too. Only a run's own keys: the Redis may be shared."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
        if delete:
            for start in range(0, len(keys), 1000):
                await client.delete(*keys[start : start + 1000])
        return len(keys)
    finally:
        await client.aclose()


async def redis_answers(url: str = REDIS_URL) -> bool:
    """Whether a Redis answers a PING at ``url`` within a second."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(await client.ping())
    except (aioredis.RedisError, OSError):
        return False
    finally:
        await client.aclose()
