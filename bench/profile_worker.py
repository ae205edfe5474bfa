"""Profile ``chat-worker run`` under S1 (or S3) with py-spy, and summarise where CPU goes.

``--target raw`` profiles the raw loop instead, to tell the worker's own costs from those
every AMQP + HTTP loop pays (socket writes, frame parsing).

py-spy attaches to the running worker once it consumes and samples it (``--nonblocking``:
the worker is not paused) until the last result; idle time in the event loop's poll is not
sampled, so the shares are shares of the worker's busy CPU. Writes
``bench/results/profile-<scenario>-<time>.speedscope.json`` (open it at speedscope.app) and
prints the top functions by own time, by inclusive time, and the own time by package.

Needs py-spy (``pip install py-spy``) and ptrace rights over the worker.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from baseline_raw import raw_loop
from common import REDIS_URL, RESULTS, MockArgs, Proc, chat_worker, clean_env, redis_keys, run_main
from measure import Setup, measure, progress

# Own time is charged to the first of these path markers found in a frame's file.
PACKAGES = (
    ("worker/", "worker (this project)"),
    ("aio_pika/", "aio-pika"),
    ("aiormq/", "aiormq"),
    ("pamqp/", "pamqp"),
    ("httpx_aiohttp/", "httpx-aiohttp"),
    ("httpx_sse/", "httpx-sse"),
    ("httpx/", "httpx"),
    ("httpcore/", "httpcore"),
    ("aiohttp/", "aiohttp"),
    ("multidict/", "multidict/yarl"),
    ("yarl/", "multidict/yarl"),
    ("pydantic_core/", "pydantic"),
    ("pydantic/", "pydantic"),
    ("structlog/", "structlog"),
    ("logging/", "logging (stdlib)"),
    ("asyncio/", "asyncio (stdlib)"),
    ("uvloop/", "uvloop"),
    ("orjson", "orjson"),
    ("redis/", "redis-py"),
)


def package_of(path: str) -> str:
    for marker, name in PACKAGES:
        if marker in path:
            return name
    return "other" if "site-packages" in path else f"stdlib/other ({Path(path).name})"


def summarise(path: Path, top: int) -> str:
    """Where the busy CPU of a speedscope profile goes: by package (own time), by event-loop
    task (the coroutine under ``Runner.run``), and by function (inclusive and own)."""
    document = orjson.loads(path.read_bytes())
    frames: list[dict[str, Any]] = document["shared"]["frames"]
    names = [_function(frame) for frame in frames]
    packages: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    task_parts: dict[str, Counter[str]] = {}
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0.0
    for profile in document["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack:
                continue
            total += weight
            leaf = frames[stack[-1]]
            own[f"{names[stack[-1]]}:{leaf.get('line')}"] += weight
            packages[package_of(leaf.get("file") or "")] += weight
            chain = [names[i] for i in stack]
            for name in set(chain):
                inclusive[name] += weight
            task, part = _task_of(chain)
            tasks[task] += weight
            task_parts.setdefault(task, Counter())[part] += weight
    if not total:
        return "no samples"

    def pct(weight: float) -> str:
        return f"{100 * weight / total:5.1f}%"

    lines = [f"{total:.1f} s of samples"]
    lines.append("\nown time by package:")
    lines += [f"  {pct(w)}  {name}" for name, w in packages.most_common() if w / total >= 0.005]
    lines.append("\nby event-loop task (the coroutine or callback the loop was running):")
    for task, weight in tasks.most_common(12):
        lines.append(f"  {pct(weight)}  {task}")
        for part, w in task_parts[task].most_common(4):
            if w / total >= 0.005 and part != task:
                lines.append(f"      {pct(w)}  {part}")
    lines.append(f"\ntop {top} functions by inclusive time:")
    lines += [f"  {pct(w)}  {name}" for name, w in inclusive.most_common(top)]
    lines.append(f"\ntop {top} lines by own time:")
    lines += [f"  {pct(w)}  {name}" for name, w in own.most_common(top)]
    return "\n".join(lines)


def _function(frame: dict[str, Any]) -> str:
    where = "/".join(Path(frame.get("file") or "?").parts[-2:])
    return f"{frame['name']} ({where})"


def _task_of(chain: list[str]) -> tuple[str, str]:
    """The frame under the event loop's ``run`` (the task) and the one under it."""
    for index, name in enumerate(chain):
        if name.startswith("Runner.run "):
            task = chain[index + 1] if index + 1 < len(chain) else "(the loop itself)"
            part = chain[index + 2] if index + 2 < len(chain) else "(own)"
            return task, part
    # Not under the loop's run frame: py-spy caught a coroutine stack on its own.
    return f"{chain[0]} (stack seen without the loop)", chain[1] if len(chain) > 1 else "(own)"


def attach_py_spy(output: Path, rate: int) -> Callable[[list[Proc]], Callable[[], None]]:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"

    def start(workers: list[Proc]) -> Callable[[], None]:
        argv = [
            py_spy,
            "record",
            "--pid",
            str(workers[0].pid),
            "--format",
            "speedscope",
            "--output",
            str(output),
            "--rate",
            str(rate),
            "--nonblocking",
        ]
        spy = Proc("py-spy", argv, workers[0].log.parent, env=clean_env())

        def stop() -> None:
            spy.stop(signal.SIGINT, wait=30)

        return stop

    return start


async def main(args: argparse.Namespace) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = RESULTS / f"profile-{args.target}-{args.scenario}-{stamp}.speedscope.json"
    # With the store (``--store``), job ids of the run's own: ids stored by an earlier run
    # would be answered from the store.
    if args.scenario == "s1":
        setup = Setup("profile-s1", args.jobs, timeout=args.timeout, unique_ids=args.store)
    else:
        mock = MockArgs(chunks=args.chunks, chunk_interval=0.01)
        setup = Setup(
            "profile-s3", args.jobs, mock, stream=True, reply_to=True, unique_ids=args.store
        )
    spawn = raw_loop(concurrency=args.concurrency) if args.target == "raw" else None
    env = {"WORKER_REDIS_URL": REDIS_URL, "WORKER_RESULT_TTL": "86400"} if args.store else {}
    run, _, _ = await measure(
        setup,
        spawn or chat_worker(args.concurrency, **env),
        on_started=attach_py_spy(output, args.rate),
    )
    progress(run)
    if args.store:
        await redis_keys(f"cw:*:{{{run.prefix}-j*}}", delete=True)
    print(summarise(output, args.top))
    print(f"\n{output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("s1", "s3"), default="s1")
    parser.add_argument(
        "--target", choices=("worker", "raw"), default="worker", help="raw: the raw_loop.py"
    )
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--chunks", type=int, default=200, help="S3: chunks per answer")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--store", action="store_true", help="the worker with the result store on (Redis)"
    )
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--summarise", type=Path, help="only summarise this speedscope file (no run)"
    )
    arguments = parser.parse_args()
    if arguments.target == "raw" and arguments.scenario != "s1":
        parser.error("the raw loop neither streams nor replies to reply_to: --scenario s1")
    if arguments.summarise:
        print(summarise(arguments.summarise, arguments.top))
    else:
        run_main(main(arguments))
