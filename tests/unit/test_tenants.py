"""Who a job belongs to, and the bounded tenant labels."""

from __future__ import annotations

from worker.tenants import H_TENANT_USER, OTHER, TenantLabels, tenant_of, tenant_user


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


def test_item7_a_worker_copy_names_its_tenant_in_a_header() -> None:
    copy = {H_TENANT_USER: "team-a", "x-tenant": "claimed"}
    assert tenant_of("worker", copy, trust_header=True, republishers={"worker"}) == "team-a"
    assert tenant_user("worker", copy, republishers={"worker"}) == "team-a"
    # The worker's own user without the header: that user is the tenant, as before.
    assert tenant_of("worker", {}, trust_header=False, republishers={"worker"}) == "worker"


def test_item7_the_carried_tenant_cannot_be_forged_by_a_producer() -> None:
    forged = {H_TENANT_USER: "team-a"}
    # Its own user_id (which the broker checks) is not a worker's: the header is ignored.
    assert tenant_of("mallory", forged, trust_header=True, republishers={"worker"}) == "mallory"
    # Without user_id, the header proves nothing either (x-tenant is the trusted header).
    assert tenant_of(None, forged, trust_header=True, republishers={"worker"}) is None
    assert tenant_of(None, forged, trust_header=False, republishers={"worker"}) is None


def test_item3_a_tenant_header_sent_as_a_byte_array_is_read() -> None:
    assert tenant_of(None, {"x-tenant": bytearray(b"team-d")}, trust_header=True) == "team-d"
