"""S5 lanes: interactive jobs behind a batch backlog, with lanes and with one queue.

One worker (concurrency 64), a mock upstream answering in 0.5 s, a backlog of batch jobs
in ``chat.batch:1``, and interactive jobs published at 20 per second in
``chat.interactive:4``. Measured: each interactive job's time from publish to result (p50,
p99), with the two lanes, and with both kinds in one queue (where every interactive job
waits behind the whole backlog). Then both lanes saturated: the split of the jobs
completed over a window, against the weights 4 : 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from common import (
    AMQP_URL,
    RESULTS,
    MockArgs,
    Names,
    RunContext,
    chat_worker,
    delete_topology,
    job_body,
    percentile,
    queue_counts,
    run_main,
    start_mock,
)
from plots import commit
from report import Row, Section, table, write_json

from worker.amqp.topology import DELAY_TIERS, declare, delay_queue_name
from worker.settings import Settings

LATENCY = 0.5
CONCURRENCY = 64
RATE = 20.0  # interactive jobs per second
WEIGHTS = (4, 1)
TARGET_P50, TARGET_P99 = 0.6, 1.5
TARGET_SPLIT = 0.10  # relative


def lane_names(names: Names) -> tuple[str, str]:
    return f"{names.prefix}.interactive", f"{names.prefix}.batch"


class Results:
    """Arrival time of each result, by job id (the correlation id), and its lane."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.upstream_s: dict[str, float] = {}  # the upstream call as the worker timed it
        self.arrived = asyncio.Event()

    async def consume(self, channel: AbstractChannel, queue: str) -> None:
        await channel.set_qos(prefetch_count=0)
        declared = await channel.get_queue(queue, ensure=False)
        await declared.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if message.type == "chat.result":
            job = str(message.correlation_id)
            self.at.setdefault(job, time.time())
            if job.startswith("i"):
                latency = orjson.loads(message.body)["metadata"].get("latency_ms")
                self.upstream_s[job] = (latency or 0.0) / 1000
            self.arrived.set()


async def publish(channel: AbstractChannel, queue: str, job_id: str) -> None:
    await channel.default_exchange.publish(
        aio_pika.Message(
            job_body(job_id),
            message_id=job_id,
            correlation_id=job_id,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        queue,
    )


async def backlog(channel: AbstractChannel, queue: str, prefix: str, count: int) -> None:
    for start in range(0, count, 500):
        await asyncio.gather(
            *(
                publish(channel, queue, f"{prefix}{n}")
                for n in range(start, min(count, start + 500))
            )
        )


async def _setup(
    connection: aio_pika.abc.AbstractConnection, names: Names, request_queue: str, log_dir: Path
) -> tuple[Settings, Results, AbstractChannel]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        amqp_url=AMQP_URL,
        request_queue=request_queue,
        result_exchange=names.result_exchange,
        result_queue=names.result_queue,
        dead_letter_queue=names.dead_letter_queue,
    )
    await declare(connection, settings)
    results = Results()
    await results.consume(await connection.channel(), names.result_queue)
    return settings, results, await connection.channel()


async def _cleanup(connection: aio_pika.abc.AbstractConnection, names: Names) -> None:
    await delete_topology(connection, names)
    for lane in lane_names(names):
        delays = [delay_queue_name(lane, s, t) for s in DELAY_TIERS for t in ("quorum", "classic")]
        for queue in (lane, f"{lane}.dlq", *delays):
            with contextlib.suppress(Exception):
                channel = await connection.channel()
                await channel.queue_delete(queue)
                await channel.close()


async def _sample_ready(channel: AbstractChannel, queue: str, into: list[int]) -> None:
    """Ready messages of ``queue`` every 20 ms (interactive jobs not yet delivered)."""
    while True:
        into.append((await queue_counts(channel, queue))[0])
        await asyncio.sleep(0.02)


async def _wait_consuming(channel: AbstractChannel, queue: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (await queue_counts(channel, queue))[1] == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no consumer on {queue}")
        await asyncio.sleep(0.05)


async def interactive_latency(
    lanes: bool, backlog_jobs: int, seconds: float, warmup: float, log_dir: Path
) -> dict[str, Any]:
    """Publish-to-result times of interactive jobs arriving at RATE behind the backlog."""
    names = Names.unique("s5-lanes" if lanes else "s5-one")
    interactive, batch = lane_names(names)
    if lanes:
        request_queue = f"{interactive}:{WEIGHTS[0]},{batch}:{WEIGHTS[1]}"
    else:
        interactive = batch = request_queue = names.request_queue
    connection = await aio_pika.connect(AMQP_URL)
    mock, upstream = await start_mock(MockArgs(latency=LATENCY), log_dir)
    procs = []
    try:
        _, results, channel = await _setup(connection, names, request_queue, log_dir)
        await backlog(channel, batch, "b", backlog_jobs)
        ctx = RunContext(names, upstream, log_dir)
        procs = chat_worker(CONCURRENCY, WORKER_REQUEST_QUEUE=request_queue)(ctx)
        await _wait_consuming(channel, batch)
        await asyncio.sleep(warmup)  # the backlog holds the worker's slots
        published: dict[str, float] = {}
        ready: list[int] = []
        sampler = asyncio.create_task(_sample_ready(await connection.channel(), interactive, ready))
        started = time.monotonic()
        for n in range(int(seconds * RATE)):
            await asyncio.sleep(max(0.0, started + n / RATE - time.monotonic()))
            job_id = f"i{n}"
            published[job_id] = time.time()
            await publish(channel, interactive, job_id)
        sampler.cancel()
        deadline = time.monotonic() + (60 if lanes else 30)
        while time.monotonic() < deadline and not all(j in results.at for j in published):
            await asyncio.sleep(0.1)
        # A job still unanswered counts with its wait so far: a lower bound (one queue).
        now = time.time()
        waits = [results.at.get(j, now) - t for j, t in published.items()]
        # What is not the upstream call: waiting for a slot, the broker, the event loops.
        overhead = [
            results.at[j] - t - results.upstream_s[j]
            for j, t in published.items()
            if j in results.upstream_s
        ]
        upstream = list(results.upstream_s.values())
        return {
            "mode": "lanes" if lanes else "one queue",
            "published": len(published),
            "answered": sum(j in results.at for j in published),
            "p50": percentile(waits, 50),
            "p99": percentile(waits, 99),
            "upstream_p50": percentile(upstream, 50),
            # Little's law: jobs waiting in the broker on average / arrival rate = mean wait
            # there, for a slot of this worker (in one queue, behind the backlog too).
            "broker_wait_mean": (sum(ready) / len(ready) / RATE) if ready else float("nan"),
            "outside_upstream_p50": percentile(overhead, 50),
            "outside_upstream_p99": percentile(overhead, 99),
            "batch_done": sum(j.startswith("b") for j in results.at),
            # Every interactive job's publish to result (seconds), for the figure's CDF.
            "waits": sorted(round(w, 4) for w in waits),
        }
    finally:
        for proc in procs:
            proc.stop()
        mock.stop()
        await _cleanup(connection, names)
        await connection.close()


async def saturated_split(jobs: int, window: float, log_dir: Path) -> dict[str, Any]:
    """Both lanes with a backlog: the split of completions over ``window`` seconds."""
    names = Names.unique("s5-split")
    interactive, batch = lane_names(names)
    request_queue = f"{interactive}:{WEIGHTS[0]},{batch}:{WEIGHTS[1]}"
    connection = await aio_pika.connect(AMQP_URL)
    mock, upstream = await start_mock(MockArgs(latency=LATENCY), log_dir)
    procs = []
    try:
        _, results, channel = await _setup(connection, names, request_queue, log_dir)
        await backlog(channel, interactive, "i", jobs)
        await backlog(channel, batch, "b", jobs)
        procs = chat_worker(CONCURRENCY, WORKER_REQUEST_QUEUE=request_queue)(
            RunContext(names, upstream, log_dir)
        )
        await _wait_consuming(channel, batch)
        await asyncio.sleep(2.0)  # past the first wave
        before = set(results.at)
        await asyncio.sleep(window)
        done = Counter(j[0] for j in set(results.at) - before)
        share = done["i"] / max(1, done["i"] + done["b"])
        return {"interactive": done["i"], "batch": done["b"], "interactive_share": share}
    finally:
        for proc in procs:
            proc.stop()
        mock.stop()
        await _cleanup(connection, names)
        await connection.close()


async def run_s5(
    backlog_jobs: int = 20_000, seconds: float = 60.0, window: float = 20.0
) -> Section:
    log_dir = RESULTS / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-s5"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for lanes in (True, False):
        run_dir = log_dir / ("lanes" if lanes else "one-queue")
        run_dir.mkdir()
        run = await interactive_latency(lanes, backlog_jobs, seconds, 3.0, run_dir)
        shown = {key: value for key, value in run.items() if key != "waits"}
        print(f"  {shown}", file=sys.stderr, flush=True)
        runs.append(run)
    (log_dir / "split").mkdir()
    split = await saturated_split(max(2_000, int(window * 200)), window, log_dir / "split")
    print(f"  {split}", file=sys.stderr, flush=True)
    with_lanes, one_queue = runs
    expected = WEIGHTS[0] / sum(WEIGHTS)
    rows = [
        Row(
            "S5 interactive p50, lanes", with_lanes["p50"], unit="s", target=TARGET_P50, upper=True
        ),
        Row(
            "S5 interactive p99, lanes", with_lanes["p99"], unit="s", target=TARGET_P99, upper=True
        ),
        Row(
            "S5 lanes: interactive wait in the broker, mean (Little)",
            with_lanes["broker_wait_mean"],
            unit="s",
        ),
        Row(
            "S5 lanes: upstream call as the worker timed it, p50",
            with_lanes["upstream_p50"],
            unit="s",
        ),
        Row(
            "S5 lanes: publish to result minus upstream, p50",
            with_lanes["outside_upstream_p50"],
            unit="s",
        ),
        Row(
            "S5 lanes: publish to result minus upstream, p99",
            with_lanes["outside_upstream_p99"],
            unit="s",
        ),
        # Unanswered jobs count with their wait so far: with one queue, lower bounds.
        Row("S5 interactive p50, one queue (>=)", one_queue["p50"], unit="s"),
        Row("S5 interactive p99, one queue (>=)", one_queue["p99"], unit="s"),
        Row(
            f"S5 saturated: interactive share {split['interactive_share']:.3f} vs {expected:g},"
            " deviation",
            abs(split["interactive_share"] / expected - 1),
            unit="",
            target=TARGET_SPLIT,
            upper=True,
        ),
    ]
    data = {
        "runs": runs,
        "split": split,
        "backlog": backlog_jobs,
        "rate": RATE,
        "seconds": seconds,
        "window": window,
        "weights": WEIGHTS,
        "targets": {"p50": TARGET_P50, "p99": TARGET_P99, "split": TARGET_SPLIT},
    }
    return Section("s5", rows, data)


async def main(args: argparse.Namespace) -> None:
    section = await run_s5(args.backlog, args.seconds, args.window)
    print(table(section.rows))
    payload = {"args": vars(args), "commit": commit(), "section": section.__dict__}
    print(write_json("s5_lanes", payload))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=20_000, help="batch jobs queued first")
    parser.add_argument("--seconds", type=float, default=60.0, help="interactive arrivals for")
    parser.add_argument("--window", type=float, default=20.0, help="saturated split window")
    run_main(main(parser.parse_args()))
