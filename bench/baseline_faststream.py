"""The peer: the ~20-line FastStream + httpx worker of ``peer_app.py`` on the S1 setup."""

from __future__ import annotations

import argparse

from common import AMQP_URL, BENCH, PYTHON, Proc, RunContext, WorkerFactory, clean_env, run_main
from measure import Setup, measure_each, median_run
from report import Row, table, write_json


def faststream_peer(concurrency: int = 64) -> WorkerFactory:
    """``python peer_app.py``: the app on uvloop, as ``faststream run`` would start it."""

    def spawn(ctx: RunContext) -> list[Proc]:
        env = clean_env(
            PEER_AMQP_URL=AMQP_URL,
            PEER_QUEUE=ctx.names.request_queue,
            PEER_EXCHANGE=ctx.names.result_exchange,
            PEER_UPSTREAM=ctx.upstream,
            PEER_CONCURRENCY=str(concurrency),
        )
        argv = [PYTHON, str(BENCH / "peer_app.py")]
        return [Proc("peer", argv, ctx.log_dir, env=env, cwd=BENCH)]

    return spawn


async def main(args: argparse.Namespace) -> None:
    setup = Setup("peer", args.jobs, timeout=args.timeout)
    runs = await measure_each([(setup, faststream_peer())], args.repeat)
    run = median_run(runs["peer"])
    rows = [Row("peer (FastStream + httpx)", run.rate, cpu_us_per_job=run.cpu_us_per_job)]
    print(table(rows))
    print(write_json("baseline_faststream", {"args": vars(args), "rows": rows, "runs": runs}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=240.0)
    run_main(main(parser.parse_args()))
