"""Transport comparison: the raw consume → POST → publish → ack loop (``raw_loop.py``) with
httpx's default transport, httpx over ``httpx_aiohttp.AiohttpTransport``, an
``httpx.Request`` handed straight to that transport (the worker's way, no ``AsyncClient``)
and bare aiohttp, at concurrency 64 on the S1 setup, all in the same run."""

from __future__ import annotations

import argparse

from baseline_raw import raw_loop
from common import run_main
from measure import Setup, measure_each, median_run
from report import Row, Section, table, write_json

CLIENTS = {
    "httpx": "httpx, default transport (httpcore)",
    "httpx-aiohttp": "httpx over AiohttpTransport",
    "httpx-aiohttp-direct": "httpx.Request to AiohttpTransport",
    "aiohttp": "aiohttp ClientSession",
}


async def run_transports(
    jobs: int, repeat: int = 1, concurrency: int = 64, timeout: float = 240.0
) -> Section:
    runs = await measure_each(
        [
            (Setup(f"tx-{client}", jobs, timeout=timeout), raw_loop(client, concurrency))
            for client in CLIENTS
        ],
        repeat,
    )
    best = {client: median_run(runs[f"tx-{client}"]) for client in CLIENTS}
    base = best["aiohttp"].rate
    rows = [
        Row(
            f"loop with {label}",
            best[client].rate,
            baseline=base if client != "aiohttp" else None,
            baseline_label="aiohttp",
            cpu_us_per_job=best[client].cpu_us_per_job,
        )
        for client, label in CLIENTS.items()
    ]
    return Section("transports", rows, {"jobs": jobs, "concurrency": concurrency, "runs": runs})


async def main(args: argparse.Namespace) -> None:
    section = await run_transports(args.jobs, args.repeat, args.concurrency, args.timeout)
    print(table(section.rows))
    print(write_json("transports", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=240.0)
    run_main(main(parser.parse_args()))
