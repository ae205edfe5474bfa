"""Gateway calls bench (contract §15, Calls), every number against its baseline in the
same run:

(a) latency at low load, calls one after the other: a direct call to the mock; the same
    job published straight to AMQP and its result awaited (the queue and a worker); the
    same call through the gateway. The gateway's own share is the gateway path minus the
    straight-to-AMQP path.
(b) throughput at N calls in flight (non-streamed, zero-latency mock): one gateway in front
    of two worker processes, against the same workers fed straight from the queue with N
    jobs in flight; calls/s, p50/p99, CPU per call, and the gateway's RSS.

    python bench/gateway_calls.py [--sequential 300] [--calls 5000] [--rounds 3]
                                  [--concurrency 1000] [--worker-concurrency 256]

The load generator is this process (aiohttp and aio-pika on uvloop); on a small shared
machine it competes with the processes it measures, so read the ratios, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
from common import (
    AMQP_URL,
    CHAT_WORKER,
    MODEL,
    RESULTS,
    MockArgs,
    Names,
    Proc,
    RunContext,
    chat_worker,
    clean_env,
    declare_topology,
    delete_topology,
    free_port,
    percentile,
    queue_counts,
    run_main,
    start_mock,
)


def body(tag: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"say hello {tag}"}]}


class Direct:
    """Jobs published straight to the request queue, each awaiting its own result."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, queue: str) -> None:
        self.channel, self.queue = channel, queue
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.replies = ""

    async def start(self) -> None:
        replies = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        self.replies = replies.name
        await replies.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self.waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done() and message.type == "chat.result":
            future.set_result(message.body)

    async def call(self, tag: str) -> None:
        job = f"bench-{uuid.uuid4().hex}"
        future = self.waiting[job] = asyncio.get_running_loop().create_future()
        line = {"custom_id": job, "method": "POST", "url": "/v1/chat/completions"}
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                orjson.dumps({**line, "body": body(tag)}),
                message_id=job,
                correlation_id=job,
                reply_to=self.replies,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            self.queue,
        )
        result = orjson.loads(await future)
        assert result["error"] is None, result["error"]


async def post(session: aiohttp.ClientSession, url: str, tag: str) -> None:
    async with session.post(url, json=body(tag)) as response:
        document = await response.read()
        assert response.status == 200, document[:300]


async def sequential(
    n: int, paths: dict[str, Callable[[str], Awaitable[None]]]
) -> dict[str, list[float]]:
    """``n`` calls on each path, one at a time, the paths taking turns (drift hits all)."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(n + 20):
        for name, call in paths.items():
            started = time.perf_counter()
            await call(f"{name}-{i}")
            if i >= 20:  # warm-up calls are not counted
                times[name].append((time.perf_counter() - started) * 1000)
    return times


async def in_flight(
    total: int, width: int, call: Callable[[str], Awaitable[None]], watched: list[Proc]
) -> dict[str, Any]:
    """``total`` calls, ``width`` at a time; latencies, rate, CPU and peak RSS of ``watched``."""
    latencies: list[float] = []
    counter = iter(range(total))
    cpu_before = [p.cpu_seconds() for p in watched]
    peak = [p.rss() for p in watched]

    async def lane() -> None:
        for i in counter:
            started = time.perf_counter()
            await call(f"load-{i}")
            latencies.append((time.perf_counter() - started) * 1000)

    async def sample() -> None:
        while True:
            for k, proc in enumerate(watched):
                peak[k] = max(peak[k], proc.rss())
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(width)))
    elapsed = time.perf_counter() - started
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    cpu = [p.cpu_seconds() - before for p, before in zip(watched, cpu_before, strict=True)]
    return {
        "calls": total,
        "seconds": elapsed,
        "rate": total / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "cpu_ms_per_call": [1000 * c / total for c in cpu],
        "peak_rss_mib": [r / 2**20 for r in peak],
    }


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    names = Names.unique("calls")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS / "logs" / f"{stamp}-gateway-calls"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    connection = await aio_pika.connect(AMQP_URL)
    await declare_topology(connection, names)
    folder = tempfile.TemporaryDirectory()
    try:
        mock, upstream = await start_mock(MockArgs(), log_dir)
        procs.append(mock)
        port = free_port()
        gateway_env = clean_env(
            WORKER_AMQP_URL=AMQP_URL,
            WORKER_REQUEST_QUEUE=names.request_queue,
            WORKER_RESULT_EXCHANGE=names.result_exchange,
            WORKER_RESULT_QUEUE=names.result_queue,
            WORKER_DEAD_LETTER_QUEUE=names.dead_letter_queue,
            WORKER_DATABASE_URL=f"sqlite:///{Path(folder.name) / 'gateway.db'}",
            WORKER_GATEWAY_PORT=str(port),
            WORKER_GATEWAY_RESULTS_QUEUE=f"{names.prefix}.gateway",
            WORKER_LOG_LEVEL="warning",
        )
        gateway = Proc("gateway", [CHAT_WORKER, "gateway"], log_dir, env=gateway_env)
        procs.append(gateway)
        workers = chat_worker(args.worker_concurrency, processes=2, WORKER_LOG_LEVEL="warning")(
            RunContext(names, upstream, log_dir)
        )
        procs += workers
        channel = await connection.channel(publisher_confirms=True)

        async def consumers_up() -> bool:
            return (await queue_counts(channel, names.request_queue))[1] >= 2

        connector = aiohttp.TCPConnector(limit=args.concurrency + 50)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def gateway_ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                        return response.status == 200
                return False

            await wait_until(gateway_ready, "the gateway")
            await wait_until(consumers_up, "two workers")
            direct = Direct(channel, names.request_queue)
            await direct.start()
            through = f"http://127.0.0.1:{port}/v1/chat/completions"
            paths: dict[str, Callable[[str], Awaitable[None]]] = {
                "mock": lambda tag: post(session, f"{upstream}/chat/completions", tag),
                "amqp": direct.call,
                "gateway": lambda tag: post(session, through, tag),
            }
            latency = await sequential(args.sequential, paths)
            idle_rss = gateway.rss() / 2**20
            # Rounds in turn (queue, gateway; gateway, queue; ...): the machine's load drifts
            # over minutes, and each round's ratio compares two runs close in time.
            queue_runs: list[dict[str, Any]] = []
            gateway_runs: list[dict[str, Any]] = []
            for round_no in range(args.rounds):
                order = ["queue", "gateway"] if round_no % 2 == 0 else ["gateway", "queue"]
                for path in order:
                    if path == "queue":
                        queue_runs.append(
                            await in_flight(args.calls, args.concurrency, direct.call, workers)
                        )
                    else:
                        gateway_runs.append(
                            await in_flight(
                                args.calls, args.concurrency, paths["gateway"], [gateway, *workers]
                            )
                        )
    finally:
        for proc in procs:
            proc.stop()
        await delete_topology(connection, names)
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            await cleanup.queue_delete(f"{names.prefix}.gateway")
        await connection.close()
        folder.cleanup()
    report = {
        "latency_ms": {
            name: {"p50": percentile(values, 50), "p99": percentile(values, 99)}
            for name, values in latency.items()
        },
        "straight_to_queue": queue_runs,
        "through_gateway": gateway_runs,
        "gateway_idle_rss_mib": idle_rss,
        "args": vars(args),
    }
    (RESULTS / f"gateway-calls-{stamp}.json").write_text(json.dumps(report, indent=2))
    import shutil

    shutil.rmtree(log_dir, ignore_errors=True)
    return report


def show(report: dict[str, Any]) -> None:
    lat = report["latency_ms"]
    print(f"\n(a) sequential calls ({report['args']['sequential']} each), ms")
    print(f"{'path':<44}{'p50':>9}{'p99':>9}")
    rows = [
        ("direct to the mock", lat["mock"]),
        ("straight to AMQP (queue + worker)", lat["amqp"]),
        ("through the gateway (gateway + queue + worker)", lat["gateway"]),
    ]
    for name, value in rows:
        print(f"{name:<44}{value['p50']:>9.2f}{value['p99']:>9.2f}")
    for name, low, high in (
        ("added by queue + worker", "mock", "amqp"),
        ("added by the gateway itself", "amqp", "gateway"),
        ("added in all over a direct call", "mock", "gateway"),
    ):
        p50 = lat[high]["p50"] - lat[low]["p50"]
        p99 = lat[high]["p99"] - lat[low]["p99"]
        print(f"{name:<44}{p50:>9.2f}{p99:>9.2f}")
    width = report["args"]["concurrency"]
    calls = report["args"]["calls"]
    print(f"\n(b) {calls} non-streamed calls per run, {width} in flight, two workers")
    header = f"{'round':<7}{'path':<24}{'calls/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
    print(f"{header}{'worker CPU ms/call':>20}{'gateway CPU ms/call':>21}{'ratio':>7}")
    pairs = zip(report["straight_to_queue"], report["through_gateway"], strict=True)
    ratios = []
    for n, (queue, gateway) in enumerate(pairs, 1):
        ratios.append(gateway["rate"] / queue["rate"])
        for name, run, workers in (
            ("straight to the queue", queue, queue["cpu_ms_per_call"]),
            ("through the gateway", gateway, gateway["cpu_ms_per_call"][1:]),
        ):
            own = f"{gateway['cpu_ms_per_call'][0]:.2f}" if run is gateway else "-"
            ratio = f"{ratios[-1]:.0%}" if run is gateway else ""
            print(
                f"{n:<7}{name:<24}{run['rate']:>9.0f}{run['p50_ms']:>9.0f}{run['p99_ms']:>9.0f}"
                f"{sum(workers):>20.2f}{own:>21}{ratio:>7}"
            )
    gateway_runs = report["through_gateway"]
    cpu = statistics.median(run["cpu_ms_per_call"][0] for run in gateway_runs)
    busy = statistics.median(run["cpu_ms_per_call"][0] * run["rate"] / 1000 for run in gateway_runs)
    peak = max(run["peak_rss_mib"][0] for run in gateway_runs)
    print(
        f"gateway: median {statistics.median(ratios):.0%} of the workers' own rate; "
        f"CPU {cpu:.2f} ms per call ({busy:.0%} of one core); "
        f"RSS {report['gateway_idle_rss_mib']:.0f} MiB idle, {peak:.0f} MiB peak under load"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--calls", type=int, default=5000, help="calls per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each path, in turn")
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--worker-concurrency", type=int, default=256)
    show(run_main(main(parser.parse_args())))
