"""The raw limit: consume → POST → publish (confirmed) → ack, and nothing else.

No validation, telemetry or logging: the fastest this machine runs the job with aio-pika and
an HTTP client. ``--client`` picks the HTTP client (``transports.py`` compares them):

- ``aiohttp``: a bare ``aiohttp.ClientSession`` (the raw limit);
- ``httpx``: ``httpx.AsyncClient`` with its default transport (httpcore);
- ``httpx-aiohttp``: ``httpx.AsyncClient`` over ``httpx_aiohttp.AiohttpTransport``;
- ``httpx-aiohttp-direct``: ``httpx.Request`` handed straight to ``AiohttpTransport``, no
  ``AsyncClient`` (what ``worker.upstream.client.Upstream`` does).

Every client gets a pool of ``--concurrency`` kept-alive connections.

``--mode`` picks the job:

- ``plain`` (default): the S1 loop above;
- ``stream``: the S3 raw baseline: POST the job streamed with bare aiohttp, read the SSE
  lines, parse each chunk with orjson, publish a delta message (aiormq, confirmed) to
  ``reply_to`` for the first content at once and then one every ``--chunks-per-delta``
  content chunks (the S3 scenario passes the worker's own ratio, so both publish as many
  deltas), then the result, then ack;
- ``echo``: the bare broker loop of the added-latency scenario: no HTTP at all, the reply
  is a fixed document published to ``reply_to`` (confirmed), then ack.

Run by the benchmarks as its own process; SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import aiohttp
import aiormq
import httpx
import orjson
import uvloop
from aio_pika.abc import AbstractIncomingMessage
from pamqp.commands import Basic

Post = Callable[[bytes], Awaitable[bytes]]
HEADERS = {"content-type": "application/json"}
CLIENTS = ("aiohttp", "httpx", "httpx-aiohttp", "httpx-aiohttp-direct")


async def http_client(kind: str, url: str, pool: int, stack: AsyncExitStack) -> Post:
    if kind == "aiohttp":
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=pool))
        )

        async def post_aiohttp(body: bytes) -> bytes:
            async with session.post(url, data=body, headers=HEADERS) as response:
                return await response.read()

        return post_aiohttp
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    if kind == "httpx-aiohttp-direct":
        from httpx_aiohttp import AiohttpTransport

        direct = AiohttpTransport(limits=limits)
        stack.push_async_callback(direct.aclose)
        target = httpx.URL(url)

        async def post_direct(body: bytes) -> bytes:
            request = httpx.Request("POST", target, headers=HEADERS, content=body)
            response = await direct.handle_async_request(request)
            try:
                return await response.aread()
            finally:
                await response.aclose()

        return post_direct
    if kind == "httpx":
        transport: httpx.AsyncBaseTransport = httpx.AsyncHTTPTransport(limits=limits)
    elif kind == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport(limits=limits)
    else:
        raise ValueError(f"unknown client {kind!r}")
    client = await stack.enter_async_context(
        httpx.AsyncClient(transport=transport, headers=HEADERS, timeout=None)
    )

    async def post_httpx(body: bytes) -> bytes:
        response = await client.post(url, content=body)
        return response.content

    return post_httpx


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        post = await http_client(
            args.client, f"{args.upstream}/chat/completions", args.concurrency, stack
        )
        connection = await stack.enter_async_context(await aio_pika.connect(args.amqp))
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=args.concurrency)
        results = await channel.get_exchange(args.exchange, ensure=False)
        queue = await channel.get_queue(args.queue, ensure=False)
        underlay = await channel.get_underlay_channel()
        if args.mode == "stream":
            session = await stack.enter_async_context(
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))
            )
            handler = stream_handler(
                session, f"{args.upstream}/chat/completions", underlay, args.chunks_per_delta
            )
            await queue.consume(handler)
            await stop.wait()
            return
        if args.mode == "echo":
            await queue.consume(echo_handler(underlay))
            await stop.wait()
            return

        async def on_message(message: AbstractIncomingMessage) -> None:
            answer = await post(orjson.dumps(orjson.loads(message.body)["body"]))
            await results.publish(
                aio_pika.Message(
                    answer,
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                "result.ok",
            )
            await message.ack()

        await queue.consume(on_message)
        await stop.wait()


def _properties(message: AbstractIncomingMessage, kind: str) -> Basic.Properties:
    return Basic.Properties(
        content_type="application/json",
        message_type=kind,
        correlation_id=message.correlation_id,
        delivery_mode=1 if kind == "chat.delta" else 2,
    )


def echo_handler(channel: aiormq.abc.AbstractChannel) -> Callable[[AbstractIncomingMessage], Any]:
    answer = orjson.dumps({"type": "result", "error": None})

    async def on_message(message: AbstractIncomingMessage) -> None:
        await channel.basic_publish(
            answer,
            routing_key=message.reply_to or "",
            properties=_properties(message, "chat.result"),
        )
        await message.ack()

    return on_message


def stream_handler(
    session: aiohttp.ClientSession,
    url: str,
    channel: aiormq.abc.AbstractChannel,
    every: int,
) -> Callable[[AbstractIncomingMessage], Any]:
    async def on_message(message: AbstractIncomingMessage) -> None:
        body = orjson.loads(message.body)["body"]
        body["stream_options"] = {"include_usage": True}
        reply = message.reply_to or ""
        seq, pending = 0, []
        delta_properties = _properties(message, "chat.delta")

        async def publish_delta() -> None:
            nonlocal seq, pending
            text = "".join(pending)
            pending = []
            delta = {
                "type": "delta",
                "seq": seq,
                "choices": [{"index": 0, "delta": {"content": text}}],
            }
            seq += 1
            await channel.basic_publish(
                orjson.dumps(delta), routing_key=reply, properties=delta_properties
            )

        usage = None
        async with session.post(url, data=orjson.dumps(body), headers=HEADERS) as response:
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = orjson.loads(data)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    if content := (choice.get("delta") or {}).get("content"):
                        pending.append(content)
                if pending and (seq == 0 or len(pending) >= every):
                    await publish_delta()
        if pending:
            await publish_delta()
        await channel.basic_publish(
            orjson.dumps({"type": "result", "usage": usage}),
            routing_key=reply,
            properties=_properties(message, "chat.result"),
        )
        await message.ack()

    return on_message


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--upstream", required=True, help="base URL, ending in /v1")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--client", default="aiohttp", choices=CLIENTS)
    parser.add_argument("--mode", default="plain", choices=("plain", "stream", "echo"))
    parser.add_argument("--chunks-per-delta", type=int, default=5, help="stream mode")
    uvloop.run(main(parser.parse_args()))
