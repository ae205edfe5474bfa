"""Heartbeat overhead: the S1 job with WORKER_EVENTS=false and as shipped (heartbeats every
2 s, one console listening), in the same run, order rotated when repeated."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import uuid

import aio_pika
from common import AMQP_URL, chat_worker, run_main
from measure import Setup, measure_each, median_run
from report import Row, Section, table, write_json


async def listener(exchange_name: str, seen: list[int]) -> None:
    """A console's share of the cost: an exclusive queue bound to the events exchange."""
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        async with queue.iterator(no_ack=True) as messages:
            async for _ in messages:
                seen[0] += 1


async def run_events(jobs: int, repeat: int = 1, timeout: float = 240.0) -> Section:
    exchange = f"bench-{uuid.uuid4().hex[:8]}.events"
    seen = [0]
    listening = asyncio.create_task(listener(exchange, seen))
    try:
        runs = await measure_each(
            [
                (
                    Setup("events-off", jobs, timeout=timeout),
                    chat_worker(64, WORKER_EVENTS="false", WORKER_EVENTS_EXCHANGE=exchange),
                ),
                (
                    Setup("events-on", jobs, timeout=timeout),
                    chat_worker(64, WORKER_EVENTS="true", WORKER_EVENTS_EXCHANGE=exchange),
                ),
            ],
            repeat,
        )
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        async with await aio_pika.connect(AMQP_URL) as connection:
            await (await connection.channel()).exchange_delete(exchange)
    off, on = (median_run(runs[k]) for k in ("events-off", "events-on"))
    rows = [
        Row("S1 worker, WORKER_EVENTS=false", off.rate, cpu_us_per_job=off.cpu_us_per_job),
        Row(
            "S1 worker, heartbeats on (as shipped)",
            on.rate,
            baseline=off.rate,
            baseline_label="off",
            cpu_us_per_job=on.cpu_us_per_job,
        ),
    ]
    return Section("events", rows, {"jobs": jobs, "runs": runs, "heartbeats_seen": seen[0]})


async def main(args: argparse.Namespace) -> None:
    section = await run_events(args.jobs, args.repeat, args.timeout)
    print(table(section.rows))
    print(f"heartbeats received by the listener: {section.data['heartbeats_seen']}")
    print(write_json("events_overhead", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240.0)
    run_main(main(parser.parse_args()))
