"""``chat-worker submit``: a Batch input file through the workers into a Batch output file.

Results come back on a durable queue named after the output file, so a run that stops
(Ctrl-C, a crash, a lost connection) leaves them waiting there, and ``--resume`` writes
them. Next to the output, ``OUT.published`` lists the ``custom_id`` of every job the broker
confirmed: a resumed run awaits those instead of publishing them again. Each job's id is
derived from (output path, ``custom_id``), so a job published twice all the same (a crash
between the confirm and that record) is recognised, and its second result dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import aiormq
from aio_pika.abc import AbstractConnection, AbstractQueue
from rich.console import Console

from worker.amqp.connect import BrokerRefused, NoNodeAnswers, connect_any
from worker.producer.batchfile import (
    REPLY_QUEUE_PREFIX,
    UNREADABLE_RESULT,
    OutputExists,
    default_output,
    job_id_for,
    journal_path,
    prepare,
    reply_queue_name,
)
from worker.producer.client import BrokerUnreachable, ChatClient, ChatClientError
from worker.producer.progress import PlainReporter, Reporter, RichReporter, Tally
from worker.producer.submission import Submission
from worker.settings import Settings

__all__ = [
    "UNREADABLE_RESULT",
    "NoRequestQueue",
    "OutputExists",
    "ReplyQueueForbidden",
    "default_output",
    "job_id_for",
    "journal_path",
    "reply_queue_name",
    "run_submit",
    "submit_file",
]

DEFAULT_MAX_IN_FLIGHT = 1000
EXIT_INTERRUPTED = 130


class NoRequestQueue(Exception):
    """The request queue jobs would be published to does not exist (a mistyped name)."""


class ReplyQueueForbidden(Exception):
    """``WORKER_REPLY_TO_PATTERN`` does not admit the run's reply queue: workers would send
    every result elsewhere, and the run would wait for ever."""


async def submit_file(
    settings: Settings,
    source: Path,
    output: Path,
    *,
    resume: bool = False,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    reporter: Reporter | None = None,
    stop: asyncio.Event | None = None,
    lane: str | None = None,
    tenant_from_connection: bool = False,
) -> Tally:
    """Publish every line of ``source``; write one Batch output line per line to ``output``.

    Returns when every line has its output line (``Tally.complete``), or when ``stop`` is
    set (results still due stay queued for a run with ``resume``). Raises
    :class:`OutputExists` when ``output`` has lines and ``resume`` is false.

    ``lane`` names the request queue (a lane of §12; the first one by default);
    ``tenant_from_connection`` sets each job's ``user_id`` to the connection's user.
    """
    reply_queue = reply_queue_name(output)
    pattern = settings.reply_to_pattern
    if pattern is not None and not pattern.fullmatch(reply_queue):
        raise ReplyQueueForbidden(
            f"WORKER_REPLY_TO_PATTERN does not admit this run's reply queue {reply_queue!r}: "
            f"allow {REPLY_QUEUE_PREFIX}* (e.g. add |{REPLY_QUEUE_PREFIX}[0-9a-f]+)"
        )
    start = prepare(source, output, resume)
    output, journal, earlier = start.output, start.journal, start.earlier
    reporter = reporter or PlainReporter(sys.stderr)
    stop = stop or asyncio.Event()
    tally = Tally(total=start.total, earlier_failed=earlier.failed)
    if start.outstanding:
        reporter.warn(
            f"awaiting the results of {len(start.outstanding)} jobs an earlier run published "
            f"(listed in {journal.name}; remove it to publish them again)"
        )

    try:
        connection = await connect_any(settings.amqp_urls, name=f"chat-worker submit {os.getpid()}")
    except (NoNodeAnswers, BrokerRefused) as exc:
        raise BrokerUnreachable(str(exc)) from exc
    try:
        # A producer declares no queue of the workers': a mistyped name would create a
        # queue no worker reads, and the run would wait for ever. The queue must exist.
        request_queue = lane or settings.lanes[0].queue
        await _require_queue(connection, request_queue)
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=max(max_in_flight, 100))
        queue = await channel.declare_queue(
            reply_queue, durable=True, arguments={"x-queue-type": settings.queue_type}
        )
        if start.fresh:
            await queue.purge()  # results of an abandoned run for this output
        async with ChatClient(
            connection,
            settings=settings,
            request_queue=lane,
            tenant_from_connection=tenant_from_connection,
        ) as client:
            with output.open("ab") as out, journal.open("ab") as journal_file:
                run = Submission(
                    client,
                    output,
                    out,
                    journal_file,
                    reply_queue,
                    reporter,
                    tally,
                    earlier,
                    start.outstanding,
                    max_in_flight,
                )
                await _run(run, queue, source, stop)
        if tally.complete:
            await channel.queue_delete(reply_queue)
            journal.unlink(missing_ok=True)
    finally:
        await connection.close()
    return tally


async def _require_queue(connection: AbstractConnection, name: str) -> None:
    """Raise :class:`NoRequestQueue` when no queue ``name`` exists (a passive declare: it
    creates nothing, and fails on a channel of its own)."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise NoRequestQueue(
            f"no queue {name!r} on the broker: is WORKER_REQUEST_QUEUE (or --lane) right? "
            "Workers declare their queues when they start"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def _run(run: Submission, queue: AbstractQueue, source: Path, stop: asyncio.Event) -> None:
    run.reporter.update(run.tally)
    tag = await queue.consume(run.on_reply)
    reader = asyncio.create_task(run.read(source, stop))
    reader.add_done_callback(run.reader_done)
    acker = asyncio.create_task(run.ack_periodically())
    stopped = asyncio.create_task(stop.wait())
    finished = asyncio.create_task(run.finished.wait())
    try:
        await asyncio.wait({stopped, finished}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stopped, finished, reader, acker):
            task.cancel()
        await asyncio.gather(reader, acker, return_exceptions=True)
        await run.settle()
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
            await run.flush_acks()
        run.reporter.update(run.tally)
    if run.failure is not None:
        raise run.failure


# --- the command -----------------------------------------------------------------------


async def run_submit(
    settings: Settings,
    source: Path,
    output: Path | None,
    *,
    resume: bool,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    lane: str | None = None,
    tenant_from_connection: bool = False,
) -> int:
    """``chat-worker submit``: the run with a progress display; returns the exit code."""
    output = output or default_output(source)
    console = Console(stderr=True)
    reporter: Reporter = RichReporter(console) if console.is_terminal else PlainReporter(sys.stderr)
    stop = asyncio.Event()
    with _signals(stop):
        try:
            tally = await submit_file(
                settings,
                source,
                output,
                resume=resume,
                max_in_flight=max_in_flight,
                reporter=reporter,
                stop=stop,
                lane=lane,
                tenant_from_connection=tenant_from_connection,
            )
        except (OutputExists, ReplyQueueForbidden, NoRequestQueue) as exc:
            _say(console, f"chat-worker submit: {exc}")
            return 2
        except BrokerUnreachable as exc:
            refused = isinstance(exc.__cause__, BrokerRefused)
            what = "the broker refused the connection" if refused else "cannot reach the broker"
            _say(console, f"chat-worker submit: {what}: {exc}")
            return 1
        except ChatClientError as exc:
            _say(console, f"chat-worker submit: {exc}")
            return 1
        except (OSError, aiormq.exceptions.AMQPError) as exc:
            _say(console, f"chat-worker submit: {type(exc).__name__}: {exc}")
            return 1
        except asyncio.CancelledError:  # a second Ctrl-C
            _say(console, "chat-worker submit: cancelled; run again with --resume to continue")
            return EXIT_INTERRUPTED
        finally:
            reporter.close()
    for line in _summary(tally, output):
        _say(console, line)
    return tally.exit_code if tally.complete else EXIT_INTERRUPTED


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _signals(stop: asyncio.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM: stop publishing and end (results wait for --resume).
    Second: cancel at once."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def handle() -> None:
        if stop.is_set() and main is not None:
            main.cancel()
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
        for sig in signals:
            loop.add_signal_handler(sig, handle)
    try:
        yield
    finally:
        with contextlib.suppress(NotImplementedError):
            for sig in signals:
                loop.remove_signal_handler(sig)


def _summary(tally: Tally, output: Path) -> list[str]:
    lines = [
        f"submit: {tally.done} of {tally.total} lines in {tally.elapsed:.1f}s "
        f"({tally.rate:.1f} lines/s): {tally.ok} ok, {tally.failed} failed, "
        f"{tally.invalid} invalid, {tally.skipped} already in the output",
        f"tokens: prompt {tally.prompt_tokens}, completion {tally.completion_tokens}, "
        f"total {tally.total_tokens}; {tally.cost_line}",
        f"output: {output}",
    ]
    if tally.earlier_failed:
        lines.append(f"the output held {tally.earlier_failed} failed lines from earlier runs")
    if not tally.complete:
        lines.append(
            f"interrupted with {tally.total - tally.done} lines to go: results still due stay "
            "queued; run the same command with --resume to continue"
        )
    return lines
