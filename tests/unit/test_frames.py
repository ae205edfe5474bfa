"""Pre-encoded publishes: byte for byte what aiormq and pamqp write for the same publish."""

from __future__ import annotations

import datetime
from types import SimpleNamespace
from typing import Any, cast

from aiormq.abc import ChannelFrame
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from worker.amqp.outbox import Outbox, PreparedPublish


class _Outbox:
    """What :class:`PreparedPublish` reads of its outbox to encode (no I/O here)."""

    def __init__(self, number: int) -> None:
        self.channel = SimpleNamespace(number=number)


def reference(
    number: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: dict[str, Any],
    message_id: str,
    body: bytes,
    max_content: int,
) -> bytes:
    """What ``aiormq.Channel.basic_publish`` hands its connection's writer."""
    pieces = [body[i : i + max_content] for i in range(0, len(body), max_content)]
    if len(body) < max_content:
        pieces = [body] if body else []
    frames: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(
            body_size=len(body), properties=Basic.Properties(**properties, message_id=message_id)
        ),
        *map(ContentBody, pieces),
    ]
    return ChannelFrame.marshall(channel_number=number, frames=frames).payload


short = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40).filter(
    lambda text: len(text.encode()) <= 255
)
header_values = st.one_of(
    short, st.integers(-(2**31), 2**31 - 1), st.booleans(), st.none(), st.floats(-1e30, 1e30)
)
properties = st.fixed_dictionaries(
    {},
    optional={
        "content_type": short,
        "content_encoding": short,
        "headers": st.dictionaries(st.text(min_size=1, max_size=20), header_values, max_size=5),
        "delivery_mode": st.sampled_from([1, 2]),
        "priority": st.integers(0, 9),
        "correlation_id": short,
        "reply_to": short,
        "expiration": st.integers(1, 10**9).map(str),
        "timestamp": st.datetimes(
            min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2100, 1, 1)
        ).map(lambda moment: moment.replace(microsecond=0, tzinfo=datetime.UTC)),
        "message_type": short,
        "user_id": short,
        "app_id": short,
    },
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    number=st.integers(1, 2047),
    exchange=st.from_regex(r"[-a-zA-Z0-9_.:]{0,127}", fullmatch=True),
    routing_key=short,
    mandatory=st.booleans(),
    props=properties,
    message_id=st.text(st.characters(codec="ascii"), min_size=1, max_size=40),
    body=st.binary(max_size=3000),
    max_content=st.sampled_from([1, 7, 100, 1024, 131064]),
)
def test_frames_equal_aiormq_and_pamqp(
    number: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    props: dict[str, Any],
    message_id: str,
    body: bytes,
    max_content: int,
) -> None:
    prepared = PreparedPublish(
        cast(Outbox, _Outbox(number)),
        exchange=exchange,
        routing_key=routing_key,
        properties=Basic.Properties(**props),
        mandatory=mandatory,
    )
    expected = reference(
        number, exchange, routing_key, mandatory, props, message_id, body, max_content
    )
    assert prepared.encode(body, message_id, max_content) == expected


def test_a_delta_sized_publish() -> None:
    props = {
        "content_type": "application/json",
        "message_type": "chat.delta",
        "correlation_id": "job-1",
        "delivery_mode": 1,
        "headers": {"x-job-id": "job-1", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
        "app_id": "chat-worker",
    }
    prepared = PreparedPublish(
        cast(Outbox, _Outbox(3)),
        exchange="",
        routing_key="replies",
        properties=Basic.Properties(**props),
        mandatory=True,
    )
    body = b'{"type":"delta","seq":4}'
    expected = reference(3, "", "replies", True, props, "m1", body, 131064)
    assert prepared.encode(body, "m1", 131064) == expected
