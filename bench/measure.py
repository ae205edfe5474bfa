"""One measured run, and several: fill the queue, start the workers, collect, conclude.

One run looks like production: the mock upstream, the worker(s) and this process (producer
and collector) are separate OS processes. The request queue is filled first, then the
workers start; the clock runs from the moment a consumer appears on the request queue to
the last result received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from common import (
    AMQP_URL,
    RESULTS,
    MockArgs,
    Names,
    Proc,
    RunContext,
    WorkerFactory,
    declare_topology,
    delete_topology,
    fill_queue,
    queue_counts,
    start_mock,
)

SAMPLE_INTERVAL = 0.2  # seconds between RSS samples


# --- collecting ---------------------------------------------------------------------------


class Collector:
    """Records what arrives for each job: deltas (count, first arrival) and the result."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.result_at: dict[str, float] = {}
        self.first_delta_at: dict[str, float] = {}
        self.deltas: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.duplicates = 0
        self.done = asyncio.Event()

    async def consume(self, channel: AbstractChannel, queue: str) -> None:
        await channel.set_qos(prefetch_count=0)
        declared = await channel.get_queue(queue, ensure=False)
        await declared.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.time()
        job = str(message.correlation_id)
        if message.type == "chat.delta":
            self.deltas[job] += 1
            self.first_delta_at.setdefault(job, now)
            return
        if job in self.result_at:
            self.duplicates += 1
            return
        self.result_at[job] = now
        status = (message.headers or {}).get("x-status", "ok")
        self.statuses[status.decode() if isinstance(status, bytes) else str(status)] += 1
        if len(self.result_at) >= self.expected:
            self.done.set()


# --- one measured run ---------------------------------------------------------------------


@dataclass
class Run:
    """The measurements of one run."""

    label: str
    jobs: int
    prefix: str = ""  # the run's queue names (and, with ``Setup.unique_ids``, job ids)
    completed: int = 0
    seconds: float = 0.0
    rate: float = 0.0  # jobs / (last result - first consumer)
    steady_rate: float = 0.0  # between the 10th and 90th percentile of result arrivals
    errors: int = 0
    duplicates: int = 0
    timed_out: bool = False
    consumer_skew: float = 0.0  # first to last worker consuming (several workers)
    worker_cpu_s: float = 0.0
    cpu_us_per_job: float = 0.0
    mock_cpu_pct: float = 0.0
    rss_samples: list[int] = field(default_factory=list)

    @property
    def rss_load(self) -> int:
        """Median worker RSS over the middle of the run."""
        samples = self.rss_samples
        middle = samples[len(samples) // 10 : max(len(samples) * 9 // 10, 1)] or samples
        return int(statistics.median(middle)) if middle else 0

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "rss_samples"}
        out["rss_load"] = self.rss_load
        out["rss_peak"] = max(self.rss_samples, default=0)
        return out


@dataclass(frozen=True)
class Setup:
    """What one run puts in the queue, and how the mock upstream behaves."""

    label: str
    jobs: int
    mock: MockArgs = field(default_factory=MockArgs)
    stream: bool = False
    reply_to: bool = False  # results (and deltas) to a reply queue instead of the result queue
    timeout: float = 300.0
    workers: int = 1  # processes the factory starts (to know when all consume)
    unique_ids: bool = False  # job ids (and prompts) of this run alone: a result store is on


def log_dir_for(label: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / "logs" / f"{stamp}-{label}-{uuid.uuid4().hex[:4]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def measure(
    setup: Setup,
    spawn: WorkerFactory,
    *,
    on_started: Callable[[list[Proc]], Callable[[], None]] | None = None,
) -> tuple[Run, Collector, dict[str, Any]]:
    """Fill, start the workers, time to the last result, stop, clean up.

    ``on_started(workers)`` runs once they consume (a profiler attaches there); what it
    returns is called when the last result is in, before the workers stop.
    Returns the run, its collector, and (with a timed mock) the mock's first-content times.
    """
    names = Names.unique(setup.label)
    log_dir = log_dir_for(setup.label)
    run = Run(setup.label, setup.jobs, names.prefix)
    collector = Collector(setup.jobs)
    mock, upstream = await start_mock(setup.mock, log_dir)
    try:
        connection = await aio_pika.connect(AMQP_URL)
    except BaseException:
        mock.stop()
        raise
    procs: list[Proc] = []
    first_content: dict[str, Any] = {}
    collect_channel = await connection.channel()
    try:
        await declare_topology(connection, names)
        channel = await connection.channel(publisher_confirms=True)
        reply_queue = None
        if setup.reply_to:
            reply = await collect_channel.declare_queue(exclusive=True, auto_delete=True)
            reply_queue = reply.name
        await fill_queue(
            channel,
            names.request_queue,
            setup.jobs,
            stream=setup.stream,
            reply_to=reply_queue,
            ids=f"{names.prefix}-j" if setup.unique_ids else "j",
        )
        await collector.consume(collect_channel, reply_queue or names.result_queue)
        procs = spawn(RunContext(names, upstream, log_dir))
        consuming = await _wait_consumers(channel, names.request_queue, setup.workers, procs)
        t0 = consuming[0]
        run.consumer_skew = consuming[-1] - t0
        cpu0 = sum(p.cpu_seconds() for p in procs)
        mock_cpu0, mock_t0 = mock.cpu_seconds(), time.monotonic()
        finish = on_started(procs) if on_started is not None else None
        sampler = asyncio.create_task(_sample_rss(procs, run.rss_samples))
        try:
            await _wait_done(collector, procs, setup.timeout)
        except TimeoutError:
            run.timed_out = True
        finally:
            sampler.cancel()
            if finish is not None:
                finish()
        run.worker_cpu_s = sum(p.cpu_seconds() for p in procs) - cpu0
        run.mock_cpu_pct = 100 * (mock.cpu_seconds() - mock_cpu0) / (time.monotonic() - mock_t0)
        _conclude(run, collector, t0)
        if setup.mock.timed:
            first_content = await _fetch_first_content(upstream)
    finally:
        for proc in procs:
            proc.stop()
        mock.stop()
        # Closed first, or deleting the queue it consumes makes the broker cancel it loudly.
        with contextlib.suppress(Exception):
            await collect_channel.close()
        await delete_topology(connection, names)
        await connection.close()
    _drop_logs(log_dir, keep=run.timed_out or run.errors > 0)
    return run, collector, first_content


def _drop_logs(log_dir: Path, *, keep: bool) -> None:
    """A clean run's logs go (a worker writes a line per job); a failed one keeps them.
    ``BENCH_KEEP_LOGS=1`` keeps every run's."""
    if keep or os.environ.get("BENCH_KEEP_LOGS") == "1":
        print(f"  logs: {log_dir}", file=sys.stderr)
        return
    shutil.rmtree(log_dir, ignore_errors=True)


async def _wait_consumers(
    channel: AbstractChannel, queue: str, expected: int, procs: list[Proc], timeout: float = 60
) -> list[float]:
    """Times (epoch) at which the 1st, 2nd, … consumer appeared on ``queue``."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while len(seen) < expected:
        _, consumers = await queue_counts(channel, queue)
        now = time.time()
        seen += [now] * (min(consumers, expected) - len(seen))
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited before consuming:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no consumer on {queue} after {timeout:g}s")
        if len(seen) < expected:
            await asyncio.sleep(0.005)
    return seen


async def _wait_done(collector: Collector, procs: list[Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not collector.done.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited during the run:\n{proc.tail()}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(collector.done.wait(), 0.5)


async def _sample_rss(procs: list[Proc], samples: list[int]) -> None:
    while True:
        samples.append(sum(p.rss() for p in procs))
        await asyncio.sleep(SAMPLE_INTERVAL)


def _conclude(run: Run, collector: Collector, t0: float) -> None:
    arrivals = sorted(collector.result_at.values())
    run.completed = len(arrivals)
    run.errors = sum(n for status, n in collector.statuses.items() if status != "ok")
    run.duplicates = collector.duplicates
    if not arrivals:
        return
    run.seconds = arrivals[-1] - t0
    run.rate = run.completed / run.seconds if run.seconds > 0 else 0.0
    low, high = len(arrivals) // 10, max(len(arrivals) * 9 // 10 - 1, 0)
    if high > low and arrivals[high] > arrivals[low]:
        run.steady_rate = (high - low) / (arrivals[high] - arrivals[low])
    if run.completed:
        run.cpu_us_per_job = 1e6 * run.worker_cpu_s / run.completed


async def _fetch_first_content(upstream: str) -> dict[str, Any]:
    base = upstream.removesuffix("/v1")
    async with aiohttp.ClientSession() as session, session.get(f"{base}/bench/first-content") as r:
        data: dict[str, Any] = await r.json()
        return data


# --- several runs -------------------------------------------------------------------------


def progress(run: Run) -> None:
    flag = " TIMEOUT" if run.timed_out else ""
    print(
        f"  {run.label:<22} {run.completed:>6}/{run.jobs} jobs in {run.seconds:6.1f}s "
        f"= {run.rate:8.1f} jobs/s (steady {run.steady_rate:8.1f}), worker CPU "
        f"{run.cpu_us_per_job:6.0f} us/job, mock CPU {run.mock_cpu_pct:3.0f}%, "
        f"errors {run.errors}{flag}",
        file=sys.stderr,
        flush=True,
    )


async def measure_each(
    contenders: Sequence[tuple[Setup, WorkerFactory]], repeat: int = 1
) -> dict[str, list[Run]]:
    """Run every contender ``repeat`` times, rotating the order so that no contender always
    meets the same moment of a noisy machine."""
    runs: dict[str, list[Run]] = {setup.label: [] for setup, _ in contenders}
    for round_ in range(repeat):
        shift = round_ % len(contenders)
        for setup, spawn in [*contenders[shift:], *contenders[:shift]]:
            run, _, _ = await measure(setup, spawn)
            progress(run)
            runs[setup.label].append(run)
    return runs


def median_run(runs: Sequence[Run]) -> Run:
    """The run with the median rate (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda run: run.rate)
    return ordered[(len(ordered) - 1) // 2]


async def idle_rss(spawn: WorkerFactory, label: str, settle: float = 1.5) -> int:
    """Resident memory of the worker(s) ``spawn`` starts, consuming an empty queue.

    A probe of its own, so that the measured run can still start on a filled queue. The
    upstream URL is never called: no job arrives.
    """
    names = Names.unique(f"{label}-idle")
    log_dir = log_dir_for(f"{label}-idle")
    connection = await aio_pika.connect(AMQP_URL)
    procs: list[Proc] = []
    try:
        await declare_topology(connection, names)
        channel = await connection.channel()
        procs = spawn(RunContext(names, "http://127.0.0.1:9/v1", log_dir))
        await _wait_consumers(channel, names.request_queue, len(procs), procs)
        await asyncio.sleep(settle)
        samples = []
        for _ in range(5):
            samples.append(sum(p.rss() for p in procs))
            await asyncio.sleep(SAMPLE_INTERVAL)
    finally:
        for proc in procs:
            proc.stop()
        await delete_topology(connection, names)
        await connection.close()
    _drop_logs(log_dir, keep=False)
    return int(statistics.median(samples))
