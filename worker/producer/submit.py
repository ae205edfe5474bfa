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
import hashlib
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiormq
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError
from rich.console import Console

from worker.amqp.connect import BrokerRefused, NoNodeAnswers, connect_any
from worker.amqp.topology import H_JOB_ID, TYPE_DELTA
from worker.messages import BatchRequest, ErrorCode, JobResult
from worker.producer.client import BrokerUnreachable, ChatClient, ChatClientError
from worker.producer.progress import PlainReporter, Reporter, RichReporter, Tally
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

REPLY_QUEUE_PREFIX = "chat.submit."
DEFAULT_MAX_IN_FLIGHT = 1000
# Publishes still unconfirmed when a run stops get this long, so that the journal is exact.
SETTLE_TIMEOUT = 10.0
EXIT_INTERRUPTED = 130
JOB_ID_BYTES = 16
# Results are acknowledged in batches: after this many messages, or this many seconds.
ACK_EVERY = 100
ACK_INTERVAL = 0.05


class OutputExists(Exception):
    """The output file has lines and ``--resume`` was not given."""


class NoRequestQueue(Exception):
    """The request queue jobs would be published to does not exist (a mistyped name)."""


class ReplyQueueForbidden(Exception):
    """``WORKER_REPLY_TO_PATTERN`` does not admit the run's reply queue: workers would send
    every result elsewhere, and the run would wait for ever."""


#: ``error.code`` of an output line whose result arrived but does not read as a result
UNREADABLE_RESULT = "unreadable_result"


def default_output(source: Path) -> Path:
    """``FILE.jsonl`` → ``FILE.out.jsonl``, next to the input."""
    stem = source.name.removesuffix(".jsonl")
    return source.with_name(f"{stem}.out.jsonl")


def reply_queue_name(output: Path) -> str:
    """The run's durable reply queue: ``chat.submit.<hash of the absolute output path>``."""
    return REPLY_QUEUE_PREFIX + _digest(str(output.resolve()), 8)


def job_id_for(output: Path, custom_id: str) -> str:
    """The same job id for the same line of the same output, in every run."""
    return _digest(f"{output.resolve()}\0{custom_id}", JOB_ID_BYTES)


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".published")


def _digest(text: str, size: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


# --- reading ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Earlier:
    """What an existing output file already holds."""

    done: set[str] = field(default_factory=set)  # custom_ids with a job's result
    jobless: Counter[str] = field(default_factory=Counter)  # lines that never became a job
    failed: int = 0


def _read_output(path: Path) -> _Earlier:
    """Read ``path``; cut a last line a crash left half-written."""
    earlier = _Earlier()
    if not path.exists():
        return earlier
    complete = 0
    with path.open("rb+") as lines:
        for line in lines:
            if not line.endswith(b"\n"):
                break
            complete += len(line)
            try:
                document = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            custom_id = document.get("custom_id") if isinstance(document, dict) else None
            if not isinstance(custom_id, str):
                continue
            if document.get("id") is None:
                earlier.jobless[custom_id] += 1
            else:
                earlier.done.add(custom_id)
            earlier.failed += document.get("error") is not None
        lines.truncate(complete)
    return earlier


def _read_journal(path: Path) -> set[str]:
    published: set[str] = set()
    if path.exists():
        with path.open("rb") as lines:
            for line in lines:
                with contextlib.suppress(orjson.JSONDecodeError):
                    custom_id = orjson.loads(line)
                    if isinstance(custom_id, str):
                        published.add(custom_id)
    return published


def _count_lines(path: Path) -> int:
    with path.open("rb") as lines:
        return sum(1 for line in lines if line.strip())


def _job_line(raw: bytes, number: int) -> tuple[str, bytes | None, str | None]:
    """``(custom_id, the bytes to publish, None)``, or ``(custom_id, None, why not)``."""
    custom_id = f"line-{number}"
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return custom_id, None, f"not JSON: {exc}"
    if not isinstance(document, dict):
        return custom_id, None, "not a JSON object"
    given = document.get("custom_id")
    if isinstance(given, str):
        custom_id = given
    try:
        BatchRequest.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "line"
        return custom_id, None, f"{where}: {error['msg']}"
    if given is None:
        # The result must name its line: give the job the custom_id the output will show.
        return custom_id, orjson.dumps({**document, "custom_id": custom_id}), None
    return custom_id, raw.strip(), None


# --- the run ---------------------------------------------------------------------------


class _Submission:
    """One run: a reader publishing lines, a consumer writing results, one shared state."""

    def __init__(
        self,
        client: ChatClient,
        output: Path,
        out: IO[bytes],
        journal: IO[bytes],
        reply_queue: str,
        reporter: Reporter,
        tally: Tally,
        earlier: _Earlier,
        outstanding: set[str],
        max_in_flight: int,
    ) -> None:
        self.client = client
        self.output = output
        self.out = out
        self.journal = journal
        self.reply_queue = reply_queue
        self.reporter = reporter
        self.tally = tally
        self.earlier = earlier
        self.done = set(earlier.done)  # custom_ids whose result is in the output
        self.waiting = set(outstanding)  # custom_ids whose result is awaited
        self.mine: set[str] = set()  # ... of those, published by this run: each holds a slot
        self.slots = asyncio.Semaphore(max_in_flight)
        self.publishing: set[asyncio.Task[None]] = set()
        self.read_all = False
        self.finished = asyncio.Event()
        self.failure: BaseException | None = None
        self.id_prefix = f"{output}\0"
        # job id -> custom_id of every awaited job: names the job of an unreadable result
        self.job_ids = {self.job_id(custom_id): custom_id for custom_id in outstanding}
        self._unacked: AbstractIncomingMessage | None = None
        self._unacked_count = 0

    def job_id(self, custom_id: str) -> str:
        """:func:`job_id_for` without resolving the (resolved) output path every time."""
        return _digest(self.id_prefix + custom_id, JOB_ID_BYTES)

    # reader

    async def read(self, source: Path, stop: asyncio.Event) -> None:
        first_seen: dict[str, int] = {}
        with source.open("rb") as lines:
            for number, raw in enumerate(lines, 1):
                if stop.is_set():
                    return
                if not raw.strip():
                    continue
                if number % 512 == 0:
                    await asyncio.sleep(0)  # a file of invalid lines must not starve the loop
                custom_id, data, problem = _job_line(raw, number)
                if custom_id in first_seen and problem is None:
                    problem = f"duplicate custom_id {custom_id!r}, first on line "
                    problem += str(first_seen[custom_id])
                first_seen.setdefault(custom_id, number)
                if data is None or problem is not None:
                    self._jobless(number, custom_id, problem or "")
                    continue
                if custom_id in self.earlier.done:
                    self.tally.skipped += 1
                    self.reporter.update(self.tally)
                    continue
                if custom_id in self.done or custom_id in self.waiting:
                    continue  # answered already in this run, or published by an earlier one
                await self.slots.acquire()
                if stop.is_set():
                    return
                self.mine.add(custom_id)
                self.waiting.add(custom_id)
                self.job_ids[self.job_id(custom_id)] = custom_id
                task = asyncio.create_task(self._publish(custom_id, data))
                self.publishing.add(task)
                task.add_done_callback(self._published)
        self.read_all = True
        self._check_finished()

    def _jobless(self, number: int, custom_id: str, problem: str) -> None:
        if self.earlier.jobless[custom_id] > 0:
            self.earlier.jobless[custom_id] -= 1
            self.tally.skipped += 1
            return
        message = f"line {number}: {problem}"
        self.reporter.warn(message)
        error = {"code": ErrorCode.INVALID_MESSAGE.value, "message": message}
        self._write({"id": None, "custom_id": custom_id, "response": None, "error": error})
        self.tally.invalid += 1
        self.reporter.update(self.tally)

    async def _publish(self, custom_id: str, data: bytes) -> None:
        job_id = self.job_id(custom_id)
        await self.client.submit_line(data, job_id=job_id, reply_to=self.reply_queue)
        self.journal.write(orjson.dumps(custom_id) + b"\n")
        self.journal.flush()
        self.tally.published += 1

    def _published(self, task: asyncio.Task[None]) -> None:
        self.publishing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.fail(exc)
        self._check_finished()

    # consumer

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        if self.failure is not None:
            return  # not acknowledged: it stays queued for --resume
        try:
            self._take(message)
        except Exception as exc:
            self.fail(exc)
            return
        # Messages are taken in delivery order (each callback's first step runs in turn), so
        # one ack with `multiple` covers every message before it: far fewer frames.
        self._unacked = message
        self._unacked_count += 1
        if self._unacked_count >= ACK_EVERY:
            await self.flush_acks()

    async def flush_acks(self) -> None:
        message, self._unacked, self._unacked_count = self._unacked, None, 0
        if message is not None:
            await message.ack(multiple=True)

    async def ack_periodically(self) -> None:
        while True:
            await asyncio.sleep(ACK_INTERVAL)
            await self.flush_acks()

    def _take(self, message: AbstractIncomingMessage) -> None:
        if message.type == TYPE_DELTA:
            return
        try:
            result = JobResult.model_validate_json(message.body)
        except ValidationError as exc:
            self._unreadable(message, exc)
            return
        custom_id = result.custom_id
        if custom_id is None or result.id != self.job_id(custom_id):
            self.reporter.warn(f"dropped result {result.id}: not a job of this output")
            return
        if custom_id in self.done:
            return  # a second result for the same job (at-least-once delivery)
        error = None
        if result.error is not None:
            error = {"code": result.error.code.value, "message": result.error.message}
        response = result.response.model_dump(mode="json") if result.response else None
        self._write({"id": result.id, "custom_id": custom_id, "response": response, "error": error})
        self._answered(custom_id)
        self.tally.add(result)
        self.reporter.update(self.tally)
        self._check_finished()

    def _answered(self, custom_id: str) -> None:
        self.done.add(custom_id)
        self.waiting.discard(custom_id)
        self.job_ids.pop(self.job_id(custom_id), None)
        if custom_id in self.mine:
            self.mine.discard(custom_id)
            self.slots.release()

    def _unreadable(self, message: AbstractIncomingMessage, exc: ValidationError) -> None:
        """A result that does not validate is written as its job's error line (with its
        ``response`` when there is one), never dropped: the run would wait for it for ever."""
        try:
            document = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            document = None
        document = document if isinstance(document, dict) else {}
        headers = message.headers or {}
        candidates = (document.get("id"), headers.get(H_JOB_ID), message.correlation_id)
        job_id = next((str(c) for c in candidates if str(c) in self.job_ids), None)
        if job_id is None:
            self.reporter.warn(f"dropped a message that is not a result of this run: {exc}")
            return
        custom_id = self.job_ids[job_id]
        if custom_id in self.done:
            return
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "message"
        problem = f"the result cannot be read: {where}: {error['msg']}"
        self.reporter.warn(f"job {job_id} ({custom_id}): {problem}")
        response = document.get("response")
        self._write(
            {
                "id": job_id,
                "custom_id": custom_id,
                "response": response if isinstance(response, dict) else None,
                "error": {"code": UNREADABLE_RESULT, "message": problem},
            }
        )
        self._answered(custom_id)
        self.tally.failed += 1
        self.reporter.update(self.tally)
        self._check_finished()

    def _write(self, line: dict[str, Any]) -> None:
        self.out.write(orjson.dumps(line) + b"\n")
        self.out.flush()

    # ending

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.finished.set()

    def reader_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.fail(exc)

    def _check_finished(self) -> None:
        if self.read_all and not self.waiting and not self.publishing:
            self.tally.complete = True
            self.finished.set()

    async def settle(self) -> None:
        """Let unconfirmed publishes finish, so the journal lists every confirmed job."""
        if self.publishing:
            await asyncio.wait(set(self.publishing), timeout=SETTLE_TIMEOUT)


@dataclass(slots=True)
class _Start:
    output: Path
    journal: Path
    fresh: bool
    earlier: _Earlier
    outstanding: set[str]
    total: int


def _prepare(source: Path, output: Path, resume: bool) -> _Start:
    """Everything a run needs from the disk before it starts."""
    output = output.resolve()
    journal = journal_path(output)
    if not resume and output.exists() and output.stat().st_size > 0:
        raise OutputExists(f"{output} exists: pass --resume to continue it, or remove it")
    # The journal only means something next to the output it was written with.
    fresh = not resume or not output.exists()
    if fresh:
        journal.unlink(missing_ok=True)
    earlier = _Earlier() if fresh else _read_output(output)
    outstanding = _read_journal(journal) - earlier.done
    return _Start(output, journal, fresh, earlier, outstanding, _count_lines(source))


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
    start = _prepare(source, output, resume)
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
                run = _Submission(
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


async def _run(run: _Submission, queue: AbstractQueue, source: Path, stop: asyncio.Event) -> None:
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
