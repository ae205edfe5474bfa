"""Heartbeats on the real broker, and the console's API over them (contract §14)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import httpx
import orjson
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiohttp import web
from amqp_proxy import publish_raw
from pydantic import SecretStr
from support.broker import Replies, publish

from worker.amqp.topology import H_ERROR_CODE, H_ERROR_MESSAGE, declare
from worker.console import ConsoleApp
from worker.heartbeat import TYPE_HEARTBEAT
from worker.service import Worker
from worker.settings import Settings

TOKEN = "console-test-token-5f2c"


async def listen(
    connection: AbstractConnection, exchange_name: str
) -> asyncio.Queue[AbstractIncomingMessage]:
    """Heartbeats of the test's events exchange, as the console receives them."""
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        exchange_name, aio_pika.ExchangeType.FANOUT, durable=True
    )
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange)
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(inbox.put, no_ack=True)
    return inbox


def job(key: str, secret: str, fault: str | None = None) -> dict[str, Any]:
    mock: dict[str, Any] = {"key": key}
    if fault:
        mock.update(fault=fault, times=1)  # fails once: a replay then succeeds
    return {
        "custom_id": f"custom-{key}",
        "body": {"model": "m", "mock": mock, "messages": [{"role": "user", "content": secret}]},
    }


async def test_a_worker_publishes_heartbeats_with_its_counters(
    worker: Worker, connection: AbstractConnection, replies: Replies
) -> None:
    inbox = await listen(connection, worker.settings.events_exchange)
    secret = f"PROMPT-{uuid.uuid4().hex}"
    await publish(
        connection,
        worker.settings.request_queue,
        job("a", secret),
        message_id="a",
        reply_to=replies.name,
    )
    await replies.until_results(1)
    async with asyncio.timeout(10):
        while True:
            message = await inbox.get()
            body = orjson.loads(message.body)
            if body["jobs"]["ok"] == 1:
                break
    assert message.type == TYPE_HEARTBEAT
    assert body["type"] == "heartbeat"
    assert body["worker"] == worker.identity
    assert body["ready"] is True
    assert body["lanes"] == {worker.settings.request_queue: {"weight": 1, "in_flight": 0}}
    assert body["errors"] == {}
    assert set(body["tokens"]) == {"m"}
    assert body["tokens"]["m"]["input"] > 0
    assert body["tokens"]["m"]["output"] > 0
    # The single upstream's gate, open, with the budget the mock's answer did not report.
    assert body["upstreams"]["default"]["state"] == "open"
    assert secret.encode() not in message.body


async def test_no_heartbeats_with_events_off(
    start_worker: Callable[..., Awaitable[Worker]],
    connection: AbstractConnection,
    names: dict[str, str],
) -> None:
    inbox = await listen(connection, names["events_exchange"])
    quiet = await start_worker(events=False)
    await asyncio.sleep(2.5)  # more than one heartbeat interval
    assert inbox.empty()
    assert quiet.heartbeat.sent == 0


@pytest.fixture
async def console(worker: Worker) -> AsyncIterator[tuple[ConsoleApp, httpx.AsyncClient]]:
    """The console over the worker's settings with a token, served on a free port."""
    app = ConsoleApp(worker.settings.model_copy(update={"console_token": SecretStr(TOKEN)}))
    runner = web.AppRunner(app.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield app, client
    await runner.cleanup()


async def state_until(
    client: httpx.AsyncClient, done: Callable[[dict[str, Any]], bool], timeout: float = 15
) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while not done(state := (await client.get("/api/state")).json()):
            await asyncio.sleep(0.2)
    return state


async def test_console_lists_and_replays_dead_letters_with_the_token(
    worker: Worker,
    console: tuple[ConsoleApp, httpx.AsyncClient],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    _app, client = console
    settings: Settings = worker.settings
    secret = f"PROMPT-{uuid.uuid4().hex}"
    for key in ("x", "y"):
        await publish(
            connection,
            settings.request_queue,
            job(key, secret, fault="400"),
            message_id=key,
            reply_to=replies.name,
        )
    first = await replies.until_results(2)
    assert [orjson.loads(m.body)["error"]["code"] for m in first] == ["invalid_request"] * 2
    state = await state_until(
        client,
        lambda s: s["dead_letters"] == 2 and any(w["jobs"].get("error") == 2 for w in s["workers"]),
    )
    assert state["workers"][0]["worker"] == worker.identity
    assert state["workers"][0]["alive"] is True
    assert state["queues"][settings.dead_letter_queue] == 2
    assert state["queues"][settings.request_queue] == 0
    assert state["errors"] == {"invalid_request": 2}

    listed = (await client.get("/api/dead-letters", params={"code": "invalid_request"})).json()
    rows = sorted(listed["items"], key=lambda r: r["job_id"])
    assert [(r["job_id"], r["custom_id"], r["error_code"], r["attempts"]) for r in rows] == [
        ("x", "custom-x", "invalid_request", 1),
        ("y", "custom-y", "invalid_request", 1),
    ]
    assert (await client.get("/api/dead-letters", params={"code": "timeout"})).json()["total"] == 0
    assert (await client.get("/api/dead-letters", params={"custom_id": "-y"})).json()["total"] == 1
    for path in ("/", "/api/state", "/api/dead-letters"):
        assert secret not in (await client.get(path)).text

    refused = await client.post("/api/replay", json={"job_ids": ["x"]})
    assert refused.status_code == 401
    wrong = await client.post(
        "/api/replay", json={"job_ids": ["x"]}, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    bad = await client.post("/api/replay", json={"both": 1}, headers=auth())
    assert bad.status_code == 400
    assert (await client.get("/api/dead-letters")).json()["total"] == 2, "nothing replayed"

    one = await client.post("/api/replay", json={"job_ids": ["x"]}, headers=auth())
    assert one.json() == {"replayed": 1, "by_lane": {settings.request_queue: 1}}
    rest = await client.post("/api/replay", json={"code": "invalid_request"}, headers=auth())
    assert rest.json()["replayed"] == 1
    again = await replies.until_results(2)
    assert sorted((orjson.loads(m.body)["id"], orjson.loads(m.body)["error"]) for m in again) == [
        ("x", None),
        ("y", None),
    ]
    await state_until(client, lambda s: s["dead_letters"] == 0)


async def test_a_console_without_a_token_is_read_only(worker: Worker) -> None:
    app = ConsoleApp(worker.settings)
    runner = web.AppRunner(app.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/api/state")).json()["actions"] is False
            response = await client.post(
                "/api/replay", json={"code": "timeout"}, headers={"Authorization": "Bearer x"}
            )
            assert response.status_code == 403
    finally:
        await runner.cleanup()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def served(
    settings: Settings, connection: AbstractConnection
) -> AsyncIterator[tuple[ConsoleApp, httpx.AsyncClient]]:
    """A console over the test's settings (no worker), served on a free port; the test's
    queues and exchanges (the events exchange the console declares) deleted after."""
    app = ConsoleApp(settings)
    runner = web.AppRunner(app.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield app, client
    await runner.cleanup()


LETTERS = 10_000


async def test_item16_ten_thousand_dead_letters_are_read_once_and_the_page_stays_responsive(
    settings: Settings,
    connection: AbstractConnection,
    served: tuple[ConsoleApp, httpx.AsyncClient],
) -> None:
    """Issue 22 item 16: requests waiting for a listing share the one scan (before, each
    rescanned the queue in turn), the scan streams the queue (before, one basic.get round
    trip a letter: 10,000 took 24-30 s), and /api/state answers meanwhile."""
    app, client = served
    await declare(connection, settings)
    channel = await connection.channel(publisher_confirms=False)
    body = orjson.dumps({"custom_id": "c", "body": {"model": "m", "messages": []}})
    for n in range(LETTERS):
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                message_id=f"job-{n}",
                headers={H_ERROR_CODE: "invalid_request", H_ERROR_MESSAGE: f"bad {n}"},
            ),
            settings.dead_letter_queue,
        )
    await state_until(client, lambda s: s["dead_letters"] == LETTERS, timeout=60)

    slowest_state = 0.0

    async def poll_state(stop: asyncio.Event) -> None:
        nonlocal slowest_state
        while not stop.is_set():
            started = time.perf_counter()
            assert (await client.get("/api/state")).status_code == 200
            slowest_state = max(slowest_state, time.perf_counter() - started)
            await asyncio.sleep(0.1)

    stop = asyncio.Event()
    poller = asyncio.create_task(poll_state(stop))
    started = time.perf_counter()
    pages = await asyncio.gather(
        client.get("/api/dead-letters"),
        client.get("/api/dead-letters", params={"q": "bad 99"}),
        client.get("/api/dead-letters", params={"job_id": "job-4", "offset": 50}),
        client.get("/api/dead-letters", params={"code": "invalid_request", "limit": 500}),
    )
    elapsed = time.perf_counter() - started
    stop.set()
    await poller
    print(
        f"\n{LETTERS} dead letters listed in {elapsed:.2f}s (scan {app.broker.scan_seconds:.2f}s);"
        f" slowest /api/state meanwhile {slowest_state * 1000:.0f} ms"
    )
    listings = [page.json() for page in pages]
    assert [listing["listed"] for listing in listings] == [LETTERS] * 4
    assert listings[0]["total"] == LETTERS and not listings[0]["truncated"]
    assert listings[1]["total"] == 111  # "bad 99", "bad 990".."bad 999", "bad 9900".."bad 9999"
    assert listings[2]["total"] == 1111 and len(listings[2]["items"]) == 50
    assert len(listings[3]["items"]) == 500
    assert app.broker.scans == 1, "one scan for every request that waited for it"
    assert elapsed < 20, f"{LETTERS} dead letters took {elapsed:.1f}s"
    assert slowest_state < 1.0, "the page's state kept answering during the scan"

    # Filtering the kept listing reads nothing again.
    again = (await client.get("/api/dead-letters", params={"q": "bad 1"})).json()
    assert again["total"] == 1111 and app.broker.scans == 1
    depth = (await client.get("/api/state")).json()["queues"][settings.dead_letter_queue]
    assert depth == LETTERS, "reading took nothing away"


async def test_item27_the_page_carries_its_first_state(
    served: tuple[ConsoleApp, httpx.AsyncClient],
) -> None:
    """The page draws at once: the state of when it was served is in it, as a JSON data
    block that no value can end (a worker named to break out of it stays text)."""
    app, client = served
    hostile = "h/</script><script>alert(1)</script><!--"
    app.fleet.observe(
        {"type": "heartbeat", "worker": hostile, "ready": True, "in_flight": 2}, time.time()
    )
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script>alert(1)" not in page.text and "<!-- initial state -->" not in page.text
    start = page.text.index('<script id="initial-state" type="application/json">')
    block = page.text[start:].split(">", 1)[1].split("</script>", 1)[0]
    state = orjson.loads(block)
    assert [w["worker"] for w in state["workers"]] == [hostile]
    assert {"queues", "lanes", "dead_letters", "recent", "series"} <= set(state)
    assert "script-src 'self'" in page.headers["content-security-policy"]


async def test_item3_the_console_lists_and_replays_letters_with_bytes_headers(
    worker: Worker,
    console: tuple[ConsoleApp, httpx.AsyncClient],
    replies: Replies,
) -> None:
    """A header sent as a long string that is not UTF-8 (some clients send bytes so):
    before, the listing failed with UnicodeDecodeError for every letter of the lane."""
    _app, client = console
    settings: Settings = worker.settings
    await publish_raw(
        settings.amqp_url.get_secret_value(),
        settings.dead_letter_queue,
        orjson.dumps(job("bytes", "hello")),
        raw_headers={"x-custom-id": b"\xff\xfe", "x-error-code": b"invalid_request"},
        reply_to=replies.name,
    )
    listed = (await client.get("/api/dead-letters")).json()
    assert [(r["custom_id"], r["error_code"]) for r in listed["items"]] == [
        ("\ufffd\ufffd", "invalid_request")
    ]
    replayed = await client.post("/api/replay", json={"code": "invalid_request"}, headers=auth())
    assert replayed.json()["replayed"] == 1
    result = orjson.loads((await replies.until_results(1))[-1].body)
    assert result["error"] is None
