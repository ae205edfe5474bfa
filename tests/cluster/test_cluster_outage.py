"""Outage: one node of three killed and kept down for two minutes under load (contract §13).

The workers keep consuming the whole time (results per 10 s stay above half of before),
none exits, a rolling restart during the outage works (a worker stopped, a new one
started while the node is down), deferred jobs come back from their quorum delay queue
after their wait, and a worker whose classic delay queues live on the dead node consumes
anyway and says it is degraded.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import aio_pika
import pytest
from support.cluster import (
    Producer,
    Readiness,
    Results,
    WorkerProcess,
    background,
    in_thread,
    longest_gap,
    per_window,
    settled_times,
    wait_for,
    wait_ready,
)

from worker.amqp.topology import DELAY_TIERS, delay_queue_name

from .harness import Cluster

OUTAGE = float(os.environ.get("CW_CLUSTER_OUTAGE", "120"))
BASELINE = 30.0
WINDOW = 10.0
RETRY_AFTER = 30  # the mock's Retry-After for deferred jobs: the 30 s delay tier
DEFER_EVERY = 40
RESULTS_WAIT = 420.0  # after the outage: room for a late dead-letter worker


async def declare_legacy_classic_delay_queues(url: str, request_queue: str) -> list[str]:
    """Classic delay queues as a deployment from before §13 has them, homed on ``url``'s
    node (a classic queue lives on the node of the connection that declared it)."""
    names = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for seconds in DELAY_TIERS:
            name = delay_queue_name(request_queue, seconds, "classic")
            await channel.declare_queue(
                name,
                durable=True,
                arguments={
                    "x-queue-type": "classic",
                    "x-message-ttl": seconds * 1000,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": request_queue,
                },
            )
            names.append(name)
    return names


@pytest.mark.timeout(900)
async def test_two_minutes_without_a_node_keep_consuming(
    cluster: Cluster, start_worker: Callable[..., WorkerProcess], queues: dict[str, str]
) -> None:
    request_queue = queues["WORKER_REQUEST_QUEUE"]
    workers = [start_worker(), start_worker()]
    for worker in workers:
        await wait_ready(worker)
    victim = await in_thread(cluster.leader_of, request_queue)
    delay_30 = delay_queue_name(request_queue, RETRY_AFTER, "quorum")
    delay_leader = (await in_thread(cluster.leader_of, delay_30)).name
    legacy_queue = f"{request_queue}-legacy"
    legacy_delays = await declare_legacy_classic_delay_queues(victim.url, legacy_queue)

    results = Results(cluster.urls, queues["WORKER_RESULT_QUEUE"])
    producer = Producer(cluster.urls, request_queue, results, window=150)
    readiness = Readiness(list(workers))
    stop = asyncio.Event()
    defer_mock = {"fault": "503", "times": 1, "retry_after": RETRY_AFTER}
    async with (
        background(results.run()),
        background(readiness.run()),
        background(
            producer.publish(None, stop, defer_every=DEFER_EVERY, defer_mock=defer_mock)
        ) as publishing,
    ):
        await asyncio.sleep(10)  # warm up
        baseline_from = time.time()
        await asyncio.sleep(BASELINE)
        killed_at = time.time()
        await in_thread(cluster.kill, victim)
        deferred_before = set(producer.deferred)

        # A rolling restart while the node is down: a new worker starts and consumes, then
        # an old one stops (as a Deployment with maxSurge does it).
        await asyncio.sleep(20)
        workers.append(start_worker())
        await wait_ready(workers[2])
        readiness.workers.append(workers[2])
        readiness.retire(workers[1])
        workers[1].stop()
        rolled_exit = workers[1].exited()

        # A worker with classic delay queues homed on the dead node consumes anyway.
        legacy = start_worker(
            WORKER_QUEUE_TYPE="classic",
            WORKER_REQUEST_QUEUE=legacy_queue,
            WORKER_RESULT_QUEUE=f"{legacy_queue}.results",
            WORKER_RESULT_EXCHANGE=f"{legacy_queue}.results",
            WORKER_DEAD_LETTER_QUEUE=f"{legacy_queue}.dlq",
        )
        legacy_ready = await wait_ready(legacy, timeout=90)
        legacy.stop()

        await asyncio.sleep(max(0.0, killed_at + OUTAGE - time.time()))
        restored_at = time.time()
        restart_took = await in_thread(cluster.restart, victim)
        await asyncio.sleep(10)
        stop.set()
        await asyncio.wait_for(publishing, 60)
        await wait_for(
            lambda: results.finished(producer.confirmed) == len(producer.confirmed),
            RESULTS_WAIT,
            "a result for every job",
        )
    ended = time.time()
    # Consumption as the workers saw it: each job settled (result or deferral), from logs.
    settled = settled_times(workers)

    baseline = per_window(settled, baseline_from, killed_at, WINDOW)
    outage = per_window(settled, killed_at, restored_at, WINDOW)
    before = sum(baseline) / len(baseline)
    deferred_out = producer.deferred - deferred_before
    # Jobs a worker did send round the delay queue (a job whose 503 came just before its
    # worker's connection died is redelivered instead, and served at once).
    went_round = set().union(*(worker.deferred_jobs() for worker in workers))
    waited = [
        min(results.arrived[job]) - producer.confirmed[job]
        for job in went_round
        if job in results.arrived
    ]
    lost = len(producer.confirmed) - results.finished(producer.confirmed)
    summary = {
        "killed": victim.name,
        "leader_of_30s_delay_queue": delay_leader,
        "down_s": round(restored_at - killed_at, 1),
        "restart_s": round(restart_took, 1),
        "jobs": len(producer.confirmed),
        "deferred": len(producer.deferred),
        "deferred_published_during_outage": len(deferred_out),
        "went_round_delay_queue": len(went_round),
        "went_round_while_down": len(went_round & deferred_out),
        "deferred_wait_s_min_max": [round(min(waited), 1), round(max(waited), 1)],
        "lost": lost,
        "duplicated": results.duplicates(),
        "settled_per_s_before": round(before, 1),
        "settled_per_s_by_10s_during_outage": [round(r, 1) for r in outage],
        "longest_without_a_job_settled_s": round(
            longest_gap(settled, baseline_from, restored_at), 1
        ),
        "longest_worker_unready_s": round(readiness.longest_unready(), 1),
        "legacy_worker_readyz": legacy_ready,
        "seconds": round(ended - baseline_from, 1),
    }
    print(f"\noutage: {summary}")
    assert lost == 0
    assert not results.errors
    assert rolled_exit == 0, "the worker stopped during the outage drained and exited 0"
    assert workers[0].exited() is None and workers[2].exited() is None, "no worker exits"
    assert len(outage) >= int(OUTAGE // WINDOW) - 1
    assert min(outage) > before / 2, "throughput stays above half of before"
    assert went_round & deferred_out, "jobs went round the delay queue while a node was down"
    assert went_round <= producer.deferred
    assert len(waited) == len(went_round), "every deferred job came back"
    assert min(waited) >= RETRY_AFTER - 1, "a deferred job waits its Retry-After"
    # Usually back within 45 s; on 3.10.8, after the delay queue's leader node died, a few
    # came back minutes late in one run of four (RabbitMQ's at-least-once dead-letter
    # worker; none lost). The bound below is the wait for results itself.
    assert max(waited) < RESULTS_WAIT + OUTAGE, "and comes back"
    assert legacy_ready["status"] == "degraded"
    assert set(legacy_ready["unavailable"]) == set(legacy_delays)
    assert legacy.exited() == 0
