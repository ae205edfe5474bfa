"""``chat-worker submit`` against the real broker, a worker and the mock upstream."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import orjson
import pytest
import structlog
from support.broker import make_settings

from worker.mock.upstream import MockUpstream
from worker.producer.progress import PlainReporter, Tally
from worker.producer.submit import (
    NoRequestQueue,
    OutputExists,
    default_output,
    job_id_for,
    journal_path,
    reply_queue_name,
    run_submit,
    submit_file,
)
from worker.service import Worker
from worker.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "batch.jsonl"


@pytest.fixture
def settings(amqp_url: str, names: dict[str, str], mock: MockUpstream) -> Settings:
    return make_settings(amqp_url, names, mock, concurrency=128)


@pytest.fixture(autouse=True)
def quiet_worker() -> Iterator[None]:
    """The in-process worker logs a line per job: ten thousand lines would cost seconds."""
    before = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(wrapper_class=before)


@pytest.fixture
async def out(tmp_path: Path, amqp_url: str) -> AsyncIterator[Path]:
    """The output path; its reply queue is deleted after the test, whatever happened."""
    path = tmp_path / "batch.out.jsonl"
    yield path
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await channel.queue_delete(reply_queue_name(path))
    await connection.close()


def job(n: int, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"Question {n}: what is {n} plus {n}?"}]
    return {"custom_id": f"job-{n}", "body": {"model": "gpt-4o-mini", "messages": messages, **body}}


def write_batch(path: Path, count: int) -> Path:
    """``count`` lines, every tenth streamed."""
    with path.open("wb") as lines:
        for n in range(count):
            lines.write(orjson.dumps(job(n, stream=n % 10 == 0)) + b"\n")
    return path


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def read_output(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def reply_queue_exists(amqp_url: str, output: Path) -> bool:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(reply_queue_name(output), passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        await connection.close()
    return True


class StopAfter(PlainReporter):
    """Quiet progress that sets ``stop`` once ``limit`` lines are done: an interrupt."""

    def __init__(self, limit: int, stop: asyncio.Event) -> None:
        super().__init__(io.StringIO(), every=3600)
        self.limit = limit
        self.stop = stop

    def update(self, tally: Tally) -> None:
        if tally.done >= self.limit:
            self.stop.set()


async def test_ten_thousand_lines_each_get_exactly_one_output_line(
    worker: Worker, settings: Settings, mock: MockUpstream, tmp_path: Path, out: Path
) -> None:
    source = write_batch(tmp_path / "batch.jsonl", 10_000)
    started = time.perf_counter()
    tally = await submit_file(settings, source, out, reporter=PlainReporter(io.StringIO()))
    elapsed = time.perf_counter() - started
    print(f"\n10,000 lines through submit in {elapsed:.1f}s ({10_000 / elapsed:.0f} lines/s)")

    assert elapsed < 60
    assert tally.complete and tally.exit_code == 0
    assert (tally.ok, tally.failed, tally.invalid, tally.published) == (10_000, 0, 0, 10_000)
    lines = read_output(out)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"job-{n}" for n in range(10_000))
    assert mock.stats.total == 10_000
    first = next(line for line in lines if line["custom_id"] == "job-0")
    assert set(first) == {"id", "custom_id", "response", "error"}
    assert first["id"] == job_id_for(out, "job-0") and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"]
    assert first["response"]["body"]["choices"][0]["message"]["content"]
    assert tally.total_tokens == sum(
        line["response"]["body"]["usage"]["total_tokens"] for line in lines
    )
    assert not journal_path(out).exists()
    assert not await reply_queue_exists(settings.amqp_url.get_secret_value(), out)


@pytest.mark.parametrize("interrupt", ["stop", "cancel"])
async def test_an_interrupted_run_resumes_without_publishing_a_job_twice(
    worker: Worker,
    settings: Settings,
    mock: MockUpstream,
    tmp_path: Path,
    out: Path,
    interrupt: str,
) -> None:
    source = write_batch(tmp_path / "batch.jsonl", 2_000)
    stop = asyncio.Event()
    run = asyncio.create_task(
        submit_file(
            settings,
            source,
            out,
            max_in_flight=300,
            reporter=StopAfter(600, stop),
            stop=stop if interrupt == "stop" else None,
        )
    )
    if interrupt == "stop":  # what Ctrl-C does on the command line
        first = await run
        published = first.published
        assert not first.complete and first.exit_code == 1
    else:  # a cancelled coroutine: the journal must still be exact
        await stop.wait()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        published = len(journal_path(out).read_bytes().splitlines())
    assert 600 <= published < 2_000
    written = len(read_output(out))
    assert written >= 600

    # The worker goes on with what was published: those results wait in the reply queue.
    async with asyncio.timeout(30):
        while mock.stats.total < published:
            await asyncio.sleep(0.05)

    second = await submit_file(
        settings, source, out, resume=True, reporter=PlainReporter(io.StringIO())
    )
    assert second.complete and second.exit_code == 0
    assert second.skipped == written
    assert published + second.published == 2_000, "no job published twice"
    assert mock.stats.total == 2_000, "each job reached the upstream once"
    ids = [line["custom_id"] for line in read_output(out)]
    assert sorted(ids) == sorted(f"job-{n}" for n in range(2_000))
    assert not journal_path(out).exists()


async def test_invalid_lines_are_reported_by_number_and_become_error_lines(
    worker: Worker, settings: Settings, mock: MockUpstream, tmp_path: Path, out: Path
) -> None:
    source = tmp_path / "batch.jsonl"
    lines = [
        orjson.dumps(job(1)),  # 1
        b"this is not JSON",  # 2
        b"",  # 3: blank lines are skipped
        orjson.dumps({"custom_id": "no-model", "body": {"messages": []}}),  # 4
        orjson.dumps(job(1)),  # 5: duplicate of line 1
        orjson.dumps({"body": job(6)["body"]}),  # 6: no custom_id
        orjson.dumps({**job(7), "url": "/v1/completions"}),  # 7: the worker refuses it
        b"[1, 2]",  # 8
        orjson.dumps({"custom_id": None, "body": job(9)["body"]}),  # 9
    ]
    write(source, b"\n".join(lines) + b"\n")
    stderr = io.StringIO()
    tally = await submit_file(settings, source, out, reporter=PlainReporter(stderr))

    assert tally.complete and tally.exit_code == 1
    assert (tally.ok, tally.failed, tally.invalid) == (3, 1, 4)
    reported = stderr.getvalue().splitlines()
    assert [line.split(":")[0] for line in reported] == ["line 2", "line 4", "line 5", "line 8"]
    assert "duplicate custom_id 'job-1', first on line 1" in reported[2]
    by_id = {}
    for line in read_output(out):
        by_id.setdefault(line["custom_id"], []).append(line)
    assert sorted(by_id) == ["job-1", "job-7", "line-2", "line-6", "line-8", "line-9", "no-model"]
    assert [line["error"] for line in by_id["job-1"] if line["error"]] == [
        {"code": "invalid_message", "message": reported[2]}
    ]
    for custom_id in ("line-2", "no-model", "line-8"):
        (line,) = by_id[custom_id]
        assert line["id"] is None and line["response"] is None
        assert line["error"]["code"] == "invalid_message"
    for custom_id in ("line-6", "line-9"):
        (generated,) = by_id[custom_id]
        assert generated["error"] is None and generated["id"] == job_id_for(out, custom_id)
    (refused,) = by_id["job-7"]
    assert refused["error"]["code"] == "invalid_request"
    assert mock.stats.total == 3

    # Resuming a finished output adds nothing and keeps the verdict.
    again = await submit_file(
        settings, source, out, resume=True, reporter=PlainReporter(io.StringIO())
    )
    assert again.complete and again.skipped == 8 and again.published == 0
    assert again.exit_code == 1 and len(read_output(out)) == 8


async def test_resume_cuts_a_half_written_last_line(
    worker: Worker, settings: Settings, tmp_path: Path, out: Path
) -> None:
    source = write_batch(tmp_path / "batch.jsonl", 5)
    done = [{"id": job_id_for(out, "job-0"), "custom_id": "job-0", "response": None, "error": None}]
    write(out, b"".join(orjson.dumps(line) + b"\n" for line in done) + b'{"id": "x", "cus')
    tally = await submit_file(
        settings, source, out, resume=True, reporter=PlainReporter(io.StringIO())
    )
    assert tally.complete and (tally.skipped, tally.ok) == (1, 4)
    assert sorted(line["custom_id"] for line in read_output(out)) == [f"job-{n}" for n in range(5)]


async def test_an_existing_output_needs_resume(
    settings: Settings, tmp_path: Path, out: Path
) -> None:
    source = write_batch(tmp_path / "batch.jsonl", 1)
    write(out, b"{}\n")
    with pytest.raises(OutputExists, match="--resume"):
        await submit_file(settings, source, out)
    assert default_output(source) == tmp_path / "batch.out.jsonl"


async def test_the_command_submits_the_example_file(
    worker: Worker, settings: Settings, tmp_path: Path, amqp_url: str
) -> None:
    source = tmp_path / "batch.jsonl"
    write(source, EXAMPLES.read_bytes())
    env = {
        **os.environ,
        "WORKER_AMQP_URL": amqp_url,
        "WORKER_REQUEST_QUEUE": settings.request_queue,
        "WORKER_RESULT_EXCHANGE": settings.result_exchange,
        "WORKER_RESULT_QUEUE": settings.result_queue,
        "WORKER_DEAD_LETTER_QUEUE": settings.dead_letter_queue,
    }

    async def submit(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "submit",
            str(source),
            *args,
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode or 0, stderr.decode()

    code, stderr = await submit("--max-in-flight", "4")
    assert code == 0, stderr
    assert "10 of 10 lines" in stderr and "tokens: prompt" in stderr
    output = read_output(tmp_path / "batch.out.jsonl")
    assert len(output) == 10 and all(line["error"] is None for line in output)
    tools = next(line for line in output if line["custom_id"] == "weather-tool-1")
    assert tools["response"]["body"]["choices"][0]["message"]["tool_calls"]

    code, stderr = await submit()
    assert code == 2 and "--resume" in stderr


async def test_item27_submit_refuses_a_request_queue_that_does_not_exist(
    settings: Settings, tmp_path: Path, out: Path, amqp_url: str
) -> None:
    """A mistyped WORKER_REQUEST_QUEUE: before, submit declared the workers' queues itself
    (the typo among them) and waited for ever on a queue no worker reads."""
    typo = settings.model_copy(update={"request_queue": settings.request_queue + "-typo"})
    source = write_batch(tmp_path / "batch.jsonl", 2)
    with pytest.raises(NoRequestQueue, match="WORKER_REQUEST_QUEUE"):
        await submit_file(typo, source, out, reporter=PlainReporter(io.StringIO()))
    connection = await aio_pika.connect(amqp_url)
    try:
        for name in (typo.request_queue, typo.dead_letter_queue, reply_queue_name(out)):
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(name, passive=True)  # the producer made none
    finally:
        await connection.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env |= {**typo.to_env(), "OTEL_SDK_DISABLED": "true"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "submit",
        str(source),
        "--output",
        str(out),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert stderr.decode().splitlines() == [
        f"chat-worker submit: no queue {typo.request_queue!r} on the broker: is "
        "WORKER_REQUEST_QUEUE (or --lane) right? Workers declare their queues when they start"
    ]


async def test_the_summary_says_what_the_run_cost_and_unknown_without_a_price(
    start_worker: Callable[..., Awaitable[Worker]],
    settings: Settings,
    tmp_path: Path,
    out: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # genai-prices knows gpt-4o-mini at OpenAI's price, and no price for a made-up model.
    await start_worker(upstream_provider="openai")
    source = tmp_path / "priced.jsonl"
    lines = [job(n) for n in range(4)]
    lines += [{**job(n), "body": {**job(n)["body"], "model": "no-such-model"}} for n in range(4, 6)]
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))

    code = await run_submit(settings, source, out, resume=False)

    assert code == 0
    summary = capsys.readouterr().err
    assert "6 of 6 lines" in summary
    cost_line = next(line for line in summary.splitlines() if line.startswith("tokens:"))
    assert "; cost: 0.0" in cost_line and " USD for 4 results" in cost_line, cost_line
    assert cost_line.endswith("unknown for 2 without a price"), cost_line


def test_the_cost_line_of_a_tally() -> None:
    tally = Tally()
    assert tally.cost_line == "cost: none (no result in this run had a price)"
    tally.priced, tally.cost_usd = 3, 1234.5
    assert tally.cost_line == "cost: 1,234.50 USD"
    tally.cost_usd = 0.00012
    assert tally.cost_line == "cost: 0.00012 USD"
    tally.unpriced = 2
    assert tally.cost_line == "cost: 0.00012 USD for 3 results; unknown for 2 without a price"
    assert Tally(unpriced=5).cost_line == "cost: unknown (no price for the 5 results)"
