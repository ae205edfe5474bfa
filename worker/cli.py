"""The ``chat-worker`` command: run, demo, submit, mock-upstream, dlq, console, gateway,
upstreams."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import socket
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn, cast

import aiormq
import click

from worker.dlq_cli import dlq, lane_or_exit, visible
from worker.settings import Settings, SettingsError, check_names, load_settings
from worker.upstreams_file import UpstreamSpec

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


# What a listening socket's bind says when the port cannot be had, in a few words.
_ADDRESS_ERRORS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "no such address on this machine",
}


def _cannot_listen(command: str, exc: OSError, host: str, port: int, hint: str) -> NoReturn:
    """One line for a port that cannot be had (no traceback), exit code 1."""
    why = _ADDRESS_ERRORS.get(exc.errno or 0) or exc.strerror or str(exc)
    click.echo(f"chat-worker {command}: cannot listen on {host}:{port}: {why} ({hint})", err=True)
    sys.exit(1)


def _is_address_error(exc: OSError) -> bool:
    return exc.errno in _ADDRESS_ERRORS


def broker_or_exit(command: str, coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a command's broker work; a broker out of reach (or refusing) is one line naming
    why, exit code 1, rather than a traceback."""
    from worker.amqp.connect import BrokerRefused, NoNodeAnswers

    try:
        return run_async(coroutine)
    except BrokerRefused as exc:
        click.echo(f"chat-worker {command}: the broker refused the connection: {exc}", err=True)
    except NoNodeAnswers as exc:
        click.echo(f"chat-worker {command}: cannot reach the broker: {exc}", err=True)
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        text = exc.args[0] if exc.args else exc
        click.echo(f"chat-worker {command}: {text} (have workers declared it yet?)", err=True)
    except (OSError, aiormq.exceptions.AMQPError) as exc:
        click.echo(f"chat-worker {command}: broker error: {type(exc).__name__}: {exc}", err=True)
    sys.exit(1)


def upstreams_or_exit(settings: Settings) -> tuple[UpstreamSpec, ...]:
    """The upstreams with their keys, or one line naming the place and exit code 2."""
    try:
        return settings.upstreams
    except SettingsError as exc:
        click.echo(f"chat-worker: invalid setting {exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chat-worker")
def main() -> None:
    """A RabbitMQ worker for OpenAI-compatible chat completions.

    Every command reads the WORKER_* settings from the environment (and .env).
    """
    # A misspelt setting stops every command, those that read no setting included.
    try:
        check_names()
    except SettingsError as exc:
        click.echo(f"chat-worker: invalid setting {exc}", err=True)
        sys.exit(2)
    # aiormq logs a failed connection itself; with no logging configured, Python would
    # print that record too, beside the command's own one line.
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).addHandler(logging.NullHandler())


main.add_command(dlq)


@main.command()
def run() -> None:
    """Consume jobs and call the upstream until SIGTERM/SIGINT."""
    from worker.amqp.connect import BrokerRefused
    from worker.logs import configure_logging
    from worker.process import serve
    from worker.service import BrokerUnavailable

    settings = settings_or_exit()
    upstreams_or_exit(settings)
    configure_logging(settings.log_format, settings.log_level)
    # What start-up built (modules, settings, schemas) lives as long as the process: out of
    # the collector's sight, the collections a busy stream path triggers scan far less
    # (S3: about 6 % less CPU per chunk).
    gc.collect()
    gc.freeze()
    try:
        run_async(serve(settings))
    except BrokerUnavailable as exc:
        click.echo(f"chat-worker: {exc}", err=True)
        sys.exit(1)
    except BrokerRefused as exc:
        # A wrong password or a missing vhost: no retry makes it pass.
        click.echo(f"chat-worker run: the broker refused the connection: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        if not _is_address_error(exc):
            raise
        _cannot_listen(
            "run", exc, "0.0.0.0", settings.http_port, "WORKER_HTTP_PORT; 0 turns it off"
        )


@main.command()
@click.option("--jobs", type=click.Path(exists=True, dir_okay=False), help="Batch JSONL to send.")
def demo(jobs: str | None) -> None:
    """The whole path on embedded defaults: mock upstream, local broker, sample jobs."""
    from worker.demo import EXAMPLES, run_demo

    lines = [line for line in Path(jobs or EXAMPLES).read_bytes().splitlines() if line.strip()]
    sys.exit(run_async(run_demo(settings_or_exit(), lines)))


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Batch output JSONL [default: FILE.out.jsonl next to FILE].",
)
@click.option("--resume", is_flag=True, help="Continue OUT: skip the custom_ids it has.")
@click.option(
    "--max-in-flight",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Jobs published and not yet answered.",
)
@click.option("--lane", default=None, help="Publish to this lane (request queue) [default: first].")
@click.option(
    "--tenant-from-connection",
    is_flag=True,
    help="Set each job's user_id to the broker user: the workers report it as the tenant.",
)
def submit(
    file: Path,
    output: Path | None,
    resume: bool,
    max_in_flight: int,
    lane: str | None,
    tenant_from_connection: bool,
) -> None:
    """Publish a Batch input file, wait for the results, write them in Batch output format.

    Exit 0 when every job succeeded, 1 otherwise, 2 when OUT exists without --resume,
    130 when interrupted (run again with --resume).
    """
    from worker.producer.submit import run_submit

    settings = settings_or_exit()
    code = run_submit(
        settings,
        file,
        output,
        resume=resume,
        max_in_flight=max_in_flight,
        lane=lane_or_exit(settings, lane),
        tenant_from_connection=tenant_from_connection,
    )
    sys.exit(run_async(code))


@main.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--latency", default=0.0, show_default=True, help="Seconds before answering.")
@click.option("--chunks", default=8, show_default=True, help="Content chunks per stream.")
@click.option("--chunk-interval", default=0.0, show_default=True, help="Seconds between chunks.")
@click.option("--fault-rate", default=0.0, show_default=True, help="Share of random faults.")
@click.option("--api-key", default=None, help="Require this bearer key.")
@click.option("--seed", default=None, type=int, help="Seed for the random faults.")
@click.option("--rpm", default=None, type=int, help="Organisation budget: requests a minute.")
@click.option("--tpm", default=None, type=int, help="Organisation budget: tokens a minute.")
@click.option("--rate-window", default=1.0, show_default=True, help="Seconds limits hold over.")
@click.option("--retry-after/--no-retry-after", default=True, help="Retry-after on 429s.")
@click.option("--max-concurrent", default=None, type=int, help="429 past this many at once.")
@click.option(
    "--report",
    "report",
    default="minute",
    show_default=True,
    type=click.Choice(["minute", "window"]),
    help="What the rate-limit headers say: the minute's budget, or the enforcing window's "
    "bucket as a share of the minute's limit (a provider that quantises).",
)
@click.option(
    "--tls-cert",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Serve HTTPS with this certificate chain (PEM).",
)
@click.option(
    "--tls-key",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="The certificate's private key (PEM; default: in --tls-cert).",
)
def mock_upstream(
    host: str,
    port: int,
    latency: float,
    chunks: int,
    chunk_interval: float,
    fault_rate: float,
    api_key: str | None,
    seed: int | None,
    rpm: int | None,
    tpm: int | None,
    rate_window: float,
    retry_after: bool,
    max_concurrent: int | None,
    report: str,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """The bundled OpenAI-compatible server, for development, tests and load tests."""
    from worker.mock.budget import BudgetConfig, Report
    from worker.mock.upstream import MockConfig, serve

    config = MockConfig(
        latency=latency,
        chunks=chunks,
        chunk_interval=chunk_interval,
        fault_rate=fault_rate,
        api_key=api_key,
        seed=seed,
        budget=BudgetConfig(
            rpm, tpm, rate_window, retry_after, max_concurrent, report=cast("Report", report)
        ),
    )
    context = None
    if tls_cert:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls_cert, tls_key)
    elif tls_key:
        raise click.UsageError("--tls-key needs --tls-cert")
    scheme = "https" if context else "http"
    # Bound here, so that a port in use is one line, and the banner only says what is true.
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listening = socket.create_server((host, port), family=family)
    except OSError as exc:
        if not _is_address_error(exc):
            raise
        _cannot_listen("mock-upstream", exc, host, port, "pass --port")
    click.echo(f"mock upstream on {scheme}://{host}:{listening.getsockname()[1]}/v1", err=True)
    serve(config, host, port, context, sock=listening)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8090, show_default=True, type=click.IntRange(0, 65535))
def console(host: str, port: int) -> None:
    """The operator page: workers, throughput, queues, dead letters and replay.

    Replay needs WORKER_CONSOLE_TOKEN (sent as a bearer token); without it the page is
    read-only.
    """
    from worker.console import serve_console
    from worker.logs import configure_logging

    settings = settings_or_exit()
    configure_logging(settings.log_format, settings.log_level)
    try:
        run_async(serve_console(settings, host, port))
    except OSError as exc:
        if not _is_address_error(exc):
            raise
        _cannot_listen("console", exc, host, port, "pass --port")


@main.command()
def budgets() -> None:
    """Each tenant's spend and limits for the current UTC day and month (WORKER_BUDGETS_FILE)."""
    from worker.budgets_cli import show_budgets

    sys.exit(show_budgets(settings_or_exit()))


@main.command()
def gateway() -> None:
    """The OpenAI-compatible HTTP API over the queues: Files, Batches, chat completions and
    embeddings (WORKER_GATEWAY_*).

    Listens on WORKER_GATEWAY_HOST:WORKER_GATEWAY_PORT (127.0.0.1:8000); keeps its files
    and batches in WORKER_DATABASE_URL (sqlite:///chat-worker.db).
    """
    from worker.amqp.connect import NoNodeAnswers
    from worker.gateway.app import serve_gateway
    from worker.gateway.keys import load_keys
    from worker.logs import configure_logging

    settings = settings_or_exit()
    try:
        if settings.gateway_keys_file is not None:
            load_keys(settings.gateway_keys_file)  # a bad file stops the start
    except SettingsError as exc:
        click.echo(f"chat-worker: invalid setting {exc}", err=True)
        sys.exit(2)
    configure_logging(settings.log_format, settings.log_level)
    try:
        run_async(serve_gateway(settings))
    except NoNodeAnswers as exc:
        click.echo(f"chat-worker gateway: no broker: {exc}", err=True)
        sys.exit(1)


@main.group()
def upstreams() -> None:
    """The upstreams of WORKER_UPSTREAMS_FILE (or WORKER_UPSTREAM_BASE_URL)."""


@upstreams.command("check")
@click.option("--model", default=None, help="Model to ask for [default: each upstream's first].")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds per upstream.")
def upstreams_check(model: str | None, timeout: float) -> None:
    """Read the file, resolve the keys (never printed) and send one tiny request to each
    upstream (max_tokens 1). Exit 0 when every upstream answers 2xx, 1 otherwise."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from worker.upstream.check import check_upstreams

    settings = settings_or_exit()
    specs = upstreams_or_exit(settings)
    rows = run_async(
        check_upstreams(specs, model=model, limit=timeout, allowed_models=settings.allowed_models)
    )
    table = Table(title=f"{len(rows)} upstreams")
    for column in ("name", "models", "model sent", "status", "latency"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row.name,
            Text(visible(", ".join(row.models))),
            Text(visible(row.model)),
            Text(visible(row.status), style="green" if row.ok else "red"),
            "-" if row.latency_ms is None else f"{row.latency_ms:.0f} ms",
        )
    Console(width=max(Console().width, 100)).print(table)
    sys.exit(0 if all(row.ok for row in rows) else 1)
