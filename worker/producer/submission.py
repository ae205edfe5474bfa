"""One ``chat-worker submit`` run's state: a reader publishing the input's lines, a consumer
writing the results as output lines."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import IO, Any

import orjson
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from worker.amqp.topology import H_JOB_ID, TYPE_DELTA
from worker.messages import ErrorCode, JobResult
from worker.producer.batchfile import JOB_ID_BYTES, UNREADABLE_RESULT, Earlier, digest, job_line
from worker.producer.client import ChatClient
from worker.producer.progress import Reporter, Tally

__all__ = ["ACK_EVERY", "ACK_INTERVAL", "SETTLE_TIMEOUT", "Submission"]

# Publishes still unconfirmed when a run stops get this long, so that the journal is exact.
SETTLE_TIMEOUT = 10.0
# Results are acknowledged in batches: after this many messages, or this many seconds.
ACK_EVERY = 100
ACK_INTERVAL = 0.05


class Submission:
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
        earlier: Earlier,
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
        """:func:`.batchfile.job_id_for` without resolving the (resolved) output path every time."""
        return digest(self.id_prefix + custom_id, JOB_ID_BYTES)

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
                custom_id, data, problem = job_line(raw, number)
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
