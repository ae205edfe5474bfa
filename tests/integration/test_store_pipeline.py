"""The Redis backend's auto-pipelining against a real Redis: one pipeline for the commands
of concurrent callers, each its own answer, scripts lost and loaded again, errors, and the
same answers as plain redis-py calls one at a time."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from worker.store import Acquired, Circuit, Held, ResultStore, Skipped, Stored
from worker.store.backends import RedisBackend
from worker.store.backends import redis as backend_module

pytestmark = pytest.mark.integration


def _delete(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted after it."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield prefix
    _delete(redis_url, prefix)


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(redis_url)
    yield backend
    await backend.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def private_redis() -> Iterator[str]:
    """A throwaway redis-server of this test's own: SCRIPT FLUSH on a shared Redis would
    take every other client's scripts too."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not on the PATH (Debian's redis-server; .ci/run installs it)")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        process = subprocess.Popen(
            [server, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url, socket_connect_timeout=1)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.025)
            client.close()
            yield url
        finally:
            process.terminate()
            process.wait(10)


def key(prefix: str, *parts: str) -> str:
    return ":".join((prefix, *parts))


async def test_concurrent_calls_go_in_one_pipeline_each_with_its_answer(
    backend: RedisBackend, prefix: str
) -> None:
    n = 200
    results = [key(prefix, "result", f"{{j{i}}}") for i in range(n)]
    leases = [key(prefix, "lease", f"{{j{i}}}") for i in range(n)]
    first = await asyncio.gather(
        *(
            backend.acquire(r, lk, f"w{i}", 30, reuse=True)
            for i, (r, lk) in enumerate(zip(results, leases, strict=True))
        )
    )
    assert first == [Acquired()] * n
    assert (backend.pipelines, backend.commands) == (1, n)  # the scripts' load went with it

    held = await asyncio.gather(
        *(
            backend.acquire(r, lk, "other", 30, reuse=True)
            for r, lk in zip(results, leases, strict=True)
        )
    )
    assert all(isinstance(h, Held) and 29 < h.remaining <= 30 for h in held)
    await asyncio.gather(
        *(
            backend.put_and_release(r, f"body {i}".encode(), 60, lk, f"w{i}")
            for i, (r, lk) in enumerate(zip(results, leases, strict=True))
        )
    )
    mixed = await asyncio.gather(
        *(
            backend.acquire(r, lk, "other", 30, reuse=True)
            for r, lk in zip(results, leases, strict=True)
        ),
        *(backend.get(r) for r in results),
        backend.release(leases[0], "w0"),
        backend.renew(leases[0], "w0", 30),
    )
    assert mixed[:n] == [Stored(f"body {i}".encode()) for i in range(n)]
    assert mixed[n : 2 * n] == [f"body {i}".encode() for i in range(n)]
    assert mixed[2 * n :] == [False, False]  # put_and_release ended the leases
    # 2n + 2 commands over a batch's bound of 256: two pipelines for the last gather
    assert (backend.pipelines, backend.commands) == (5, 5 * n + 2)


async def test_scripts_lost_are_loaded_again(private_redis: str) -> None:
    backend = RedisBackend(private_redis)
    admin = aioredis.Redis.from_url(private_redis)
    try:
        assert await backend.acquire("r:{a}", "l:{a}", "w1", 30, reuse=True) == Acquired()
        shas = [
            backend_module._ACQUIRE_SHA,
            backend_module._KEEP_SHA,
            backend_module._RELEASE_SHA,
            backend_module._RENEW_SHA,
        ]
        assert await admin.script_exists(*shas) == [True] * 4  # the shas computed here are Redis's
        await admin.script_flush()
        answers = await asyncio.gather(
            backend.acquire("r:{a}", "l:{a}", "w2", 30, reuse=True),
            backend.get("plain"),
            backend.renew("l:{a}", "w1", 30),
            backend.put_and_release("r:{a}", b"done", 60, "l:{a}", "w1"),
        )
        assert isinstance(answers[0], Held)
        assert answers[1:] == [None, True, None]
        assert await backend.acquire("r:{a}", "l:{a}", "w2", 30, reuse=True) == Stored(b"done")
        assert await admin.script_exists(*shas) == [True] * 4
    finally:
        await backend.aclose()
        await admin.aclose()


async def test_a_command_in_error_does_not_fail_its_batch_mates(
    backend: RedisBackend, prefix: str, redis_url: str
) -> None:
    wrong = key(prefix, "a-list")
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.rpush(wrong, b"x")
        await backend.put(key(prefix, "k"), b"v", 60)
        answers = await asyncio.gather(
            backend.get(key(prefix, "k")),
            backend.get(wrong),  # WRONGTYPE
            backend.release(wrong, "w1"),  # the script's GET on a list: an error too
            backend.get(key(prefix, "k")),
            return_exceptions=True,
        )
    finally:
        await admin.aclose()
    assert answers[0] == answers[3] == b"v"
    assert isinstance(answers[1], redis.ResponseError) and "WRONGTYPE" in str(answers[1])
    assert isinstance(answers[2], redis.ResponseError)
    # Not "unavailable": an error reply is a bug of the caller's, not Redis down.
    assert backend.pipelines == 2
    assert await backend.get(key(prefix, "k")) == b"v"  # and the connection is fine


async def test_redis_on_a_closed_port_fails_every_caller_as_unavailable() -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0")
    try:
        answers = await asyncio.gather(
            *(backend.get(f"k{i}") for i in range(20)),
            backend.acquire("r", "l", "w", 30, reuse=True),
            backend.put_and_release("r", b"v", 60, "l", "w"),
            return_exceptions=True,
        )
        assert all(isinstance(a, backend.errors) for a in answers), answers
        assert backend.pipelines == 1
        # Through the circuit: every call skipped, the circuit open once.
        circuit = Circuit(errors=backend.errors)
        store = ResultStore(backend, circuit, prefix="never")
        outcomes = await asyncio.gather(*(store.acquire(f"j{i}", "w", 30) for i in range(10)))
        assert all(isinstance(o, Skipped) for o in outcomes)
        assert store.metrics.skipped == {"acquire": 10}
    finally:
        await backend.aclose()


async def test_a_silent_redis_times_the_pipeline_out(prefix: str) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = RedisBackend(f"redis://127.0.0.1:{port}/0", timeout=0.1)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        answers = await asyncio.gather(backend.get("a"), backend.get("b"), return_exceptions=True)
        assert all(isinstance(a, redis.TimeoutError) for a in answers), answers
        assert loop.time() - started < 0.5
    finally:
        await backend.aclose()
        server.close()
        await server.wait_closed()


async def test_cancelled_callers_do_not_break_the_pipeline(
    backend: RedisBackend, prefix: str
) -> None:
    keys = [key(prefix, f"k{i}") for i in range(40)]
    await asyncio.gather(*(backend.put(k, k.encode(), 60) for k in keys))
    before = backend.pipelines
    tasks = [asyncio.create_task(backend.get(k)) for k in keys]
    for _ in range(3):  # the flush has run and the pipeline is out, not yet answered
        await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    # and one cancelled before its batch leaves: it is not sent
    early = asyncio.create_task(backend.get(keys[0]))
    await asyncio.sleep(0)
    early.cancel()
    answers = await asyncio.gather(*tasks, early, return_exceptions=True)
    assert all(isinstance(a, asyncio.CancelledError) for a in answers[:-1:2])
    assert answers[1:-1:2] == [k.encode() for k in keys[1::2]]
    # (Cancelled while the first pipeline is out, almost always; answered if it was quicker.)
    assert isinstance(answers[-1], asyncio.CancelledError) or answers[-1] == keys[0].encode()
    # The connection is in step: the next answers are these keys', not stale replies.
    assert await asyncio.gather(*(backend.get(k) for k in keys)) == [k.encode() for k in keys]
    assert backend.pipelines - before in (2, 3)


async def test_timed_out_callers_through_the_circuit_leave_the_backend_usable(
    backend: RedisBackend, prefix: str
) -> None:
    circuit = Circuit(errors=backend.errors, timeout=0.000_001)
    store = ResultStore(backend, circuit, prefix=prefix)
    outcomes = await asyncio.gather(*(store.acquire(f"j{i}", "w", 30) for i in range(10)))
    assert all(isinstance(o, Skipped) for o in outcomes)
    await asyncio.sleep(0.05)
    ok = ResultStore(backend, Circuit(errors=backend.errors), prefix=prefix)
    assert await ok.store("j0", b"{}")
    assert await ok.lookup("j0") == b"{}"


# --- the same answers as redis-py, one call at a time ---------------------------------------


class Unpipelined:
    """The backend's operations as plain redis-py calls, one round trip each, the scripts as
    redis-py ``Script`` objects: the reference the pipelined backend must agree with."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.acquire_ = client.register_script(backend_module._ACQUIRE)
        self.keep = client.register_script(backend_module._KEEP)
        self.release_ = client.register_script(backend_module._RELEASE)
        self.renew_ = client.register_script(backend_module._RENEW)

    async def run(self, op: tuple[Any, ...]) -> Any:
        name, *args = op
        if name == "get":
            return await self.client.get(args[0])
        if name == "put":
            return await self.client.set(args[0], args[1], px=backend_module._ms(args[2]))
        if name == "put_and_release":
            k, value, ttl, lease, holder = args
            return await self.keep(keys=[k, lease], args=[value, backend_module._ms(ttl), holder])
        if name == "acquire":
            r, lease, holder, ttl, reuse = args
            return await self.acquire_(
                keys=[r, lease], args=[holder, backend_module._ms(ttl), 1 if reuse else 0]
            )
        if name == "release":
            return await self.release_(keys=[args[0]], args=[args[1]])
        assert name == "renew"
        return await self.renew_(keys=[args[0]], args=[args[1], backend_module._ms(args[2])])


def normal(answer: Any) -> Any:
    """Both sides' answers in one form (a Held's time left in seconds: see :func:`same`)."""
    if isinstance(answer, Stored):
        return [b"stored", answer.body]
    if isinstance(answer, Held):
        return [b"held", answer.remaining]
    if isinstance(answer, Acquired):
        return [b"acquired"]
    if isinstance(answer, list) and answer and answer[0] == b"held":
        return [b"held", int(answer[1]) / 1000]
    if isinstance(answer, list):
        return answer
    if isinstance(answer, Exception):
        return type(answer).__name__
    if answer is True or answer is False or answer is None or isinstance(answer, bytes):
        return answer
    return bool(answer)


def same(got: Any, want: Any) -> bool:
    """Equal, a Held's time left within a second (the two sides run a moment apart)."""
    got, want = normal(got), normal(want)
    if isinstance(got, list) and got[:1] == [b"held"] and isinstance(want, list):
        return want[:1] == [b"held"] and abs(got[1] - want[1]) < 1
    return bool(got == want)


async def pipelined(backend: RedisBackend, op: tuple[Any, ...]) -> Any:
    name, *args = op
    if name == "get":
        return await backend.get(args[0])
    if name == "put":
        await backend.put(*args)
        return True  # redis-py's SET answers True
    if name == "put_and_release":
        await backend.put_and_release(*args)
        return 1
    if name == "acquire":
        *rest, reuse = args
        return await backend.acquire(*rest, reuse=reuse)
    if name == "release":
        return await backend.release(*args)
    return await backend.renew(*args)


JOBS = st.sampled_from(["a", "b", "c"])
HOLDERS = st.sampled_from(["w1", "w2", "w3"])
TTLS = st.sampled_from([30.0, 60.0, 90.0])
VALUES = st.binary(max_size=40)


def operation(
    job: str, holder: str, ttl: float, value: bytes, kind: int, reuse: bool
) -> tuple[Any, ...]:
    r, lease = f"result:{{{job}}}", f"lease:{{{job}}}"
    return [
        ("get", r),
        ("put", r, value, ttl),
        ("put_and_release", r, value, ttl, lease, holder),
        ("acquire", r, lease, holder, ttl, reuse),
        ("release", lease, holder),
        ("renew", lease, holder, ttl),
        ("get", lease),
    ][kind]


OPERATIONS = st.builds(operation, JOBS, HOLDERS, TTLS, VALUES, st.integers(0, 6), st.booleans())
# Steps of operations issued concurrently: each step one batch, in order.
STEPS = st.lists(st.lists(OPERATIONS, min_size=1, max_size=12), min_size=1, max_size=6)


def with_prefix(op: tuple[Any, ...], prefix: str) -> tuple[Any, ...]:
    name, first, *rest = op
    out: list[Any] = [name, f"{prefix}:{first}"]
    for arg in rest:
        out.append(f"{prefix}:{arg}" if isinstance(arg, str) and arg.startswith("lease:") else arg)
    return tuple(out)


async def compare(url: str, steps: list[list[tuple[Any, ...]]]) -> None:
    mine, theirs = f"test-{uuid.uuid4().hex[:10]}", f"test-{uuid.uuid4().hex[:10]}"
    backend = RedisBackend(url)
    client = aioredis.Redis.from_url(url)
    reference = Unpipelined(client)
    try:
        for step in steps:
            got = await asyncio.gather(
                *(pipelined(backend, with_prefix(op, mine)) for op in step), return_exceptions=True
            )
            want = []
            for op in step:
                try:
                    want.append(await reference.run(with_prefix(op, theirs)))
                except redis.RedisError as exc:
                    want.append(exc)
            assert len(got) == len(want)
            assert all(same(a, b) for a, b in zip(got, want, strict=True)), (step, got, want)
        assert backend.pipelines == len(steps)
    finally:
        await backend.aclose()
        await client.aclose()
        _delete(url, mine)
        _delete(url, theirs)


@hypothesis_settings(max_examples=60, deadline=None)
@given(STEPS)
def test_the_pipelined_backend_answers_as_redis_py_one_call_at_a_time(
    redis_url: str, steps: list[list[tuple[Any, ...]]]
) -> None:
    asyncio.run(compare(redis_url, steps))
