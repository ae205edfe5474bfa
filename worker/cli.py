"""The ``chat-worker`` command: run, demo, submit, mock-upstream, dlq."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from worker.settings import Settings, SettingsError, load_settings

__all__ = ["main", "run_async"]


def run_async(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop where it is installed (it is on Linux and macOS)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def settings_or_exit(**overrides: Any) -> Settings:
    """The settings, or one line naming the bad variable and exit code 2."""
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        click.echo(f"chat-worker: invalid setting {exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chat-worker")
def main() -> None:
    """A RabbitMQ worker for OpenAI-compatible chat completions.

    Every command reads the WORKER_* settings from the environment (and .env).
    """


@main.command()
def run() -> None:
    """Consume jobs and call the upstream until SIGTERM/SIGINT."""
    from worker.service import BrokerUnavailable, serve
    from worker.telemetry import configure_logging

    settings = settings_or_exit()
    if not settings.upstream_base_url:
        click.echo(
            "chat-worker: invalid setting WORKER_UPSTREAM_BASE_URL: required by `run`", err=True
        )
        sys.exit(2)
    configure_logging(settings.log_format, settings.log_level)
    try:
        run_async(serve(settings))
    except BrokerUnavailable as exc:
        click.echo(f"chat-worker: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.option("--jobs", type=click.Path(exists=True, dir_okay=False), help="Batch JSONL to send.")
def demo(jobs: str | None) -> None:
    """The whole path on embedded defaults: mock upstream, local broker, sample jobs."""
    from worker.demo import EXAMPLES, run_demo

    lines = [line for line in Path(jobs or EXAMPLES).read_bytes().splitlines() if line.strip()]
    sys.exit(run_async(run_demo(settings_or_exit(), lines)))


@main.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--latency", default=0.0, show_default=True, help="Seconds before answering.")
@click.option("--chunks", default=8, show_default=True, help="Content chunks per stream.")
@click.option("--chunk-interval", default=0.0, show_default=True, help="Seconds between chunks.")
@click.option("--fault-rate", default=0.0, show_default=True, help="Share of random faults.")
@click.option("--api-key", default=None, help="Require this bearer key.")
@click.option("--seed", default=None, type=int, help="Seed for the random faults.")
def mock_upstream(
    host: str,
    port: int,
    latency: float,
    chunks: int,
    chunk_interval: float,
    fault_rate: float,
    api_key: str | None,
    seed: int | None,
) -> None:
    """The bundled OpenAI-compatible server, for development, tests and load tests."""
    from worker.mock_upstream import MockConfig, serve

    config = MockConfig(
        latency=latency,
        chunks=chunks,
        chunk_interval=chunk_interval,
        fault_rate=fault_rate,
        api_key=api_key,
        seed=seed,
    )
    click.echo(f"mock upstream on http://{host}:{port}/v1", err=True)
    serve(config, host, port)
