"""Failover: the node leading the request queue killed with ``kill -9`` and restarted,
twice, under load; every job ends with one or more results, none lost (contract §13)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import pytest
from support.cluster import (
    Producer,
    Readiness,
    Results,
    WorkerProcess,
    background,
    in_thread,
    longest_gap,
    settled_times,
    wait_for,
    wait_ready,
)

from .harness import Cluster

JOBS = int(os.environ.get("CW_CLUSTER_JOBS", "3000"))
KILLS = 2


@pytest.mark.timeout(900)
async def test_killing_the_request_queue_leader_twice_loses_no_job(
    cluster: Cluster, start_worker: Callable[..., WorkerProcess], queues: dict[str, str]
) -> None:
    request_queue = queues["WORKER_REQUEST_QUEUE"]
    workers = [start_worker(), start_worker()]
    for worker in workers:
        await wait_ready(worker)
    results = Results(cluster.urls, queues["WORKER_RESULT_QUEUE"])
    producer = Producer(cluster.urls, request_queue, results)
    readiness = Readiness(workers)
    started = time.monotonic()
    started_wall = time.time()
    killed: list[str] = []
    async with (
        background(results.run()),
        background(readiness.run()),
        background(producer.publish(JOBS)) as publishing,
    ):
        for _ in range(KILLS):
            # Kill under load: wait for a share of the jobs to be done first.
            done = results.finished(producer.confirmed)
            await wait_for(
                lambda d=done: results.finished(producer.confirmed) >= d + 200,
                120,
                "jobs to progress before a kill",
            )
            leader = await in_thread(cluster.leader_of, request_queue)
            await in_thread(cluster.kill, leader)
            killed.append(leader.name)
            await asyncio.sleep(5)  # a little while down: elections, reconnections
            await in_thread(cluster.restart, leader)
            await wait_for(lambda: len(cluster.alive()) == 3, 60, "all three nodes running again")
        await asyncio.wait_for(publishing, 600)
        await wait_for(
            lambda: results.finished(producer.confirmed) == len(producer.confirmed),
            300,
            "a result for every job",
        )
    ended = time.monotonic()
    settled = settled_times(workers)
    lost = len(producer.confirmed) - results.finished(producer.confirmed)
    exits = [worker.exited() for worker in workers]
    summary = {
        "jobs": len(producer.confirmed),
        "kills": killed,
        "lost": lost,
        "duplicated": results.duplicates(),
        "errors": dict(results.errors),
        "republished_by_producer": producer.republished,
        "longest_without_a_job_settled_s": round(
            longest_gap(settled, started_wall, settled[-1]), 1
        ),
        "longest_without_a_result_at_the_collector_s": round(
            longest_gap(results.arrivals, started, ended), 1
        ),
        "longest_worker_unready_s": round(readiness.longest_unready(), 1),
        "seconds": round(ended - started, 1),
        "worker_exits": exits,
    }
    print(f"\nfailover: {summary}")
    assert len(killed) == KILLS
    assert len(producer.confirmed) >= JOBS
    assert lost == 0
    assert not results.errors, "every job succeeds: a node's death is no job's failure"
    assert exits == [None, None], "no worker exits"
