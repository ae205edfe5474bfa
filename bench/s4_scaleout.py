"""S4 scale-out: the S1 setup served by one, then two ``chat-worker run`` processes on one
queue. The clock starts when the first of them consumes; the two-process run's startup skew
is in the JSON."""

from __future__ import annotations

import argparse

from common import chat_worker, run_main
from measure import Setup, measure_each, median_run
from report import Row, Section, table, write_json


async def run_s4(jobs: int, repeat: int = 1, timeout: float = 240.0) -> Section:
    runs = await measure_each(
        [
            (Setup("s4-1worker", jobs, timeout=timeout), chat_worker(64, processes=1)),
            (Setup("s4-2workers", jobs, timeout=timeout, workers=2), chat_worker(64, processes=2)),
        ],
        repeat,
    )
    one, two = median_run(runs["s4-1worker"]), median_run(runs["s4-2workers"])
    rows = [
        Row("S4 1 worker process", one.rate, cpu_us_per_job=one.cpu_us_per_job),
        Row(
            "S4 2 worker processes",
            two.rate,
            baseline=one.rate,
            baseline_label="1 proc",
            cpu_us_per_job=two.cpu_us_per_job,
        ),
    ]
    return Section("s4", rows, {"jobs": jobs, "runs": runs})


async def main(args: argparse.Namespace) -> None:
    section = await run_s4(args.jobs, args.repeat, args.timeout)
    print(table(section.rows))
    print(write_json("s4_scaleout", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=240.0)
    run_main(main(parser.parse_args()))
