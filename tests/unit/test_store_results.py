"""The result store over the in-memory backend: lookups, sizes, lease semantics, waiting."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from worker.store import (
    Acquired,
    Circuit,
    Held,
    ResultStore,
    Skipped,
    StoreConfig,
    Stored,
    open_store,
    restamp,
)
from worker.store.backends import MemoryBackend

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def backend(clock: Clock) -> MemoryBackend:
    return MemoryBackend(clock)


@pytest.fixture
def store(backend: MemoryBackend) -> ResultStore:
    return ResultStore(backend, Circuit(errors=backend.errors), ttl=60, max_bytes=1000)


async def test_store_then_lookup(store: ResultStore) -> None:
    assert await store.lookup("job-1") is None
    assert await store.store("job-1", b'{"id":"job-1"}')
    assert await store.lookup("job-1") == b'{"id":"job-1"}'
    assert await store.lookup("job-2") is None
    assert (store.metrics.results_stored, store.metrics.results_served) == (1, 1)


async def test_results_expire(store: ResultStore, clock: Clock) -> None:
    await store.store("job-1", b"{}", ttl=5)
    clock.now += 4.9
    assert await store.lookup("job-1") == b"{}"
    clock.now += 0.2
    assert await store.lookup("job-1") is None


async def test_a_result_over_the_bound_is_not_stored(store: ResultStore) -> None:
    assert await store.store("big", b"x" * 1000)
    assert not await store.store("bigger", b"x" * 1001)
    assert await store.lookup("bigger") is None
    assert store.metrics.too_large == {"result": 1}


async def test_keys_are_namespaced_with_a_shared_hash_tag(backend: MemoryBackend) -> None:
    store = ResultStore(backend, Circuit(), prefix="t1")
    await store.acquire("a:b", "w1", 10)
    await store.store("a:b", b"{}")
    assert sorted(backend.keys()) == ["t1:lease:{a:b}", "t1:result:{a:b}"]


async def test_one_holder_at_a_time(store: ResultStore, clock: Clock) -> None:
    assert await store.acquire("job", "w1", 30) == Acquired()
    held = await store.acquire("job", "w2", 30)
    assert isinstance(held, Held)
    assert held.remaining == pytest.approx(30)
    # The holder asking again renews its own lease.
    clock.now += 10
    assert await store.acquire("job", "w1", 30) == Acquired()
    held = await store.acquire("job", "w2", 30)
    assert isinstance(held, Held)
    assert held.remaining == pytest.approx(30)


async def test_release_only_by_the_holder(store: ResultStore) -> None:
    await store.acquire("job", "w1", 30)
    assert not await store.release("job", "w2")
    assert isinstance(await store.acquire("job", "w2", 30), Held)
    assert await store.release("job", "w1")
    assert not await store.release("job", "w1")
    assert await store.acquire("job", "w2", 30) == Acquired()


async def test_renew_extends_only_the_holders_lease(store: ResultStore, clock: Clock) -> None:
    await store.acquire("job", "w1", 10)
    clock.now += 8
    assert await store.renew("job", "w1", 10)
    assert not await store.renew("job", "w2", 100)
    clock.now += 8  # 16 s after acquiring: alive only thanks to the renewal
    assert isinstance(await store.acquire("job", "w2", 10), Held)
    clock.now += 2.1
    assert await store.acquire("job", "w2", 10) == Acquired()
    assert not await store.renew("job", "w1", 10)


async def test_an_expired_lease_is_free(store: ResultStore, clock: Clock) -> None:
    await store.acquire("job", "w1", 10)
    clock.now += 10
    assert await store.acquire("job", "w2", 10) == Acquired()


async def test_a_stored_result_wins_over_the_lease(store: ResultStore) -> None:
    await store.acquire("job", "w1", 30)
    await store.store("job", b'{"done":1}')
    assert await store.acquire("job", "w2", 30) == Stored(b'{"done":1}')
    assert store.metrics.results_served == 1
    # A replay on purpose does not reuse it, and waits for the lease as anyone would.
    assert isinstance(await store.acquire("job", "w2", 30, reuse=False), Held)
    await store.release("job", "w1")
    assert await store.acquire("job", "w2", 30, reuse=False) == Acquired()


async def test_a_waiter_gets_the_result_when_the_holder_stores() -> None:
    backend = MemoryBackend()
    store = ResultStore(backend, Circuit())
    assert await store.acquire("job", "w1", 30) == Acquired()
    waiter = asyncio.create_task(store.wait_for("job", "w2", 30, within=5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await store.store("job", b"result")
    await store.release("job", "w1")
    assert await asyncio.wait_for(waiter, 1) == Stored(b"result")


async def test_a_waiter_takes_over_a_released_lease() -> None:
    store = ResultStore(MemoryBackend(), Circuit())
    await store.acquire("job", "w1", 30)
    waiter = asyncio.create_task(store.wait_for("job", "w2", 30, within=5))
    await asyncio.sleep(0.03)
    await store.release("job", "w1")  # gave up without a result (a failure to retry)
    assert await asyncio.wait_for(waiter, 1) == Acquired()
    assert isinstance(await store.acquire("job", "w1", 30), Held)


async def test_a_waiter_gives_up_after_its_bound() -> None:
    store = ResultStore(MemoryBackend(), Circuit())
    await store.acquire("job", "w1", 30)
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome = await store.wait_for("job", "w2", 30, within=0.1)
    assert isinstance(outcome, Held)
    assert 0.1 <= loop.time() - started < 0.5


async def test_down_means_skipped_and_counted(store: ResultStore, backend: MemoryBackend) -> None:
    backend.fail = True
    assert await store.lookup("job") is None
    # The circuit is open now: the rest are skipped without a call.
    assert not await store.store("job", b"{}")
    assert isinstance(await store.acquire("job", "w1", 30), Skipped)
    assert isinstance(await store.wait_for("job", "w1", 30, within=1), Skipped)
    assert not await store.release("job", "w1")
    assert not await store.renew("job", "w1", 30)
    assert store.metrics.skipped == {
        "lookup": 1, "store": 1, "acquire": 2, "release": 1, "renew": 1,
    }  # fmt: skip


async def test_open_store_wires_one_circuit_and_one_set_of_counts() -> None:
    assert open_store(None) is None
    changes = []
    backend = MemoryBackend()
    store = open_store(
        None, StoreConfig(result_ttl=0), backend=backend,
        on_change=lambda old, new, reason: changes.append(new.value),
    )  # fmt: skip
    assert store is not None
    assert store.results is None  # WORKER_RESULT_TTL=0
    assert store.cache is not None
    assert store.cache.metrics is store.metrics
    backend.fail = True
    assert isinstance(await store.cache.get("k"), Skipped)
    assert changes == ["open"]
    assert store.metrics.circuit == 2
    full = open_store(None, StoreConfig(), backend=MemoryBackend())
    assert full is not None and full.results is not None
    await full.aclose()


def test_restamp_marks_a_result_as_stored() -> None:
    body = orjson.dumps({"id": "j", "metadata": {"attempts": 1, "cache": None}})
    assert orjson.loads(restamp(body))["metadata"] == {"attempts": 1, "cache": "stored"}
