"""Who a job belongs to (contract §12), and the bounded set of tenant labels on metrics.

The tenant is the AMQP ``user_id`` property: RabbitMQ refuses a publish whose ``user_id``
is not the publishing connection's user, so it cannot be forged. Without one, the header
``x-tenant`` counts only when the operator trusts every producer
(``WORKER_TRUST_TENANT_HEADER=true``): anyone can write a header.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["H_TENANT", "MAX_TENANT_LABELS", "OTHER", "TenantLabels", "tenant_of"]

H_TENANT = "x-tenant"
#: distinct tenants a process names on its metrics; the rest are counted as :data:`OTHER`
MAX_TENANT_LABELS = 100
OTHER = "other"
# A header is free text: keep what ends up in logs and results a sane size.
MAX_TENANT_LENGTH = 256


def tenant_of(
    user_id: str | None, headers: Mapping[str, Any] | None, *, trust_header: bool
) -> str | None:
    """The job's tenant: ``user_id``, else a trusted ``x-tenant`` header, else none."""
    if user_id:
        return user_id
    if not trust_header or not headers:
        return None
    value = headers.get(H_TENANT)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str):
        return None
    value = value.strip()[:MAX_TENANT_LENGTH]
    return value or None


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
