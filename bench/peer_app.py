"""The peer: the worker a user would write instead, with FastStream and httpx (its default
transport). ``python peer_app.py`` (what ``faststream run peer_app:app`` does, which needs
the ``faststream[cli]`` extra); configured by PEER_* variables."""

import os
from typing import Any

import httpx
from faststream import FastStream
from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage

concurrency = int(os.environ.get("PEER_CONCURRENCY", "64"))
broker = RabbitBroker(os.environ["PEER_AMQP_URL"], default_channel=Channel(concurrency))
app = FastStream(broker)
limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
http = httpx.AsyncClient(base_url=os.environ["PEER_UPSTREAM"], limits=limits, timeout=600)
results = broker.publisher(
    exchange=RabbitExchange(os.environ["PEER_EXCHANGE"], ExchangeType.TOPIC, declare=False),
    routing_key="result.ok",
    persist=True,
)


@broker.subscriber(RabbitQueue(os.environ["PEER_QUEUE"], declare=False))
async def handle(job: dict[str, Any], message: RabbitMessage) -> None:
    response = await http.post("/chat/completions", json=job["body"])
    await results.publish(response.json(), correlation_id=message.correlation_id)


@app.after_shutdown
async def close_http() -> None:
    await http.aclose()


if __name__ == "__main__":
    import uvloop  # as `faststream run` does when uvloop is installed

    uvloop.run(app.run())
