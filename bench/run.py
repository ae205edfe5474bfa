"""Every benchmark scenario in one go, one table: ``make bench`` (or ``python bench/run.py``).

Each scenario runs side by side with its baseline in the same invocation, so the ratios hold
on a noisy machine even when the absolute numbers move. See bench/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import orjson
from added_latency import run_added_latency
from budget_storm import run_budget
from cache_latency import run_cache_latency
from common import REDIS_URL, redis_answers, run_main
from plots import OUT, commit, write_plots
from report import Row, Section, table, write_json
from s1_overhead import run_s1, s1_worker_rate
from s2_latency import run_s2
from s3_streaming import LEVELS, QUICK_LEVELS, run_s3
from s4_scaleout import run_s4
from s5_lanes import run_s5
from s6_ratelimits import run_s6
from store_overhead import run_store
from telemetry import run_telemetry
from transports import run_transports

SCENARIOS = (
    "s1",
    "s2",
    "s3",
    "latency",
    "s4",
    "s5",
    "s6",
    "telemetry",
    "store",
    "cache",
    "budget",
    "transports",
)
DEFAULT = "s1,s2,s3,latency,s4,s5,s6,telemetry,store,cache,budget"


async def main(args: argparse.Namespace) -> int:
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    if unknown := set(chosen) - set(SCENARIOS):
        sys.exit(f"unknown scenarios: {', '.join(sorted(unknown))} (known: {', '.join(SCENARIOS)})")
    needs_redis = [name for name in chosen if name in ("store", "cache", "budget")]
    if needs_redis and not await redis_answers():
        print(
            f"no Redis at {REDIS_URL} (BENCH_REDIS_URL): skipping {', '.join(needs_redis)}",
            file=sys.stderr,
        )
        chosen = [name for name in chosen if name not in needs_redis]
    quick = args.quick
    jobs = args.jobs or (2_000 if quick else 20_000)
    started = time.monotonic()
    sections: list[Section] = []
    s1_rate: float | None = None
    for name in chosen:
        print(f"== {name}", file=sys.stderr, flush=True)
        if name == "s1":
            section = await run_s1(jobs, args.repeat, args.timeout)
            s1_rate = section.data["worker_rate"]
        elif name == "s2":
            if s1_rate is None:
                print(
                    "  (S2 bounds by the S1 rate: measuring the worker on S1 first)",
                    file=sys.stderr,
                )
                s1_rate = await s1_worker_rate(min(jobs, 5_000), args.timeout)
            seconds, cap = (3.0, 4_000) if quick else (12.0, 20_000)
            section = await run_s2(s1_rate, seconds=seconds, max_jobs=cap, timeout=args.timeout)
        elif name == "s3":
            section = await run_s3(QUICK_LEVELS if quick else LEVELS, timeout=args.timeout)
        elif name == "latency":
            section = await run_added_latency(100 if quick else 400, 20 if quick else 40)
        elif name == "s4":
            section = await run_s4(jobs, args.repeat, args.timeout)
        elif name == "s5":
            backlog, seconds, window = (3_000, 15.0, 8.0) if quick else (20_000, 60.0, 20.0)
            section = await run_s5(backlog, seconds, window)
        elif name == "s6":
            section = await run_s6(10.0 if quick else 30.0, timeout=args.timeout)
        elif name == "telemetry":
            section = await run_telemetry(jobs, args.repeat, args.timeout)
        elif name == "store":
            store_jobs = args.jobs or (2_000 if quick else 10_000)
            section = await run_store(store_jobs, args.repeat, args.timeout)
        elif name == "cache":
            section = await run_cache_latency(100 if quick else 300, 20 if quick else 30)
        elif name == "budget":
            section = await run_budget(timeout=args.timeout)
        else:
            section = await run_transports(jobs, args.repeat, timeout=args.timeout)
        sections.append(section)
    duration = time.monotonic() - started
    rows: list[Row] = [row for section in sections for row in section.rows]
    command = shlex.join([sys.executable, *sys.argv])
    print()
    print(table(rows))
    print(f"\n{command}\n{duration / 60:.1f} min, {'quick smoke run' if quick else 'full run'}")
    path = write_json(
        "run",
        {
            "command": command,
            "commit": commit(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "duration_s": duration,
            "rows": rows,
            "sections": {section.name: section.data for section in sections},
        },
    )
    print(path)
    if not args.no_plots:
        for figure in write_plots(orjson.loads(path.read_bytes()), args.plots):
            print(figure)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios",
        default=DEFAULT,
        help=f"comma-separated, of {', '.join(SCENARIOS)} (default {DEFAULT})",
    )
    parser.add_argument(
        "--jobs", type=int, help="jobs per S1/S4/transport run (default 20000; store 10000)"
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run (a few minutes)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per contender (S1, S4, telemetry, store)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run, at most")
    parser.add_argument("--plots", type=Path, default=OUT, help=f"PNG figures here ({OUT})")
    parser.add_argument("--no-plots", action="store_true", help="write no figures")
    sys.exit(run_main(main(parser.parse_args())))
