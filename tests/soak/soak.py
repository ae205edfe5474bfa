"""Soak: thousands of jobs through random upstream faults and worker restarts; nothing lost.

Run on demand (``make soak``, or ``python tests/soak/soak.py --jobs 5000``), not in CI.
It starts the mock upstream with random faults (429, 5xx, stalls, malformed bodies, error
events, dropped connections), two worker processes, and keeps breaking the workers at
random: ``kill -9``, SIGTERM (then restart), and connections closed by the broker. It
reports jobs in, results out, lost (must be 0) and duplicated, and exits 1 if any was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson

from worker.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from brokerctl import close_connections_of

from worker.amqp.topology import declare, delay_queues

MOCK_PORT = 18765


def spawn_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env.update(settings.to_env())
    env["WORKER_LOG_LEVEL"] = "warning"
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "run"], env=env, stdout=subprocess.DEVNULL
    )


async def main(args: argparse.Namespace) -> int:
    prefix = f"soak-{uuid.uuid4().hex[:6]}"
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        amqp_url=args.amqp_url,
        upstream_base_url=f"http://127.0.0.1:{MOCK_PORT}/v1",
        request_queue=f"{prefix}.requests",
        result_exchange=f"{prefix}.results",
        result_queue=f"{prefix}.results",
        dead_letter_queue=f"{prefix}.dlq",
        concurrency=args.concurrency,
        request_timeout=3,
        stream_idle_timeout=2,
        shutdown_grace=5,
        http_port=0,
    )
    mock = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "mock-upstream",
            "--port",
            str(MOCK_PORT),
            "--fault-rate",
            str(args.fault_rate),
            "--seed",
            "7",
            "--latency",
            "0.02",
            "--chunks",
            "6",
            "--chunk-interval",
            "0.005",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    connection = await aio_pika.connect(args.amqp_url)
    await declare(connection, settings)
    channel = await connection.channel()
    results: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()

    async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        document = orjson.loads(message.body)
        results[document["id"]] += 1
        codes[(document.get("error") or {}).get("code", "ok")] += 1

    result_queue = await channel.get_queue(settings.result_queue)
    await result_queue.consume(on_result, no_ack=True)

    rng = random.Random(args.seed)
    ids = [f"soak-{n}" for n in range(args.jobs)]
    for n, job_id in enumerate(ids):
        body: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"soak job {n}"}],
            "stream": rng.random() < 0.3,
        }
        await channel.default_exchange.publish(
            aio_pika.Message(
                orjson.dumps({"custom_id": job_id, "body": body}),
                message_id=job_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            settings.request_queue,
        )
    print(f"published {len(ids)} jobs to {settings.request_queue}", flush=True)

    workers = [spawn_worker(settings) for _ in range(args.workers)]
    breaks: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    deadline = started + args.timeout
    next_break = started + args.break_every
    try:
        while len(results) < len(ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            for i, process in enumerate(workers):
                if process.poll() is not None:  # restart whatever is down
                    workers[i] = spawn_worker(settings)
            if time.monotonic() >= next_break:
                next_break += args.break_every
                victim = rng.randrange(len(workers))
                kind = rng.choice(("kill -9", "SIGTERM", "connection closed"))
                breaks[kind] += 1
                if kind == "kill -9":
                    workers[victim].send_signal(signal.SIGKILL)
                elif kind == "SIGTERM":
                    workers[victim].send_signal(signal.SIGTERM)
                else:
                    await asyncio.to_thread(close_connections_of, workers[victim].pid)
            print(
                f"\r{len(results)}/{len(ids)} results, breaks {dict(breaks)}   ", end="", flush=True
            )
    finally:
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in workers:
            process.wait(30)
        try:
            stats = httpx.get(f"http://127.0.0.1:{MOCK_PORT}/mock/stats").json()
        except httpx.HTTPError:
            stats = {}
        mock.send_signal(signal.SIGTERM)
        mock.wait(10)
        dlq = await channel.declare_queue(settings.dead_letter_queue, passive=True)
        dead = dlq.declaration_result.message_count
        for name in (
            settings.request_queue,
            settings.result_queue,
            settings.dead_letter_queue,
            *delay_queues(settings),
        ):
            await channel.queue_delete(name)
        await channel.exchange_delete(settings.result_exchange)
        await connection.close()

    lost = len(set(ids) - set(results))
    duplicated = sum(n - 1 for n in results.values())
    elapsed = time.monotonic() - started
    print()
    print(f"jobs in            {len(ids)}")
    print(f"results out        {sum(results.values())} ({len(results)} jobs) in {elapsed:.0f}s")
    print(f"lost               {lost}")
    print(f"duplicated         {duplicated}")
    print(f"outcomes           {dict(codes)}")
    print(f"dead-lettered      {dead}")
    print(f"upstream calls     {stats.get('total')}, faults injected {stats.get('faults')}")
    print(f"worker breaks      {dict(breaks)}")
    return 1 if lost else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--break-every", type=float, default=3.0, help="seconds")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("WORKER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
