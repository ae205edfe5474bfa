"""``chat-worker demo``: mock upstream + local broker + worker + sample jobs, results printed."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from pathlib import Path

import aio_pika
import orjson
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from worker.amqp.connect import connect_any, reachable
from worker.amqp.topology import delay_queues
from worker.logs import configure_logging
from worker.messages import JobResult
from worker.mock.broker import docker_available, throwaway_broker
from worker.mock.upstream import MockConfig, MockUpstream
from worker.service import Worker
from worker.settings import Settings

__all__ = ["run_demo"]

#: the sample jobs: plain, streamed, tool calls, reasoning, and one invalid
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "demo.jsonl"
RESULT_TIMEOUT = 30.0


async def run_demo(settings: Settings, lines: list[bytes]) -> int:
    # Rich assumes 80 columns off a terminal (CI logs, pipes): too narrow for the table.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    configure_logging("console", "warning")
    url = settings.amqp_url.get_secret_value()  # one URL or a list of a cluster's nodes
    problem = await reachable(url)
    if problem is None:
        return await _demo(console, settings, url, lines)
    if not docker_available():
        console.print(
            f"[red]No RabbitMQ at WORKER_AMQP_URL ({problem}) and no Docker engine for a "
            "throwaway one.[/] Start one (`rabbitmq-server -detached`, or "
            "`docker run -d -p 5672:5672 rabbitmq:3.13`) or set WORKER_AMQP_URL."
        )
        return 1
    console.print("No broker at WORKER_AMQP_URL: starting a throwaway RabbitMQ in Docker...")
    with throwaway_broker() as url:
        return await _demo(console, settings, url, lines)


async def _demo(console: Console, settings: Settings, amqp_url: str, lines: list[bytes]) -> int:
    prefix = f"chat-demo-{uuid.uuid4().hex[:8]}"
    async with MockUpstream(MockConfig(chunks=12, chunk_interval=0.02)) as mock:
        demo_settings = settings.model_copy(
            update={
                "amqp_url": SecretStr(amqp_url),
                "upstream_base_url": mock.base_url,
                "request_queue": f"{prefix}.requests",
                "result_exchange": f"{prefix}.results",
                "result_queue": "",
                "dead_letter_queue": f"{prefix}.dlq",
                "queue_type": "classic",
                "http_port": 0,
            }
        )
        console.print(f"[bold]mock upstream[/] {mock.base_url}   [bold]queues[/] {prefix}.*")
        results, deltas = await _drive(demo_settings, amqp_url, lines)
    _print(console, results, deltas)
    if len(results) < len(lines):
        console.print(f"[red]only {len(results)} of {len(lines)} results arrived[/]")
        return 1
    return 0


async def _drive(
    settings: Settings, amqp_url: str, lines: list[bytes]
) -> tuple[list[JobResult], dict[str, int]]:
    worker = Worker(settings)
    running = asyncio.create_task(worker.run())
    connection = await connect_any(amqp_url, name="chat-worker demo")
    results: list[JobResult] = []
    deltas: dict[str, int] = {}
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        await worker.wait_ready()
        for n, line in enumerate(lines):
            await channel.default_exchange.publish(
                aio_pika.Message(line, message_id=f"demo-{n}", reply_to=replies.name),
                settings.request_queue,
            )
        async with asyncio.timeout(RESULT_TIMEOUT), replies.iterator() as messages:
            async for message in messages:
                await message.ack()
                document = orjson.loads(message.body)
                if document["type"] == "delta":
                    deltas[document["id"]] = deltas.get(document["id"], 0) + 1
                    continue
                results.append(JobResult.model_validate(document))
                if len(results) == len(lines):
                    break
    finally:
        worker.stop()
        await running
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            for name in (
                settings.request_queue,
                settings.dead_letter_queue,
                *delay_queues(settings),
            ):
                await cleanup.queue_delete(name)
            await cleanup.exchange_delete(settings.result_exchange)
        await connection.close()
    return results, deltas


def _print(console: Console, results: list[JobResult], deltas: dict[str, int]) -> None:
    table = Table(title="chat-worker demo: one result per job")
    for column in ("custom_id", "status", "deltas", "prompt", "completion", "total"):
        table.add_column(column, no_wrap=True, min_width=len(column))
    table.add_column("reply", no_wrap=True, overflow="ellipsis", max_width=44)
    totals = [0, 0, 0]
    for result in sorted(results, key=lambda r: r.id):
        usage = result.usage
        if usage:
            totals = [
                totals[0] + (usage.prompt_tokens or 0),
                totals[1] + (usage.completion_tokens or 0),
                totals[2] + (usage.total_tokens or 0),
            ]
        table.add_row(
            result.custom_id or result.id,
            "ok" if result.ok else f"[red]{result.error.code.value}[/]" if result.error else "",
            str(deltas.get(result.id, 0)),
            *(
                str(v)
                for v in (
                    (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
                    if usage
                    else ("-", "-", "-")
                )
            ),
            _summary(result),
        )
    console.print(table)
    console.print(
        f"[bold]token totals[/]: prompt {totals[0]}, completion {totals[1]}, total {totals[2]}"
    )


def _summary(result: JobResult) -> str:
    if result.error is not None:
        return result.error.message[:60]
    body = result.response.body if result.response else None
    message = (body or {}).get("choices", [{}])[0].get("message", {})
    if message.get("tool_calls"):
        call = message["tool_calls"][0]["function"]
        return f"tool call {call['name']}({call['arguments']})"[:60]
    return str(message.get("content") or "")[:60]
