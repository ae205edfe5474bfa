"""The raw limit: a minimal aio-pika + aiohttp loop (``raw_loop.py``) on the S1 setup."""

from __future__ import annotations

import argparse

from common import AMQP_URL, BENCH, PYTHON, Proc, RunContext, WorkerFactory, clean_env, run_main
from measure import Setup, measure_each, median_run
from report import Row, table, write_json


def raw_loop(
    client: str = "aiohttp", concurrency: int = 64, mode: str = "plain", chunks_per_delta: int = 5
) -> WorkerFactory:
    """One ``raw_loop.py`` process using ``client`` for the upstream calls; ``mode``
    ``stream`` is the S3 baseline, ``echo`` the bare broker loop (no HTTP)."""

    def spawn(ctx: RunContext) -> list[Proc]:
        argv = [
            PYTHON,
            str(BENCH / "raw_loop.py"),
            "--amqp",
            AMQP_URL,
            "--queue",
            ctx.names.request_queue,
            "--exchange",
            ctx.names.result_exchange,
            "--upstream",
            ctx.upstream,
            "--concurrency",
            str(concurrency),
            "--client",
            client,
            "--mode",
            mode,
            "--chunks-per-delta",
            str(chunks_per_delta),
        ]
        return [Proc(f"raw-{client}-{mode}", argv, ctx.log_dir, env=clean_env())]

    return spawn


async def main(args: argparse.Namespace) -> None:
    setup = Setup("raw", args.jobs, timeout=args.timeout)
    runs = await measure_each([(setup, raw_loop())], args.repeat)
    run = median_run(runs["raw"])
    rows = [Row("raw limit (aio-pika + aiohttp)", run.rate, cpu_us_per_job=run.cpu_us_per_job)]
    print(table(rows))
    print(write_json("baseline_raw", {"args": vars(args), "rows": rows, "runs": runs}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=240.0)
    run_main(main(parser.parse_args()))
