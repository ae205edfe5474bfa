"""The Redis backend packs its commands by hand (worker/store/backends/redis.py): the bytes
must be those redis-py's own ``pack_command`` writes for the same arguments."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from worker.store.backends.redis import pack

pytestmark = pytest.mark.unit

NAMES = st.sampled_from(["GET", "SET", "EVALSHA", "SCRIPT", "PX"])
# What the backend passes: keys, holders and shas (str), values (bytes), ms and counts (int);
# values long enough to go past redis-py's buffer cutoff (6,000 bytes) too.
ARGS = st.one_of(
    st.text(),
    st.binary(max_size=64),
    st.binary(min_size=6000, max_size=7000),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)


def library(*args: str | bytes | int) -> bytes:
    return b"".join(Connection().pack_command(*args))


@given(NAMES, st.lists(ARGS, max_size=8))
def test_pack_writes_what_redis_py_writes(name: str, args: list[str | bytes | int]) -> None:
    assert pack(name, *args) == library(name, *args)


def test_a_script_call_as_the_backend_makes_it() -> None:
    command = ("EVALSHA", "ab" * 20, 2, "cw:result:{j1}", "cw:lease:{j1}", "w-1", 30000, 1)
    assert pack(*command) == library(*command)
    assert pack("GET", "k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
