"""Who a job belongs to, and the bounded tenant labels."""

from __future__ import annotations

from worker.tenants import OTHER, TenantLabels, tenant_of


def test_user_id_wins_and_cannot_be_overridden_by_a_header() -> None:
    headers = {"x-tenant": "claimed"}
    assert tenant_of("team-a", headers, trust_header=True) == "team-a"
    assert tenant_of("team-a", headers, trust_header=False) == "team-a"


def test_the_header_counts_only_when_trusted() -> None:
    assert tenant_of(None, {"x-tenant": "team-b"}, trust_header=False) is None
    assert tenant_of(None, {"x-tenant": "team-b"}, trust_header=True) == "team-b"
    assert tenant_of(None, {"x-tenant": b" team-c "}, trust_header=True) == "team-c"


def test_no_tenant_when_the_header_is_missing_empty_or_not_text() -> None:
    for headers in (None, {}, {"x-tenant": ""}, {"x-tenant": "  "}, {"x-tenant": 42}):
        assert tenant_of(None, headers, trust_header=True) is None
    assert tenant_of("", None, trust_header=False) is None


def test_a_long_header_is_cut() -> None:
    assert len(tenant_of(None, {"x-tenant": "x" * 5000}, trust_header=True) or "") == 256


def test_labels_name_the_first_tenants_and_count_the_rest_as_other() -> None:
    labels = TenantLabels(limit=100)
    named = [labels.label(f"t{n}") for n in range(100)]
    assert named == [f"t{n}" for n in range(100)]
    assert labels.label("t100") == OTHER
    assert labels.label("t5") == "t5"  # a known tenant keeps its name
    assert labels.label(None) == ""
