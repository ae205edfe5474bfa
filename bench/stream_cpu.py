"""CPU of the worker's own stream path per chunk, without network or broker: the bytes of
a 200-chunk answer (as the mock sends them, one event a read) through ``ChunkStream`` (the
event-stream parser, orjson), ``CompletionAssembler.add`` and a delta every 5 chunks.

``python bench/stream_cpu.py`` prints µs per chunk beside orjson's parse alone, the floor
of any path that reads JSON chunks. Quick to run, steady on a busy machine: the number to
watch when the hot path changes.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson

from worker.stream.assemble import CompletionAssembler
from worker.upstream.chunks import ChunkStream


def answer(chunks: int = 200) -> list[bytes]:
    """One event per read, as a streaming server's writes arrive."""
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_732_500_000,
        "model": "bench-model",
        "system_fingerprint": "fp_bench",
        "usage": None,
    }

    def event(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    usage = {"prompt_tokens": 9, "completion_tokens": chunks, "total_tokens": chunks + 9}
    return [
        event({"role": "assistant", "content": ""}),
        *(event({"content": f"word{i} "}) for i in range(chunks)),
        event({}, "stop"),
        b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n",
        b"data: [DONE]\n\n",
    ]


async def worker_path(events: list[bytes], rounds: int) -> float:
    started = time.process_time()
    for _ in range(rounds):
        reads = iter(events)

        async def read(reads: object = reads) -> bytes:
            return next(reads, b"")  # type: ignore[call-overload]

        stream = ChunkStream(read, 200, {})
        assembler = CompletionAssembler()
        output = 0
        while (batch := await stream.read()) is not None:
            for chunk in batch:
                if assembler.add(chunk):
                    output += 1
                    if output % 5 == 0:
                        assembler.take_delta()
        assembler.take_delta()
        assembler.completion()
    return (time.process_time() - started) / rounds / (len(events) - 1)


def orjson_alone(events: list[bytes], rounds: int) -> float:
    payloads = [e[6:-2] for e in events if e.startswith(b"data: {")]
    started = time.process_time()
    for _ in range(rounds):
        for payload in payloads:
            orjson.loads(payload)
    return (time.process_time() - started) / rounds / len(payloads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()
    events = answer()
    asyncio.run(worker_path(events, 20))  # warm up
    path = asyncio.run(worker_path(events, args.rounds))
    floor = orjson_alone(events, args.rounds)
    print(f"worker stream path: {path * 1e6:.2f} us per chunk")
    print(f"orjson.loads alone: {floor * 1e6:.2f} us per chunk")


if __name__ == "__main__":
    main()
