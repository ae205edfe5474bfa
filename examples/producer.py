"""Ask the workers one question, then stream a second answer: ``python examples/producer.py``."""

import asyncio

from worker import ChatClient, JobDelta, StreamText


async def main() -> None:
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
    async with ChatClient.connect() as client:  # WORKER_AMQP_URL, WORKER_REQUEST_QUEUE
        result = await client.complete(ask, custom_id="hello", timeout=60)
        print(result.response.body["choices"][0]["message"]["content"], result.usage)
        text = StreamText()  # restarts when a retried attempt starts over
        async for item in client.stream(ask, timeout=60):
            if isinstance(item, JobDelta):
                text.add(item)
                print(item.attempt, text.content(), flush=True)


asyncio.run(main())
