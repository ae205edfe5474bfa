"""The gateways' batches as the console sees them: status reports folded, merged by id.

Pure bookkeeping, no I/O, as :mod:`worker.console.state`: :meth:`GatewayBatches.observe`
takes one status body (``worker.amqp.control``: a gateway's most recent batches, every
2 s) and the time it arrived; :meth:`GatewayBatches.snapshot` renders the panel's rows.
Replicas that share a database report the same batches: a batch is shown once, as the
freshest report says it (the most lines ended wins a tie: counts only grow). A report is
foreign input, checked against :class:`GatewayStatusBody` (numbers and names bounded) and
dropped whole, and counted, when it does not fit; a gateway not heard from for
:data:`GATEWAY_FORGET_AFTER` seconds no longer counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["GATEWAY_FORGET_AFTER", "BatchReport", "GatewayBatches", "GatewayStatusBody"]

GATEWAY_SILENT_AFTER = 10.0
GATEWAY_FORGET_AFTER = 60.0
MAX_REPORTED = 200  # batches one report may hold (a gateway sends at most 50)
MAX_SHOWN = 200  # batches the panel shows, newest first
MAX_COUNT = 2**53
MAX_TIME = 2**40  # seconds since the epoch: far in any future

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Name = Annotated[str, Field(min_length=1, max_length=256)]


class BatchReport(BaseModel):
    """One batch as a gateway reports it."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
    tenant: Name | None = None
    status: Annotated[str, Field(max_length=32, pattern=r"^[a-z_]+$")]
    total: Count = 0
    completed: Count = 0
    failed: Count = 0
    created_at: Annotated[int, Field(ge=0, le=MAX_TIME)]
    cost: Annotated[float, Field(ge=0, le=1e15, allow_inf_nan=False)] | None = None


class GatewayStatusBody(BaseModel):
    """One gateway status as the console accepts it; anything else is dropped."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    type: Literal["gateway"] = "gateway"
    gateway: Name
    sent_at: str | None = Field(None, max_length=64)
    batches: Annotated[list[BatchReport], Field(max_length=MAX_REPORTED)] = []


@dataclass
class _Gateway:
    name: str
    batches: tuple[BatchReport, ...]
    last_seen: float


class GatewayBatches:
    """Every gateway heard from lately, and the batches they report."""

    def __init__(self) -> None:
        self.gateways: dict[str, _Gateway] = {}
        self.dropped = 0
        self.last_drop: str | None = None

    def observe(self, raw: Any, now: float) -> bool:
        """Fold one status in; True when it was taken (else it is counted as dropped)."""
        try:
            report = GatewayStatusBody.model_validate(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            place = ".".join(str(part) for part in error["loc"]) or "status"
            self.dropped += 1
            self.last_drop = f"{place}: {error['msg']}"[:300]
            return False
        self.gateways[report.gateway] = _Gateway(report.gateway, tuple(report.batches), now)
        return True

    def known(self, batch_id: str, now: float) -> BatchReport | None:
        """The batch as the gateways report it now; None when none does."""
        return self._merged(now).get(batch_id)

    def _merged(self, now: float) -> dict[str, BatchReport]:
        for name in [
            n for n, g in self.gateways.items() if now - g.last_seen > GATEWAY_FORGET_AFTER
        ]:
            del self.gateways[name]
        merged: dict[str, tuple[float, int, BatchReport]] = {}
        for gateway in self.gateways.values():
            for batch in gateway.batches:
                rank = (gateway.last_seen, batch.completed + batch.failed, batch)
                held = merged.get(batch.id)
                if held is None or rank[:2] > held[:2]:
                    merged[batch.id] = rank
        return {batch_id: held[2] for batch_id, held in merged.items()}

    def snapshot(self, now: float) -> dict[str, Any]:
        merged = sorted(
            self._merged(now).values(), key=lambda b: (b.created_at, b.id), reverse=True
        )
        return {
            "batches": [_row(batch, now) for batch in merged[:MAX_SHOWN]],
            "gateways": [
                {
                    "gateway": g.name,
                    "alive": now - g.last_seen < GATEWAY_SILENT_AFTER,
                    "batches": len(g.batches),
                    "seconds_since_seen": round(max(now - g.last_seen, 0.0), 1),
                }
                for g in sorted(self.gateways.values(), key=lambda g: g.name)
            ],
            "gateway_reports_dropped": self.dropped,
            "last_gateway_drop": self.last_drop,
        }


def _row(batch: BatchReport, now: float) -> dict[str, Any]:
    ended = batch.completed + batch.failed
    return {
        "id": batch.id,
        "tenant": batch.tenant,
        "status": batch.status,
        "total": batch.total,
        "completed": batch.completed,
        "failed": batch.failed,
        "progress": round(min(ended / batch.total, 1.0), 4) if batch.total else 0.0,
        "created_at": batch.created_at,
        "age_s": round(max(now - batch.created_at, 0.0), 1),
        "cost": batch.cost,
    }
