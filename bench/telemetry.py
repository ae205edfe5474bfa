"""Telemetry overhead: the S1 job with telemetry off, as shipped, and with traces exported.

- off: ``OTEL_SDK_DISABLED=true`` (no metrics, no spans; logs as usual);
- as shipped: metrics on ``/metrics``, no span recorded (no OTLP endpoint set);
- traced: every span recorded and exported over OTLP/HTTP to a local sink that answers 200.
All three in the same run, order rotated when repeated.
"""

from __future__ import annotations

import argparse

from aiohttp import web
from common import chat_worker, free_port, run_main
from measure import Setup, measure_each, median_run
from report import Row, Section, table, write_json


async def otlp_sink() -> tuple[web.AppRunner, str]:
    """An OTLP/HTTP collector stand-in: accepts every export, keeps nothing."""

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", accept)
    app.router.add_post("/v1/metrics", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def run_telemetry(jobs: int, repeat: int = 1, timeout: float = 240.0) -> Section:
    sink, endpoint = await otlp_sink()
    try:
        runs = await measure_each(
            [
                (
                    Setup("tel-off", jobs, timeout=timeout),
                    chat_worker(64, OTEL_SDK_DISABLED="true"),
                ),
                (Setup("tel-shipped", jobs, timeout=timeout), chat_worker(64)),
                (
                    Setup("tel-traced", jobs, timeout=timeout),
                    chat_worker(
                        64,
                        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                    ),
                ),
            ],
            repeat,
        )
    finally:
        await sink.cleanup()
    off, shipped, traced = (median_run(runs[k]) for k in ("tel-off", "tel-shipped", "tel-traced"))
    rows = [
        Row("telemetry off (OTEL_SDK_DISABLED)", off.rate, cpu_us_per_job=off.cpu_us_per_job),
        Row(
            "telemetry as shipped (metrics)",
            shipped.rate,
            baseline=off.rate,
            baseline_label="off",
            cpu_us_per_job=shipped.cpu_us_per_job,
        ),
        Row(
            "metrics + traces exported (OTLP)",
            traced.rate,
            baseline=off.rate,
            baseline_label="off",
            cpu_us_per_job=traced.cpu_us_per_job,
        ),
    ]
    return Section("telemetry", rows, {"jobs": jobs, "runs": runs})


async def main(args: argparse.Namespace) -> None:
    section = await run_telemetry(args.jobs, args.repeat, args.timeout)
    print(table(section.rows))
    print(write_json("telemetry", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=240.0)
    run_main(main(parser.parse_args()))
