"""A budget storm: four worker processes, one tenant whose budget is worth 1,000 jobs, 3,000
jobs published at once. How many got through, how many were refused ``budget_exceeded``
with how many upstream calls, and by how much the ledger overshot the budget.

The single upstream (the mock, through ``WORKER_UPSTREAMS_FILE``) has a ``prices:`` entry
for the model, so every job's cost is exact and known beforehand: each job asks for
``max_tokens`` 10 and the mock's answer is longer, so it stops at exactly 10 completion
tokens; the output price makes those 10 tokens $0.015625 (a binary fraction, so sums in
the ledger are exact) and the input price is 0 (``--input-per-mtok`` prices the prompt
too: the worker's prompt estimate, four characters a token, is then above the mock's
count, one token a word). The tenant (``x-tenant``, ``WORKER_TRUST_TENANT_HEADER=true``)
has ``usd_per_day`` = 1,000 times the job's price, ``on_exceed: fail``.

The four ``chat-worker run`` processes (concurrency 64 each, ``WORKER_REDIS_URL``,
``WORKER_BUDGETS_FILE``) consume before the 3,000 jobs are published; the mock answers
after ``--latency`` (0.1 s), so up to 256 reservations are in flight when the budget runs
out. Reported: jobs that succeeded (≤ 1,000; exactly 1,000 when the estimate is exact),
jobs failed ``budget_exceeded``, the mock's count of upstream calls (``/mock/stats``),
and the overshoot (the ledger's spend for the day minus the budget), which must stay within
the estimates in flight: 4 processes x 64 jobs x the per-job estimate.

Each run's tenant is new (``bench-budget-<random>``): its ledger keys are its own, and
deleted afterwards with the run's stored results.

    python bench/budget_storm.py [--jobs 3000] [--fit 1000] [--latency 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import yaml
from common import (
    AMQP_URL,
    MODEL,
    REDIS_URL,
    MockArgs,
    Names,
    Proc,
    RunContext,
    chat_worker,
    declare_topology,
    delete_topology,
    redis_answers,
    redis_keys,
    run_main,
    start_mock,
)
from measure import _drop_logs, _wait_consumers, log_dir_for
from report import Row, Section, table, write_json

from worker.budgets import BudgetsFile, Ledger

PROCESSES = 4
CONCURRENCY = 64
MAX_TOKENS = 10  # the mock's answer is longer: it stops here, every job the same tokens
OUTPUT_PER_MTOK = Decimal("1562.5")  # 10 tokens = $0.015625 = 2**-6
WORDS_IN_PROMPT = 4  # "job <id>: say hello": the mock counts a token a word


def job_cost(input_per_mtok: Decimal) -> Decimal:
    """What one job costs: the mock's usage at the upstreams file's prices."""
    return (WORDS_IN_PROMPT * input_per_mtok + MAX_TOKENS * OUTPUT_PER_MTOK) / Decimal(1_000_000)


def job_estimate(input_per_mtok: Decimal, body: dict[str, Any]) -> Decimal:
    """What the worker reserves for a job (worker.spend: the prompt estimate + max output)."""
    from worker.limits.gate import estimate_tokens

    prompt = estimate_tokens({k: v for k, v in body.items() if k != "max_tokens"})
    return (prompt * input_per_mtok + MAX_TOKENS * OUTPUT_PER_MTOK) / Decimal(1_000_000)


def _body(job_id: str) -> dict[str, Any]:
    content = f"job {job_id}: say hello"
    assert len(content.split()) == WORDS_IN_PROMPT
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
    }


def _write_files(
    log_dir: Path, upstream: str, tenant: str, budget: Decimal, input_per_mtok: Decimal
) -> tuple[Path, Path]:
    upstreams = log_dir / "upstreams.yaml"
    price = {"input_per_mtok": float(input_per_mtok), "output_per_mtok": float(OUTPUT_PER_MTOK)}
    upstreams.write_text(
        yaml.safe_dump(
            {
                "upstreams": [
                    {
                        "name": "mock",
                        "base_url": upstream,
                        "auth": "none",
                        "models": ["*"],
                        "prices": {MODEL: price},
                    }
                ]
            }
        )
    )
    budgets = log_dir / "budgets.yaml"
    budgets.write_text(
        yaml.safe_dump(
            {"budgets": [{"tenant": tenant, "usd_per_day": float(budget), "on_exceed": "fail"}]}
        )
    )
    return upstreams, budgets


async def run_storm(
    jobs: int = 3_000,
    fit: int = 1_000,
    *,
    latency: float = 0.1,
    input_per_mtok: float = 0.0,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """One storm; the measurements as a dict."""
    if not await redis_answers():
        raise RuntimeError(f"the budget scenario needs a Redis at {REDIS_URL} (BENCH_REDIS_URL)")
    rate = Decimal(repr(input_per_mtok))
    cost = job_cost(rate)
    budget = fit * cost
    names = Names.unique("budget")
    tenant = f"bench-budget-{uuid.uuid4().hex[:8]}"
    log_dir = log_dir_for("budget")
    ids = [f"{names.prefix}-j{i}" for i in range(jobs)]
    estimate = job_estimate(rate, _body(ids[0]))
    bound = PROCESSES * CONCURRENCY * estimate
    mock, upstream = await start_mock(MockArgs(latency=latency), log_dir)
    upstreams, budgets = _write_files(log_dir, upstream, tenant, budget, rate)
    connection = await aio_pika.connect(AMQP_URL)
    procs: list[Proc] = []
    codes: collections.Counter[str] = collections.Counter()
    spent_results = Decimal(0)
    seen: set[str] = set()
    duplicates = 0
    done = asyncio.Event()
    failed = False
    timed_out = False
    times: dict[str, float] = {}

    async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal spent_results, duplicates
        result = orjson.loads(message.body)
        if result["id"] in seen:
            duplicates += 1
            return
        seen.add(result["id"])
        error = result.get("error")
        if error is None:
            codes["ok"] += 1
            total = ((result.get("metadata") or {}).get("cost") or {}).get("total")
            spent_results += Decimal(repr(total)) if total is not None else Decimal("NaN")
        else:
            codes[str(error.get("code"))] += 1
        if len(seen) == jobs:
            times["last_result"] = time.monotonic()
            done.set()

    ledger = Ledger(REDIS_URL, BudgetsFile.model_validate(yaml.safe_load(budgets.read_text())))
    collect = await connection.channel()
    try:
        await declare_topology(connection, names)
        results = await collect.get_queue(names.result_queue, ensure=False)
        await results.consume(on_result, no_ack=True)
        env = {
            "WORKER_UPSTREAMS_FILE": str(upstreams),
            "WORKER_UPSTREAM_BASE_URL": "",
            "WORKER_BUDGETS_FILE": str(budgets),
            "WORKER_REDIS_URL": REDIS_URL,
            "WORKER_TRUST_TENANT_HEADER": "true",
            "WORKER_LOG_LEVEL": "warning",
        }
        spawn = chat_worker(CONCURRENCY, processes=PROCESSES, **env)
        procs = spawn(RunContext(names, upstream, log_dir))
        channel = await connection.channel(publisher_confirms=True)
        await _wait_consumers(channel, names.request_queue, PROCESSES, procs)
        times["publish"] = time.monotonic()
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        orjson.dumps({"custom_id": job_id, "body": _body(job_id)}),
                        message_id=job_id,
                        content_type="application/json",
                        headers={"x-tenant": tenant},
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    names.request_queue,
                )
                for job_id in ids
            )
        )
        times["published"] = time.monotonic()
        deadline = time.monotonic() + timeout
        while not done.is_set():
            if time.monotonic() > deadline:
                timed_out = True
                break
            for proc in procs:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited during the run:\n{proc.tail()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)
        base = upstream.removesuffix("/v1")
        async with aiohttp.ClientSession() as session, session.get(f"{base}/mock/stats") as r:
            stats = await r.json()
        spend = await ledger.spend(tenant)
    except BaseException:
        failed = True
        raise
    finally:
        for proc in procs:
            proc.stop()
        mock.stop()
        await ledger.aclose()
        with contextlib.suppress(Exception):
            await collect.close()  # first: deleting the queue it consumes would cancel it loudly
        await delete_topology(connection, names)
        await connection.close()
        with contextlib.suppress(Exception):
            await redis_keys(f"{ledger.prefix}:{{{tenant}}}:*", delete=True)
            await redis_keys(f"cw:*:{{{names.prefix}-j*}}", delete=True)
        _drop_logs(log_dir, keep=failed or timed_out)
    spent = Decimal(repr(spend.usd_day))
    return {
        "jobs": jobs,
        "fit": fit,
        "latency_s": latency,
        "processes": PROCESSES,
        "concurrency": CONCURRENCY,
        "input_per_mtok": float(rate),
        "output_per_mtok": float(OUTPUT_PER_MTOK),
        "job_cost_usd": float(cost),
        "job_estimate_usd": float(estimate),
        "budget_usd": float(budget),
        "succeeded": codes.get("ok", 0),
        "budget_exceeded": codes.get("budget_exceeded", 0),
        "other_errors": {k: v for k, v in codes.items() if k not in ("ok", "budget_exceeded")},
        "results": len(seen),
        "duplicates": duplicates,
        "upstream_calls": stats.get("total"),
        "spent_usd": float(spent),
        "spent_tokens": spend.tokens_day,
        "spent_by_results_usd": float(spent_results),
        "overshoot_usd": float(spent - budget),
        "in_flight_bound_usd": float(bound),
        "publish_s": times["published"] - times["publish"],
        "seconds": times.get("last_result", time.monotonic()) - times["publish"],
        "timed_out": timed_out,
    }


def rows(out: dict[str, Any]) -> list[Row]:
    label = "budget storm"
    others = sum(out["other_errors"].values())
    return [
        Row(
            f"{label}: jobs succeeded (budget fits {out['fit']:,})",
            out["succeeded"],
            unit="jobs",
            baseline=out["fit"],
            baseline_label="fit",
            target=1.0,
            upper=True,
        ),
        Row(f"{label}: jobs failed budget_exceeded", out["budget_exceeded"], unit="jobs"),
        Row(f"{label}: jobs failed otherwise", others, unit="jobs", target=0, upper=True),
        Row(
            f"{label}: upstream calls per job that succeeded",
            (out["upstream_calls"] or 0) / max(out["succeeded"], 1),
            unit="calls",
            target=1.0,
            upper=True,
        ),
        Row(
            f"{label}: overshoot, spent - budget (USD)",
            out["overshoot_usd"],
            unit="USD",
            baseline=out["in_flight_bound_usd"],
            baseline_label="in flight",
            target=1.0,
            upper=True,
        ),
    ]


async def run_budget(
    jobs: int = 3_000,
    fit: int = 1_000,
    *,
    latency: float = 0.1,
    input_per_mtok: float = 0.0,
    timeout: float = 300.0,
) -> Section:
    out = await run_storm(
        jobs, fit, latency=latency, input_per_mtok=input_per_mtok, timeout=timeout
    )
    print(
        f"  budget storm: {out['succeeded']} ok / {out['fit']} fit, "
        f"{out['budget_exceeded']} budget_exceeded, {out['upstream_calls']} upstream calls, "
        f"spent ${out['spent_usd']:.6f} of ${out['budget_usd']:.6f} "
        f"(overshoot ${out['overshoot_usd']:.6f}, "
        f"in-flight bound ${out['in_flight_bound_usd']:.2f}), "
        f"{out['seconds']:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return Section("budget", rows(out), out)


async def main(args: argparse.Namespace) -> None:
    section = await run_budget(
        args.jobs,
        args.fit,
        latency=args.latency,
        input_per_mtok=args.input_per_mtok,
        timeout=args.timeout,
    )
    print(table(section.rows))
    print(orjson.dumps(section.data, option=orjson.OPT_INDENT_2).decode())
    print(write_json("budget_storm", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3_000, help="jobs published at once")
    parser.add_argument("--fit", type=int, default=1_000, help="jobs the budget is worth")
    parser.add_argument("--latency", type=float, default=0.1, help="the mock's, seconds")
    parser.add_argument(
        "--input-per-mtok", type=float, default=0.0, help="the prompt's price (default 0)"
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    run_main(main(parser.parse_args()))
