"""Soak: thousands of jobs through random upstream faults and worker restarts; nothing lost.

Run on demand (``make soak``, or ``python tests/soak/soak.py --jobs 5000``), not in CI.
It starts the mock upstream with random faults (429, 5xx, stalls, malformed bodies, error
events, dropped connections), two worker processes, and keeps breaking the workers at
random: ``kill -9``, SIGTERM (then restart), and connections closed by the broker. It
reports jobs in, results out, lost (must be 0) and duplicated, and exits 1 if any was lost.

**Paid twice.** The mock is ``paying_mock.py``: the bundled mock plus a record, per job,
of every complete 200 answer it finished sending (every job's prompt is its own, so a
request maps to its job). With the result store on (``--store``, the default when a Redis
answers at ``--redis-url``: ``WORKER_REDIS_URL`` and the default ``WORKER_RESULT_TTL``),
a job whose answer reached a worker must never be paid twice (contract §16): the soak
counts the jobs paid more than once and exits 1 if any is left once those a ``kill -9``
explains are set apart. A worker killed after the mock finished sending an answer and
before it stored the result (a few milliseconds a job) loses that answer: its job is
called again once the lease expires, and no store can prevent it. Each job paid twice is
put down to the first break that hit, within ``--kill-window`` seconds after its first
answer, the process that got that answer (the soak samples the workers' connections to
the mock; any worker's break when the connection was not seen); only ``kill -9`` excuses
it. ``--strict`` fails on any job paid twice. Each run's job ids are its own, and its keys
are deleted from Redis afterwards.

The mock answers after ``--latency`` (0.02 s): at that latency few calls are in flight
when a break comes, so a break rarely catches an answer between the mock and the store;
``--latency 0.5`` keeps a worker's 64 slots busy and tests the store (and the lease) much
harder. ``--log-dir DIR`` keeps the workers' output (``--log-level info`` for a line a job).
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
import psutil
import redis

from worker.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from brokerctl import close_connections_of

from worker.amqp.dlq import describe
from worker.amqp.topology import declare, delay_queues

HERE = Path(__file__).resolve().parent
LOCAL_REDIS = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def delete_keys(url: str, pattern: str) -> int:
    """Delete the keys matching ``pattern`` (this run's own: the Redis may be shared)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        return len(keys)
    finally:
        client.close()


def mock_ports_of(pid: int, mock_port: int) -> set[int]:
    """Local ports of the process's TCP connections to the mock."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {c.laddr.port for c in connections if c.raddr and c.raddr.port == mock_port}


def spawn_worker(
    settings: Settings, log: Path | None = None, level: str = "warning"
) -> subprocess.Popen[bytes]:
    """A worker process; its output (JSON lines) appended to ``log`` when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env.update(settings.to_env())
    env["WORKER_LOG_LEVEL"] = level
    if log is None:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", "run"], env=env, stdout=subprocess.DEVNULL
        )
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", "run"], env=env, stdout=out, stderr=out
        )


async def main(args: argparse.Namespace) -> int:
    prefix = f"soak-{uuid.uuid4().hex[:6]}"
    store = redis_answers(args.redis_url) if args.store is None else args.store
    if store and not redis_answers(args.redis_url):
        print(f"--store: no Redis answers at {args.redis_url}", file=sys.stderr)
        return 2
    mock_port = free_port()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        amqp_url=args.amqp_url,
        redis_url=args.redis_url if store else None,
        upstream_base_url=f"http://127.0.0.1:{mock_port}/v1",
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
            str(HERE / "paying_mock.py"),
            "--port",
            str(mock_port),
            "--fault-rate",
            str(args.fault_rate),
            "--seed",
            "7",
            "--latency",
            str(args.latency),
            "--chunks",
            "6",
            "--chunk-interval",
            "0.005",
        ],
        stdout=subprocess.DEVNULL,
    )
    mock_url = f"http://127.0.0.1:{mock_port}"
    for _ in range(200):
        if mock.poll() is not None:
            raise SystemExit(
                f"soak: the mock upstream exited ({mock.returncode}) before it listened"
            )
        try:
            if httpx.get(f"{mock_url}/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.05)
    else:
        raise SystemExit("soak: the mock upstream did not listen within 10 s")
    connection = await aio_pika.connect(args.amqp_url)
    await declare(connection, settings)
    channel = await connection.channel()
    results: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    succeeded: set[str] = set()

    async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        document = orjson.loads(message.body)
        results[document["id"]] += 1
        code = (document.get("error") or {}).get("code", "ok")
        codes[code] += 1
        if code == "ok":
            succeeded.add(document["id"])

    result_queue = await channel.get_queue(settings.result_queue)
    await result_queue.consume(on_result, no_ack=True)

    rng = random.Random(args.seed)
    # Ids and prompts of this run alone: the store keeps results a day, and the mock maps a
    # request to its job by the prompt.
    ids = [f"{prefix}-{n}" for n in range(args.jobs)]
    for n, job_id in enumerate(ids):
        body: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"{job_id}: soak job {n}"}],
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
    print(
        f"published {len(ids)} jobs to {settings.request_queue}; "
        f"result store {'on' if store else 'off'}",
        flush=True,
    )

    log_dir = Path(args.log_dir) / prefix if args.log_dir else None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)

    def spawn(index: int) -> subprocess.Popen[bytes]:
        log = None if log_dir is None else log_dir / f"worker{index}.log"
        return spawn_worker(settings, log, args.log_level)

    workers = [spawn(i) for i in range(args.workers)]
    breaks: collections.Counter[str] = collections.Counter()
    port_pid: dict[int, int] = {}  # the workers' local ports to the mock, as last seen
    # Each break: (epoch seconds it began, and ended, its kind, the victim's pid).
    events: list[tuple[float, float, str, int]] = []
    started = time.monotonic()
    deadline = started + args.timeout
    next_break = started + args.break_every
    paid_record: dict[str, Any] = {}
    try:
        while len(results) < len(ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            for i, process in enumerate(workers):
                if process.poll() is not None:  # restart whatever is down
                    workers[i] = spawn(i)
            for process in workers:
                for port in mock_ports_of(process.pid, mock_port):
                    port_pid[port] = process.pid
            if time.monotonic() >= next_break:
                next_break += args.break_every
                victim = rng.randrange(len(workers))
                kind = rng.choice(("kill -9", "SIGTERM", "connection closed"))
                breaks[kind] += 1
                pid = workers[victim].pid
                for port in mock_ports_of(pid, mock_port):
                    port_pid[port] = pid
                began = time.time()
                if kind == "kill -9":
                    workers[victim].send_signal(signal.SIGKILL)
                elif kind == "SIGTERM":
                    workers[victim].send_signal(signal.SIGTERM)
                else:
                    await asyncio.to_thread(close_connections_of, pid)
                events.append((began, time.time(), kind, pid))
            print(
                f"\r{len(results)}/{len(ids)} results, breaks {dict(breaks)}   ", end="", flush=True
            )
    finally:
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in workers:
            process.wait(30)
        try:
            stats = httpx.get(f"{mock_url}/mock/stats").json()
            paid_record = httpx.get(f"{mock_url}/soak/paid", timeout=30).json()
        except httpx.HTTPError:
            stats = {}
        mock.send_signal(signal.SIGTERM)
        mock.wait(10)
        dlq = await channel.declare_queue(settings.dead_letter_queue, passive=True)
        dead = dlq.declaration_result.message_count
        dead_why: collections.Counter[str] = collections.Counter()
        dead_ids: set[str] = set()
        while (letter := await dlq.get(no_ack=True, fail=False)) is not None:
            described = describe(letter)
            message = (described.error_message or "")[:60]
            dead_why[f"{described.reason}/{described.error_code or '-'}: {message}"] += 1
            dead_ids.add(described.job_id or "")
        for name in (
            settings.request_queue,
            settings.result_queue,
            settings.dead_letter_queue,
            *delay_queues(settings),
        ):
            await channel.queue_delete(name)
        await channel.exchange_delete(settings.result_exchange)
        await connection.close()
        if store:
            delete_keys(args.redis_url, f"cw:*:{{{prefix}-*}}")

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
    for why, count in dead_why.most_common(5):
        print(f"  {count:5} {why}")
    print(f"upstream calls     {stats.get('total')}, faults injected {stats.get('faults')}")
    print(f"worker breaks      {dict(breaks)}")
    if log_dir is not None:
        print(f"worker logs        {log_dir}")
    twice, after = paid_twice(paid_record, port_pid, events, args.kill_window)
    explained = {job: delay for job, (kind, delay) in after.items() if kind == "kill -9"}
    paid = paid_record.get("paid", {})
    answers = sum(len(v) for v in paid.values())
    unpaid_ok = len(succeeded - set(paid))
    print(f"result store       {'on' if store else 'off'}")
    per_job = collections.Counter(paid_record.get("calls", {}).values())
    print(f"complete answers   {answers} paid for {len(paid)} jobs")
    print(f"calls per job      {dict(sorted(per_job.items()))} (calls: jobs)")
    print(f"ok without answer  {unpaid_ok} (must be 0: the count missed an answer)")
    paid_failed = len(set(paid) - succeeded)
    print(f"paid for, no ok    {paid_failed} (a complete answer, but the job's result is an error)")
    print(
        f"paid twice         {len(twice)} jobs ({sum(len(paid[j]) - 1 for j in twice)} answers "
        f"too many); after a kill -9 of the worker that had the first answer: {len(explained)}, "
        f"otherwise: {len(twice) - len(explained)}"
    )
    kinds = collections.Counter(after[job][0] if job in after else "no break" for job in twice)
    if twice:
        print(f"  by the break that followed the first answer: {dict(kinds)}")
    if explained:
        delays = sorted(explained.values())
        print(
            f"  kill -9 after the first answer: {1000 * delays[0]:.0f} to "
            f"{1000 * delays[-1]:.0f} ms (median {1000 * delays[len(delays) // 2]:.0f} ms)"
        )
    for job in sorted(set(twice) - set(explained))[:10]:
        print(f"  {job}: {paid[job]}")
    missing = set(ids) - set(results)
    if missing:
        print(
            f"lost jobs          {len(missing)}: {len(missing & dead_ids)} in the dead-letter "
            f"queue, {len(missing & set(paid))} of them paid for (an answer, no result)"
        )
    failing = lost or unpaid_ok
    if store:
        failing = failing or len(twice) > (0 if args.strict else len(explained))
    return 1 if failing else 0


def paid_twice(
    record: dict[str, Any],
    port_pid: dict[int, int],
    events: list[tuple[float, float, str, int]],
    window: float,
) -> tuple[list[str], dict[str, tuple[str, float]]]:
    """The jobs paid more than once and, for those a break followed, its kind and the
    seconds from the first answer to it: the first break of the process that got the
    first answer (by its connection; any worker's when that connection was not seen)
    within ``window`` seconds after it. Only a ``kill -9`` excuses a second payment: a
    process killed between the answer and storing the result cannot store it."""
    twice = sorted(job for job, answers in record.get("paid", {}).items() if len(answers) > 1)
    after: dict[str, tuple[str, float]] = {}
    for job in twice:
        at, peer = record["paid"][job][0]
        pid = port_pid.get(int(peer.rsplit(":", 1)[1])) if ":" in peer else None
        near = [
            (began - at, kind)
            for began, ended, kind, victim in events
            if ended >= at - 0.05 and began <= at + window and pid in (None, victim)
        ]
        if near:
            delay, kind = min(near)
            after[job] = (kind, delay)
    return twice, after


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
        "--latency",
        type=float,
        default=0.02,
        help="the mock's seconds before answering: more makes more calls in flight at a break",
    )
    parser.add_argument(
        "--store",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the result store on (default: on when a Redis answers at --redis-url)",
    )
    parser.add_argument("--redis-url", default=os.environ.get("WORKER_TEST_REDIS_URL", LOCAL_REDIS))
    parser.add_argument(
        "--kill-window",
        type=float,
        default=2.0,
        help="seconds after a paid answer within which a kill -9 explains a second payment",
    )
    parser.add_argument(
        "--strict", action="store_true", help="with the store, fail on any job paid twice"
    )
    parser.add_argument(
        "--log-dir", default="", help="keep the workers' output in DIR/<run>/worker<i>.log"
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("WORKER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
