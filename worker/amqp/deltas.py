"""One job's deltas on their way out: routed to ``reply_to`` or the result exchange,
pre-encoded (:mod:`worker.amqp.outbox`), each confirm checked by the next delta."""

from __future__ import annotations

import asyncio
from asyncio import FIRST_COMPLETED
from collections.abc import Mapping
from typing import Any

import aiormq
import orjson
import structlog
from pamqp.commands import Basic

from worker.amqp.blocked import BlockedState
from worker.amqp.outbox import Outbox, PreparedPublish, refusal
from worker.amqp.topology import APP_ID, DELTA, H_JOB_ID, TYPE_DELTA
from worker.job import Envelope

__all__ = ["JobDeltas", "ReplyRoutes"]

log = structlog.get_logger(__name__)


class ReplyRoutes:
    """Where each job's messages go now: its ``reply_to``, unless that queue refused one of
    them, after which the job's later messages (the result too) go to the result exchange.
    The one thing about a job's destination that changes while it runs (envelopes do not)."""

    __slots__ = ("_given_up",)

    def __init__(self) -> None:
        self._given_up: set[str] = set()

    def reply_to(self, envelope: Envelope) -> str | None:
        if envelope.reply_to and envelope.job_id not in self._given_up:
            return envelope.reply_to
        return None

    def give_up(self, envelope: Envelope) -> None:
        self._given_up.add(envelope.job_id)

    def forget(self, envelope: Envelope) -> None:
        """The job is over: its result went out (or will be retried on a new delivery)."""
        self._given_up.discard(envelope.job_id)


class JobDeltas:
    """One job's deltas (contract §5), published one at a time in ``seq`` order.

    A delta is written at once (:class:`~worker.amqp.outbox.PreparedPublish`: encoded once per
    job) and its confirm is not awaited then: the next delta, a flush interval later, when
    the confirm has long arrived, checks it first, and :meth:`settle` checks the last one
    before the result. So the reader of the upstream's stream never waits on the broker,
    and a refused delta still fails the attempt before a later one could leave a gap.

    A ``reply_to`` queue that refuses a delta (returned: no such queue; nacked: full) is
    given up for the rest of the job and the delta goes to the result exchange instead, as
    a result would. On the result exchange deltas are for whoever listens: a nack there
    (a full ``reject-publish`` queue someone bound to ``delta``) is that listener's loss,
    logged once per job, and never fails the job. While the broker blocks the connection
    nothing waits for a confirm (the wait would count as upstream silence): :meth:`settle`
    checks them all.
    """

    def __init__(
        self,
        outbox: Outbox,
        result_exchange: str,
        routes: ReplyRoutes,
        envelope: Envelope,
        custom_id: str | None,
        trace: Mapping[str, str],
        blocking: BlockedState | None,
    ) -> None:
        self._outbox = outbox
        self._result_exchange = result_exchange
        self._routes = routes
        self._envelope = envelope
        self._custom_id = custom_id
        self._blocking = blocking
        self._trace = trace
        self._route: PreparedPublish | None = None
        self._to_reply = False
        self._refused_on_exchange = False
        # Sent, not yet checked: (confirmation, body, sent to reply_to)
        self._unchecked: list[tuple[asyncio.Future[Any], bytes, bool]] = []

    def _prepared(self) -> PreparedPublish:
        if self._route is None:
            outbox = self._outbox
            envelope = self._envelope
            properties = Basic.Properties(
                content_type="application/json",
                message_type=TYPE_DELTA,
                correlation_id=envelope.correlation_id,
                # Deltas are worth nothing once the result is out: no need to hit the disk.
                delivery_mode=1,
                headers={H_JOB_ID: envelope.job_id, **self._trace},
                app_id=APP_ID,
            )
            reply_to = self._routes.reply_to(envelope)
            if reply_to:
                self._route = PreparedPublish(
                    outbox,
                    exchange="",
                    routing_key=reply_to,
                    properties=properties,
                    mandatory=True,
                )
            else:
                # Deltas are for whoever listens; with no binding they are simply not wanted.
                self._route = PreparedPublish(
                    outbox,
                    exchange=self._result_exchange,
                    routing_key=DELTA,
                    properties=properties,
                    mandatory=False,
                )
            self._to_reply = bool(reply_to)
        return self._route

    async def send(self, attempt: int, seq: int, choices: list[dict[str, Any]]) -> None:
        await self._check(wait=not (self._blocking is not None and self._blocking.blocked))
        body = orjson.dumps(
            {
                "id": self._envelope.job_id,
                "custom_id": self._custom_id,
                "type": "delta",
                "attempt": attempt,
                "seq": seq,
                "choices": choices,
            }
        )
        # The first delta of an attempt goes out now; later ones with the loop iteration's.
        self._publish(body, at_once=seq == 0)

    def _publish(self, body: bytes, *, at_once: bool = False) -> None:
        route = self._prepared()
        self._unchecked.append((route.publish(body, at_once=at_once), body, self._to_reply))

    async def settle(self) -> None:
        await self._check(wait=True, forever=True)

    async def _check(self, *, wait: bool, forever: bool = False) -> None:
        """Look at the confirms of the deltas sent, in order; with ``wait``, wait for those
        not in yet (``forever``: even while the connection is blocked)."""
        while self._unchecked:
            confirmation, body, to_reply = self._unchecked[0]
            if not confirmation.done() and not (
                wait and await self._confirmed(confirmation, forever)
            ):
                return
            del self._unchecked[0]
            if confirmation.cancelled():  # its channel closed before the broker answered
                self.discard()
                raise aiormq.exceptions.ChannelInvalidStateError("a delta was not confirmed")
            if (error := confirmation.exception()) is None:
                continue
            if not isinstance(error, aiormq.exceptions.DeliveryError):
                self.discard()
                raise error
            if not to_reply:
                if not self._refused_on_exchange:
                    self._refused_on_exchange = True
                    log.warning(
                        "a queue bound to the result exchange refused a delta; going on",
                        job_id=self._envelope.job_id,
                        reason=refusal(error),
                    )
                continue
            if self._routes.reply_to(self._envelope):
                log.warning(
                    "reply_to queue did not take a delta; using the result exchange",
                    job_id=self._envelope.job_id,
                    reply_to=self._envelope.reply_to,
                    reason=refusal(error),
                )
                # Later messages of this job (the result too) go to the exchange.
                self._routes.give_up(self._envelope)
                self._route = None
            # Deltas sent after it (to reply_to too) come next in this loop: refused as
            # well, each is sent again after this one, so the exchange gets them in order.
            self._publish(body)

    async def _confirmed(self, confirmation: asyncio.Future[Any], forever: bool) -> bool:
        """Wait for one confirm; False when the broker blocked the connection first."""
        blocking = self._blocking
        if forever or blocking is None:
            await asyncio.wait((confirmation,))
            return True
        if blocking.blocked:
            return False
        await asyncio.wait({confirmation, blocking.next_block()}, return_when=FIRST_COMPLETED)
        return confirmation.done()

    def discard(self) -> None:
        """Forget the deltas not checked (the job is over or failed)."""
        self._unchecked.clear()
