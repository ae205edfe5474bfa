"""Who a job belongs to (contract §12), and the bounded set of tenant labels on metrics.

The tenant is the AMQP ``user_id`` property: RabbitMQ refuses a publish whose ``user_id``
is not the publishing connection's user, so it cannot be forged. Without one, the header
``x-tenant`` counts only when the operator trusts every producer
(``WORKER_TRUST_TENANT_HEADER=true``): anyone can write a header.

**Copies the worker publishes again** (a delay-queue round, a counted requeue, a dead
letter and its replay) cannot carry the producer's ``user_id``: the broker would refuse
it from the worker's connection. A copy names the tenant in the header
``x-tenant-user-id`` and sets ``user_id`` to the worker's own broker user, and the header
is believed only on a message whose ``user_id`` is a worker's user (:func:`tenant_user`).

The threat model: a producer controls its headers and its ``app_id``, not its ``user_id``
(the broker checks it against the connection's user). So a producer that writes
``x-tenant-user-id`` on its own message gains nothing: its ``user_id`` (its own user, or
none) is not a worker's, and the header is ignored (and left out of every copy). Only a
connection that logged in as the worker's user can publish a ``user_id`` of that user,
and such a connection can act as the worker anyway. This holds while producers do not
share the worker's broker user, which tenants by ``user_id`` need in any case (with one
shared user, every job would have that one tenant). A worker that logs in with EXTERNAL
(a TLS certificate) does not know its own user name: its copies carry no tenant.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from worker.amqp.envelope import header_text

__all__ = [
    "H_TENANT",
    "H_TENANT_USER",
    "MAX_TENANT_LABELS",
    "OTHER",
    "TenantLabels",
    "tenant_of",
    "tenant_user",
]

H_TENANT = "x-tenant"
#: the tenant's broker user on a copy the worker published again (see the module docstring)
H_TENANT_USER = "x-tenant-user-id"
#: distinct tenants a process names on its metrics; the rest are counted as :data:`OTHER`
MAX_TENANT_LABELS = 100
OTHER = "other"
# A header is free text: keep what ends up in logs and results a sane size.
MAX_TENANT_LENGTH = 256


def tenant_user(
    user_id: str | None, headers: Mapping[str, Any] | None, *, republishers: Collection[str]
) -> str | None:
    """The broker user a job belongs to: its ``user_id``, or, on a copy published again by
    one of ``republishers`` (the worker's own broker users), the user that copy names."""
    if not user_id:
        return None
    if user_id in republishers and headers:
        carried = _text(headers.get(H_TENANT_USER))
        if carried:
            return carried
    return user_id


def tenant_of(
    user_id: str | None,
    headers: Mapping[str, Any] | None,
    *,
    trust_header: bool,
    republishers: Collection[str] = (),
) -> str | None:
    """The job's tenant: its broker user (:func:`tenant_user`), else a trusted ``x-tenant``
    header, else none."""
    if user := tenant_user(user_id, headers, republishers=republishers):
        return user
    if not trust_header or not headers:
        return None
    return _text(headers.get(H_TENANT))


def _text(value: Any) -> str | None:
    """A text header (bytes from some clients) stripped and cut; None for anything else."""
    if not isinstance(value, str | bytes | bytearray):
        return None
    return (header_text(value) or "").strip()[:MAX_TENANT_LENGTH] or None


class TenantLabels:
    """Maps tenants to metric label values: the first ``limit`` seen keep their name.

    A label per tenant without a bound would let producers grow the metric series (and
    the scraper's memory) without end; the first ones seen are usually the steady ones.
    """

    def __init__(self, limit: int = MAX_TENANT_LABELS) -> None:
        self.limit = limit
        self._named: set[str] = set()

    def label(self, tenant: str | None) -> str:
        """``""`` for no tenant, the tenant itself while the set has room, else ``other``."""
        if tenant is None:
            return ""
        if tenant in self._named:
            return tenant
        if len(self._named) < self.limit:
            self._named.add(tenant)
            return tenant
        return OTHER
