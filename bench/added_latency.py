"""Added latency at low load: one job at a time, through a quorum request queue and the
worker to an upstream that answers at once, against the two parts of that path measured
alone in the same run:

- **direct**: this process POSTs the same body straight to the mock (bare aiohttp);
- **bare loop**: ``raw_loop.py --mode echo`` consumes the same kind of queue and publishes a
  fixed reply to ``reply_to`` with a confirm, then acks (no HTTP at all);
- **worker**: ``chat-worker run``, the job's result back on ``reply_to``.

Each sample is publish → reply received, one in flight. The worker's own share is
``worker p50 - bare loop p50 - direct p50``: what the worker adds besides the broker's round
trip and the HTTP call it makes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import time
from typing import Any

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from baseline_raw import raw_loop
from common import (
    AMQP_URL,
    MockArgs,
    Names,
    Proc,
    RunContext,
    WorkerFactory,
    chat_worker,
    declare_topology,
    delete_topology,
    job_body,
    percentile,
    run_main,
    start_mock,
)
from measure import _drop_logs, _wait_consumers, log_dir_for
from report import Row, Section, table, write_json

TARGET_SHARE_P50_MS = 0.5


def _stats(samples: list[float]) -> dict[str, Any]:
    return {
        "p50": percentile(samples, 50),
        "p90": percentile(samples, 90),
        "p99": percentile(samples, 99),
        "samples": len(samples),
        "all": samples,
    }


class _Path:
    """One contender, ready to time a job at a time: a queue consumed by its process."""

    def __init__(
        self,
        connection: AbstractConnection,
        label: str,
        spawn: WorkerFactory,
        body: bytes | None = None,
    ) -> None:
        self.connection, self.label, self.spawn = connection, label, spawn
        self.names = Names.unique(label)
        self.log_dir = log_dir_for(label)
        self.procs: list[Proc] = []
        self.inbox: asyncio.Queue[tuple[float, AbstractIncomingMessage]] = asyncio.Queue()
        self.samples: list[float] = []
        self.count = 0
        # Every job this one request body (the cache scenario's hits), else a prompt each.
        self.body = body
        self.cache: collections.Counter[str] = collections.Counter()  # metadata.cache, kept

    async def start(self, upstream: str) -> None:
        await declare_topology(self.connection, self.names)
        self.channel = await self.connection.channel()
        self.reply = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await self.reply.consume(self._received, no_ack=True)
        self.procs = self.spawn(RunContext(self.names, upstream, self.log_dir))
        await _wait_consumers(self.channel, self.names.request_queue, 1, self.procs)

    async def _received(self, message: AbstractIncomingMessage) -> None:
        self.inbox.put_nowait((time.perf_counter(), message))

    async def sample(self, keep: bool) -> None:
        self.count += 1
        # The run's own prefix: with a result store, ids of an earlier run would be answered
        # from its stored results.
        job = f"{self.names.prefix}-{self.count}"
        line = job_body(job) if self.body is None else self.body
        started = time.perf_counter()
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                line,
                message_id=job,
                correlation_id=job,
                reply_to=self.reply.name,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            self.names.request_queue,
        )
        async with asyncio.timeout(15):
            arrived, message = await self.inbox.get()
        if message.correlation_id != job:
            raise RuntimeError(f"{self.label}: reply for {message.correlation_id}, not {job}")
        if keep:
            self.samples.append(1000 * (arrived - started))
            if self.body is not None:
                metadata = orjson.loads(message.body).get("metadata") or {}
                self.cache[str(metadata.get("cache"))] += 1

    async def stop(self, failed: bool) -> None:
        for proc in self.procs:
            proc.stop()
        with contextlib.suppress(Exception):
            await self.channel.close()
        await delete_topology(self.connection, self.names)
        _drop_logs(self.log_dir, keep=failed)


async def run_added_latency(samples: int = 300, warmup: int = 30) -> Section:
    """The three contenders take turns, one job each, so that a noisy machine's moments
    fall on all of them alike."""
    log_dir = log_dir_for("latency-mock")
    mock, upstream = await start_mock(MockArgs(), log_dir)
    direct: list[float] = []
    failed = False
    try:
        connection = await aio_pika.connect(AMQP_URL)
        paths = [
            _Path(connection, "latency-bare", raw_loop(mode="echo")),
            _Path(connection, "latency-worker", chat_worker(64)),
        ]
        try:
            for path in paths:
                await path.start(upstream)
            url = f"{upstream}/chat/completions"
            body = orjson.dumps(orjson.loads(job_body("direct"))["body"])
            async with aiohttp.ClientSession() as session:
                for i in range(warmup + samples):
                    started = time.perf_counter()
                    async with session.post(
                        url, data=body, headers={"content-type": "application/json"}
                    ) as response:
                        await response.read()
                    if i >= warmup:
                        direct.append(1000 * (time.perf_counter() - started))
                    for path in paths:
                        await path.sample(keep=i >= warmup)
        except BaseException:
            failed = True
            raise
        finally:
            for path in paths:
                await path.stop(failed)
            await connection.close()
    finally:
        mock.stop()
        _drop_logs(log_dir, keep=failed)
    bare, worker = (path.samples for path in paths)
    parts = {"direct": _stats(direct), "bare": _stats(bare), "worker": _stats(worker)}
    share = parts["worker"]["p50"] - parts["bare"]["p50"] - parts["direct"]["p50"]
    share_p99 = parts["worker"]["p99"] - parts["bare"]["p99"] - parts["direct"]["p99"]
    # The same share per round (its three samples were taken back to back), then its p50:
    # a difference of p50s of right-skewed distributions overstates the share of a sum.
    paired = [w - b - d for w, b, d in zip(worker, bare, direct, strict=True)]
    paired_p50 = percentile(paired, 50)
    rows = [
        Row("added latency: direct HTTP call p50", parts["direct"]["p50"], unit="ms"),
        Row("added latency: bare broker loop p50", parts["bare"]["p50"], unit="ms"),
        Row("added latency: worker path p50", parts["worker"]["p50"], unit="ms"),
        Row("added latency: worker path p99", parts["worker"]["p99"], unit="ms"),
        Row(
            "added latency: worker's own share p50",
            share,
            unit="ms",
            target=TARGET_SHARE_P50_MS,
            upper=True,
        ),
        Row("added latency: worker's own share p99 (from p99s)", share_p99, unit="ms"),
        Row(
            "added latency: worker's own share p50, paired per round",
            paired_p50,
            unit="ms",
            target=TARGET_SHARE_P50_MS,
            upper=True,
        ),
    ]
    data = {
        "samples": samples,
        "warmup": warmup,
        **parts,
        "share_p50_ms": share,
        "share_paired_p50_ms": paired_p50,
    }
    return Section("latency", rows, data)


async def main(args: argparse.Namespace) -> None:
    section = await run_added_latency(args.samples, args.warmup)
    print(table(section.rows))
    print(write_json("added_latency", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    run_main(main(parser.parse_args()))
