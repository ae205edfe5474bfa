"""S6 rate limits: worker processes sharing one organisation's budget on a provider simulator.

The simulator is the bundled mock with its budget on (``worker/mock/budget.py``): requests
and tokens per minute, refilling continuously, enforced over one-second windows, OpenAI's
``x-ratelimit-*`` headers, 429 ``rate_limit_exceeded`` (with or without ``retry-after``).
Jobs have mixed prompt sizes and ``max_tokens``; one in five is streamed. Tokens are the
binding limit. Reported per run: jobs failed, upstream calls per job, and goodput (jobs
that succeeded a second over the run, divided by the jobs a second the budget admits).

The ``window`` scenarios are a provider that quantises and says so in its headers: its
budget is a bucket that holds one second of the minute's (3,000 requests a minute enforced
as 50 a second; requests bind), and ``x-ratelimit-remaining-*`` report that bucket as a
share of the minute's limit (each call takes 60 from it), ``reset`` the time until it is
full (the mock's ``--report window``).

The last scenario has no headers at all: a server that answers 429 past N calls at once,
and workers that share ``WORKER_UPSTREAM_MAX_CONCURRENCY=N`` through Redis.

    python bench/s6_ratelimits.py --seconds 20

``bench/run.py --scenarios s6`` runs the same (30 s of budget a run; ``--quick``: 10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
from common import (
    AMQP_URL,
    CHAT_WORKER,
    MODEL,
    Names,
    Proc,
    RunContext,
    chat_worker,
    clean_env,
    declare_topology,
    delete_topology,
    free_port,
    run_main,
)
from measure import log_dir_for
from plots import commit
from report import Row, Section, table, write_json

from worker.mock.budget import request_tokens

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")
TARGET_GOODPUT, TARGET_CALLS_PER_JOB, TARGET_FAILED = 0.90, 1.10, 0
STATS_EVERY = 0.5  # seconds between two reads of the simulator's call counters
MEAN_TOKENS = 330  # about what the provider counts for the mean job of make_jobs


@dataclass(frozen=True)
class Scenario:
    label: str
    processes: int
    rpm: int | None = None
    tpm: int | None = None
    retry_after: bool = True
    max_concurrent: int | None = None  # the server's; the workers share the same via Redis
    report: str = "minute"  # what the headers say: the minute's budget, or the window's

    def budget_jobs_per_s(self, mean_tokens: float) -> float | None:
        """Jobs a second the budget admits (None: no rate budget)."""
        limits = []
        if self.rpm:
            limits.append(self.rpm / 60)
        if self.tpm:
            limits.append(self.tpm / 60 / mean_tokens)
        return min(limits, default=None)


@dataclass
class Outcome:
    scenario: Scenario
    jobs: int
    ok: int = 0
    failed: int = 0
    calls: int = 0
    refused: int = 0
    seconds: float = 0.0
    budget_jobs_per_s: float | None = None
    codes: collections.Counter[str] | None = None
    # Seconds since the workers were started: each result that succeeded (with the tokens the
    # provider counted for its call), and the simulator's counters (calls, 429s) read every
    # STATS_EVERY.
    first_result_s: float | None = None
    ok_at: list[tuple[float, int]] = field(default_factory=list)
    calls_at: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def calls_per_job(self) -> float:
        return self.calls / self.jobs if self.jobs else float("nan")

    @property
    def goodput(self) -> float | None:
        if not self.budget_jobs_per_s or not self.seconds:
            return None
        return self.ok / self.seconds / self.budget_jobs_per_s

    def summary(self) -> dict[str, Any]:
        """The run as JSON (``report.write_json``)."""
        return {
            "label": self.scenario.label,
            "scenario": self.scenario.__dict__,
            "jobs": self.jobs,
            "ok": self.ok,
            "failed": self.failed,
            "calls": self.calls,
            "refused": self.refused,
            "seconds": self.seconds,
            "calls_per_job": self.calls_per_job,
            "goodput": self.goodput,
            "budget_jobs_per_s": self.budget_jobs_per_s,
            "codes": dict(self.codes or {}),
            "first_result_s": self.first_result_s,
            "ok_at": [[round(t, 3), tokens] for t, tokens in self.ok_at],
            "calls_at": [[round(t, 3), calls, refused] for t, calls, refused in self.calls_at],
        }


def make_jobs(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Mixed prompt sizes (a few words to a page), mixed max_tokens, one in five streamed."""
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        words = rng.choice((5, 20, 80, 200, 500))
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"job j{i}: {prompt}"}],
            "max_tokens": rng.choice((16, 64, 128, 256)),
        }
        if i % 5 == 0:
            body["stream"] = True
        jobs.append(body)
    return jobs


async def start_simulator(scenario: Scenario, log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    argv = [CHAT_WORKER, "mock-upstream", "--port", str(port), "--latency", "0.2"]
    argv += ["--chunks", "8", "--chunk-interval", "0.02"]
    for flag, value in (
        ("--rpm", scenario.rpm),
        ("--tpm", scenario.tpm),
        ("--max-concurrent", scenario.max_concurrent),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if not scenario.retry_after:
        argv.append("--no-retry-after")
    if scenario.report != "minute":
        argv += ["--report", scenario.report]
    proc = Proc("simulator", argv, log_dir, env=clean_env())
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{base}/healthz") as response:
                    if response.status == 200:
                        return proc, f"{base}/v1"
            await asyncio.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"simulator did not answer:\n{proc.tail()}")


async def run_scenario(scenario: Scenario, jobs: int, timeout: float) -> Outcome:
    names = Names.unique("s6")
    log_dir = log_dir_for(f"s6-{scenario.label}")
    bodies = make_jobs(jobs)
    outcome = Outcome(scenario, jobs, codes=collections.Counter())
    mean_tokens = sum(request_tokens(b) for b in bodies) / len(bodies)
    outcome.budget_jobs_per_s = scenario.budget_jobs_per_s(mean_tokens)
    simulator, upstream = await start_simulator(scenario, log_dir)
    connection = await aio_pika.connect_robust(AMQP_URL)
    procs: list[Proc] = []
    stats_url = upstream.removesuffix("/v1") + "/mock/stats"
    session = aiohttp.ClientSession()

    async def read_calls() -> None:
        while True:
            async with session.get(stats_url) as response:
                stats = await response.json()
            at = time.monotonic() - started
            outcome.calls_at.append((at, stats["total"], stats["faults"].get("rate_limit", 0)))
            await asyncio.sleep(STATS_EVERY)

    reader: asyncio.Task[None] | None = None
    try:
        await declare_topology(connection, names)
        channel = await connection.channel(publisher_confirms=True)
        for i, body in enumerate(bodies):
            line = {"custom_id": f"j{i}", "body": body}
            message = aio_pika.Message(orjson.dumps(line), message_id=f"j{i}")
            await channel.default_exchange.publish(message, names.request_queue)
        done = asyncio.Event()
        seen: set[str] = set()
        first: list[float] = []  # the clock runs from the first result: not process start-up

        async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                result = orjson.loads(message.body)
                if result["id"] in seen:
                    return
                seen.add(result["id"])
                if not first:
                    first.append(time.monotonic())
                if result["error"] is None:
                    outcome.ok += 1
                    tokens = request_tokens(bodies[int(result["custom_id"][1:])])
                    outcome.ok_at.append((time.monotonic() - started, tokens))
                else:
                    outcome.failed += 1
                    assert outcome.codes is not None
                    outcome.codes[result["error"]["code"]] += 1
                if len(seen) == jobs:
                    done.set()

        results = await channel.get_queue(names.result_queue, ensure=False)
        await results.consume(on_result)
        env = {"WORKER_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "warning")}
        if scenario.max_concurrent is not None:
            env["WORKER_UPSTREAM_MAX_CONCURRENCY"] = str(scenario.max_concurrent)
            env["WORKER_REDIS_URL"] = REDIS_URL
        spawn = chat_worker(64, processes=scenario.processes, **env)
        started = time.monotonic()
        reader = asyncio.create_task(read_calls())
        procs = spawn(RunContext(names, upstream, log_dir))
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline:
            if not any(proc.alive() for proc in procs):
                raise RuntimeError(f"every worker exited:\n{procs[0].tail()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)
        if not done.is_set():
            print(f"  {scenario.label}: timed out with {len(seen)}/{jobs} results", file=sys.stderr)
        outcome.seconds = time.monotonic() - first[0] if first else 0.0
        outcome.first_result_s = first[0] - started if first else None
        reader.cancel()
        async with session.get(stats_url) as response:
            stats = await response.json()
        outcome.calls = stats["total"]
        outcome.refused = stats["faults"].get("rate_limit", 0)
        outcome.calls_at.append((time.monotonic() - started, outcome.calls, outcome.refused))
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await reader
        await session.close()
        for proc in procs:
            proc.stop()
        simulator.stop()
        await delete_topology(connection, names)
        await connection.close()
    return outcome


def scenarios(tpm: int) -> list[Scenario]:
    # Requests allow about three times what the tokens do: tokens bind.
    rpm = 6_000
    return [
        Scenario("2proc-retry-after", 2, rpm, tpm),
        Scenario("2proc-no-retry-after", 2, rpm, tpm, retry_after=False),
        Scenario("4proc-retry-after", 4, rpm, tpm),
        Scenario("4proc-no-retry-after", 4, rpm, tpm, retry_after=False),
        # A quantising provider: 3,000 requests a minute as 50 a second bind (tokens do not).
        Scenario("2proc-window", 2, 3_000, tpm * 10 // 3, report="window"),
        Scenario("4proc-window", 4, 3_000, tpm * 10 // 3, report="window"),
        Scenario("4proc-redis-concurrency-8", 4, max_concurrent=8, retry_after=False),
    ]


def row(outcome: Outcome) -> str:
    goodput = "-" if outcome.goodput is None else f"{outcome.goodput:.2f}"
    return (
        f"| {outcome.scenario.label} | {outcome.jobs} | {outcome.failed} | "
        f"{outcome.calls_per_job:.3f} | {outcome.refused} | {goodput} | {outcome.seconds:.1f} |"
    )


def rows(outcome: Outcome) -> list[Row]:
    """Table rows of one run: failed jobs, calls per job, goodput (or jobs/s: no budget)."""
    label = f"S6 {outcome.scenario.label}"
    found = [
        Row(f"{label}: jobs failed", outcome.failed, unit="jobs", target=TARGET_FAILED, upper=True),
        Row(
            f"{label}: upstream calls per job",
            outcome.calls_per_job,
            unit="calls",
            target=TARGET_CALLS_PER_JOB,
            upper=True,
        ),
    ]
    if outcome.goodput is not None:
        found.append(Row(f"{label}: goodput", outcome.goodput, unit="", target=TARGET_GOODPUT))
    elif outcome.seconds:
        found.append(Row(f"{label}: jobs that succeeded", outcome.ok / outcome.seconds))
    return found


async def run_s6(
    seconds: float = 30.0,
    tpm: int = 600_000,
    *,
    jobs: int = 0,
    only: str = "",
    timeout: float = 300.0,
) -> Section:
    """Every scenario (or those whose label contains ``only``), ``seconds`` of budget each."""
    outcomes = []
    for scenario in scenarios(tpm):
        if only and only not in scenario.label:
            continue
        # Enough jobs for ``seconds`` of the budget (the mean job counts about 330 tokens);
        # the concurrency run takes 40 a second.
        count = jobs or int(seconds * (scenario.budget_jobs_per_s(MEAN_TOKENS) or 40))
        outcome = await run_scenario(scenario, count, timeout)
        print(f"  {row(outcome)}", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    data = {
        "seconds": seconds,
        "tpm": tpm,
        "targets": {
            "goodput": TARGET_GOODPUT,
            "calls_per_job": TARGET_CALLS_PER_JOB,
            "failed": TARGET_FAILED,
        },
        "runs": outcomes,
    }
    return Section("s6", [r for outcome in outcomes for r in rows(outcome)], data)


async def main(args: argparse.Namespace) -> None:
    section = await run_s6(
        args.seconds, args.tpm, jobs=args.jobs, only=args.only, timeout=args.timeout
    )
    print("| scenario | jobs | failed | calls/job | 429s | goodput | s |")
    print("|---|---|---|---|---|---|---|")
    for outcome in section.data["runs"]:
        print(row(outcome))
    print(table(section.rows))
    payload = {"args": vars(args), "commit": commit(), "section": section.__dict__}
    print(write_json("s6_ratelimits", payload))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="Run length at the budget.")
    parser.add_argument("--jobs", type=int, default=0, help="Jobs per run (default: seconds).")
    parser.add_argument("--tpm", type=int, default=600_000, help="The organisation's tokens.")
    parser.add_argument("--only", default="", help="Only scenarios whose label contains this.")
    parser.add_argument("--timeout", type=float, default=300.0)
    run_main(main(parser.parse_args()))
