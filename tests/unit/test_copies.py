"""A copy of a delivered request: bounded to the frame, bytes kept, tenant kept (no broker)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pamqp.header import ContentHeader

from worker.amqp.copies import BROKER_MARGIN, Republisher, copy_request
from worker.amqp.dlq import describe
from worker.tenants import H_TENANT_USER

FRAME_MAX = 131072
WORKER = Republisher("worker", FRAME_MAX)


def delivered(headers: dict[str, Any] | None = None, **properties: Any) -> Any:
    """What copy_request reads of an incoming message."""
    fields: dict[str, Any] = {
        "body": b'{"custom_id": "c"}',
        "headers": headers,
        "content_type": "application/json",
        "content_encoding": None,
        "priority": 0,
        "correlation_id": "corr",
        "reply_to": "replies",
        "timestamp": None,
        "type": None,
        "app_id": None,
        "user_id": None,
        "message_id": "m-1",
        "expiration": 5,
    }
    fields.update(properties)
    return SimpleNamespace(**fields)


def frame_size(message: Any) -> int:
    """The bytes of the header frame the copy is published with."""
    return 8 + len(ContentHeader(0, len(message.body), message.properties).marshal())


def test_item2_a_copy_fits_the_frame_whatever_the_producer_sent() -> None:
    own = {"x-error-code": "invalid_request", "x-error-message": "e" * 1000}
    request = delivered({"x-first": "kept", "x-big": "b" * (FRAME_MAX - 1200), "x-last": 7})
    copy = copy_request(request, message_id="job", headers=own, by=WORKER)
    assert frame_size(copy) <= FRAME_MAX - BROKER_MARGIN
    assert copy.headers == {"x-first": "kept", "x-last": 7, **own}, "the big one left out"


def test_item2_headers_that_fit_are_all_carried_in_their_order() -> None:
    headers = {f"x-{n}": "v" * 100 for n in range(50)}
    copy = copy_request(delivered(headers), message_id="job", headers={"x-a": 1}, by=WORKER)
    assert list(copy.headers) == [*headers, "x-a"]


def test_item2_a_smaller_negotiated_frame_bounds_the_copy_too() -> None:
    small = Republisher("worker", 16384)
    request = delivered({f"x-{n}": "v" * 1000 for n in range(30)})
    copy = copy_request(request, message_id="job", headers={}, by=small)
    assert frame_size(copy) <= 16384 - BROKER_MARGIN
    assert 0 < len(copy.headers) < 30


def test_bookkeeping_and_expiration_start_again_on_a_copy() -> None:
    request = delivered({"x-death": [{"count": 1}], "x-delivery-count": 3, "x-keep": "k"})
    copy = copy_request(request, message_id="job", headers={}, by=WORKER)
    assert copy.headers == {"x-keep": "k"}
    assert copy.expiration is None
    assert copy.message_id == "job"


def test_item3_bytes_headers_are_carried_as_bytes() -> None:
    request = delivered(
        {
            "x-custom-id": b"\xff\xfe",
            "x-array": bytearray(b"\x00\x01"),
            "x-nested": {"inner": b"\xe9", "list": [b"\xff", "text"]},
        }
    )
    copy = copy_request(request, message_id="job", headers={}, by=WORKER)
    frame_size(copy)  # encodes: a ``bytes`` value raised TypeError here before
    assert copy.headers["x-custom-id"] == bytearray(b"\xff\xfe")
    assert copy.headers["x-nested"] == {"inner": bytearray(b"\xe9"), "list": [b"\xff", "text"]}


def test_item3_a_dead_letter_with_bytes_headers_is_described() -> None:
    letter = describe(
        delivered(
            {
                "x-custom-id": b"\xff\xfe",
                "x-error-code": bytearray(b"invalid_request"),
                "x-error-message": b"caf\xe9",
                "x-job-id": b"j\xff",
            },
            message_id=None,
        )
    )
    assert letter.custom_id == "\ufffd\ufffd"
    assert letter.error_code == "invalid_request"
    assert letter.error_message == "caf\ufffd"
    assert letter.job_id == "j\ufffd"


def test_item7_a_copy_carries_the_tenant_under_the_worker_user() -> None:
    copy = copy_request(delivered(user_id="team-a"), message_id="job", headers={}, by=WORKER)
    assert copy.user_id == "worker"
    assert copy.headers[H_TENANT_USER] == "team-a"
    # A copy of that copy (a dead letter, then its replay) names the same tenant.
    again = delivered(copy.headers, user_id=copy.user_id)
    assert copy_request(again, message_id="job", headers={}, by=WORKER).headers[H_TENANT_USER] == (
        "team-a"
    )


@pytest.mark.parametrize("user_id", [None, "mallory"])
def test_item7_a_producer_cannot_plant_a_tenant_on_a_copy(user_id: str | None) -> None:
    request = delivered({H_TENANT_USER: "team-a"}, user_id=user_id)
    copy = copy_request(request, message_id="job", headers={}, by=WORKER)
    assert copy.headers.get(H_TENANT_USER) == user_id
    assert copy.user_id == ("worker" if user_id else None)


def test_item7_without_a_known_worker_user_no_user_id_is_set() -> None:
    """EXTERNAL login: the worker cannot name its own user, and a wrong user_id would make
    the broker close the channel."""
    unknown = Republisher(None, FRAME_MAX)
    copy = copy_request(delivered(user_id="team-a"), message_id="job", headers={}, by=unknown)
    assert copy.user_id is None and H_TENANT_USER not in copy.headers
