"""The operator page in a real headless Chromium: two workers, the console, the broker.

Everything is real: two ``chat-worker run`` processes and one ``chat-worker console``
process on the local RabbitMQ, the bundled mock upstream over loopback, Debian's Chromium
driven by Playwright (its own browser download cannot work offline, hence
``executable_path``). The page is checked as an operator sees it; the screenshot it
leaves is the README's (``docs/console.png``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from playwright.async_api import Page, async_playwright, expect
from support.broker import make_settings, publish
from support.process import free_port

from worker.mock.upstream import MockConfig, MockUpstream

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "console.png"
TOKEN = "browser-test-token-8d1e"
MODELS = ("gpt-4o-mini", "llama-3.1-8b-instruct")
FEED_SECONDS = 40.0
SECRET = f"PROMPT-SECRET-{uuid.uuid4().hex}"  # in every prompt; must never reach the page


def chromium_path() -> str:
    found = (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if not found:
        pytest.exit("no Chromium: `apt-get install -y chromium` (or set CHROMIUM)", returncode=3)
    return found


@contextlib.contextmanager
def processes(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test starts, terminated (and waited for) at the end, by their pid."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def spawn(
    started: list[subprocess.Popen[bytes]], env: dict[str, str], log: Path, *args: str
) -> None:
    with log.open("wb") as out:
        started.append(
            subprocess.Popen(
                [sys.executable, "-m", "worker", *args], env=env, stdout=out, stderr=out
            )
        )


class Results:
    """Every result of the test's reply queue, by job id."""

    def __init__(self) -> None:
        self.by_id: dict[str, list[dict[str, Any]]] = {}

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        if message.type == "chat.result":
            document = orjson.loads(message.body)
            self.by_id.setdefault(document["id"], []).append(document)

    def ok(self, job_id: str) -> bool:
        return any(r["error"] is None for r in self.by_id.get(job_id, []))


@pytest.fixture
async def fast_mock() -> AsyncIterator[MockUpstream]:
    async with MockUpstream(MockConfig(api_key="sk-test-0123456789", record=False)) as server:
        yield server


async def feed(connection: AbstractConnection, queue: str, reply_to: str, seconds: float) -> int:
    """A steady flow of jobs on two models, some slow enough to be seen in flight."""
    channel = await connection.channel()
    sent = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        for model in MODELS:
            sent += 1
            body = {
                "custom_id": f"feed-{sent}",
                "body": {
                    "model": model,
                    "mock": {"latency": 0.2 + (sent % 5) * 0.15, "key": f"feed-{sent}"},
                    "messages": [{"role": "user", "content": f"{SECRET} question {sent}"}],
                },
            }
            await channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps(body), message_id=f"feed-{sent}", reply_to=reply_to),
                queue,
            )
        await asyncio.sleep(0.25)
    await channel.close()
    return sent


async def kpi(page: Page, name: str) -> int:
    text = await page.locator(f"#k-{name}").inner_text()
    return int(re.sub(r"[^0-9]", "", text) or 0)


async def test_the_console_page_shows_the_fleet_and_replays_dead_letters(
    amqp_url: str,
    names: dict[str, str],
    fast_mock: MockUpstream,
    connection: AbstractConnection,
    tmp_path: Path,
) -> None:
    settings = make_settings(amqp_url, names, fast_mock, concurrency=8)
    env = {**os.environ, **settings.to_env(), "WORKER_LOG_FORMAT": "console"}
    env.pop("WORKER_CONSOLE_TOKEN", None)
    port = free_port()
    channel = await connection.channel()
    replies = await channel.declare_queue(exclusive=True, auto_delete=True)
    results = Results()
    await replies.consume(results.on_message, no_ack=True)

    with processes(tmp_path) as started:
        spawn(started, env, tmp_path / "worker-1.log", "run")
        spawn(started, env, tmp_path / "worker-2.log", "run")
        console_env = {**env, "WORKER_CONSOLE_TOKEN": TOKEN}
        spawn(started, console_env, tmp_path / "console.log", "console", "--port", str(port))
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            async with asyncio.timeout(20):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    await asyncio.sleep(0.2)

            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(
                    executable_path=chromium_path(), args=["--no-sandbox"]
                )
                page = await browser.new_page(viewport={"width": 1440, "height": 900})
                await page.goto(base + "/")

                # Both workers appear, alive, within a heartbeat or two.
                live = page.locator("#workers tbody tr[data-worker]:not(.silent)")
                await expect(live).to_have_count(2, timeout=15_000)
                await expect(page.locator("#mode")).to_have_text("actions on")
                await expect(page.locator("#readonly")).to_be_hidden()

                # Jobs flow; the page's job count rises while they do.
                loop = asyncio.get_running_loop()
                flow_started = loop.time()
                flow = asyncio.create_task(
                    feed(connection, settings.request_queue, replies.name, FEED_SECONDS)
                )
                await expect(page.locator("#k-jobs")).not_to_have_text(
                    re.compile("^[\u20130]$"), timeout=15_000
                )
                first = await kpi(page, "jobs")
                async with asyncio.timeout(15):
                    while await kpi(page, "jobs") <= first:
                        await asyncio.sleep(0.3)

                # Failing jobs (the mock answers 400 once) land in the dead-letter queue.
                failing = [f"fail-{i}" for i in range(1, 5)]
                for i, job_id in enumerate(failing):
                    await publish(
                        connection,
                        settings.request_queue,
                        {
                            "custom_id": f"invoice-{1040 + i}",
                            "body": {
                                "model": MODELS[i % 2],
                                "mock": {"fault": "400", "times": 1, "key": job_id},
                                "messages": [{"role": "user", "content": f"{SECRET} {job_id}"}],
                            },
                        },
                        message_id=job_id,
                        reply_to=replies.name,
                    )
                rows = page.locator("#letters tbody tr[data-job^='fail-']")
                await expect(rows).to_have_count(4, timeout=15_000)
                await expect(page.locator("#k-dlq")).to_have_text("4")
                await expect(page.locator("#errors tbody")).to_contain_text("invalid_request")
                await expect(page.locator("#letters tbody")).to_contain_text("invoice-1040")

                # The README's picture: traffic still flowing, charts filled, dead letters.
                await page.locator("#dl-filter select[name=code]").select_option("invalid_request")
                await asyncio.sleep(max(FEED_SECONDS - 6 - (loop.time() - flow_started), 0))
                await expect(page.locator("#k-inflight")).not_to_have_text("0")
                await page.screenshot(path=str(SCREENSHOT), full_page=True)

                sent = await flow
                async with asyncio.timeout(30):
                    while sum(results.ok(f"feed-{i}") for i in range(1, sent + 1)) < sent:
                        await asyncio.sleep(0.2)
                await expect(page.locator("#k-jobs")).to_have_text(str(sent + 4), timeout=10_000)

                # Nothing of a prompt reaches the page or the API.
                assert SECRET not in await page.content()
                for path in ("/api/state", "/api/dead-letters"):
                    assert SECRET not in (await client.get(path)).text

                # Without the token, a replay is refused, by the server as by the page.
                status = await page.evaluate(
                    """async () => (await fetch('/api/replay', {method: 'POST',
                        headers: {'Content-Type': 'application/json'},
                        body: JSON.stringify({code: 'invalid_request'})})).status"""
                )
                assert status == 401
                await page.locator("#letters tbody tr[data-job='fail-1'] input").check()
                await page.locator("#replay-selected").click()
                await expect(page.locator("#token-dialog")).to_be_visible()
                await page.locator("#token-input").fill("not-the-token")
                await page.locator("#token-ok").click()
                await expect(page.locator("#notice")).to_contain_text("refused")
                await expect(rows).to_have_count(4)

                # With the token: one selected, then all of the code (no second prompt).
                await page.locator("#replay-selected").click()
                await expect(page.locator("#token-dialog")).to_be_visible()
                await page.locator("#token-input").fill(TOKEN)
                await page.locator("#token-ok").click()
                await expect(page.locator("#notice")).to_contain_text("Replayed 1 dead letter")
                await expect(rows).to_have_count(3, timeout=10_000)
                await page.locator("#replay-code").click()
                await expect(page.locator("#notice")).to_contain_text("Replayed 3 dead letters")
                await expect(page.locator("#token-dialog")).to_be_hidden()
                await expect(page.locator("#k-dlq")).to_have_text("0", timeout=10_000)
                await expect(page.locator("#letters tbody")).to_contain_text("No dead letters")
                async with asyncio.timeout(15):
                    while not all(results.ok(job_id) for job_id in failing):
                        await asyncio.sleep(0.1)
                await browser.close()

        log = (tmp_path / "console.log").read_text()
        assert "console action" in log and "replay" in log
        assert TOKEN not in log

    for process in started:
        assert process.returncode == 0, f"{process.args} exited {process.returncode}"
