"""Fixtures of the cluster tests: a real three-node cluster, the mock upstream and real
worker processes, a producer and a result collector that ride through node kills.

The cluster is session-scoped (it takes a minute to form); each test has its own queues.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.cluster import MOCK_LATENCY, WorkerProcess
from support.process import free_port

from .harness import Cluster, port_free, running_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with running_cluster() as running:
        yield running
    print("\n".join(["", "cluster log:", *running.log]))


@pytest.fixture(scope="session")
def mock_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``chat-worker mock-upstream`` in its own process: one for all workers, so a job's
    fault (``times`` per ``key``) is counted once whichever worker calls."""
    port = free_port()
    log = (tmp_path_factory.mktemp("mock") / "mock.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "mock-upstream",
            "--port",
            str(port),
            "--latency",
            str(MOCK_LATENCY),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while port_free(port):
        assert process.poll() is None, "mock upstream exited"
        assert time.monotonic() < deadline, "mock upstream did not listen"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/v1"
    process.terminate()
    process.wait(timeout=10)
    log.close()


@pytest.fixture
def queues() -> dict[str, str]:
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    return {
        "WORKER_REQUEST_QUEUE": f"{prefix}.requests",
        "WORKER_RESULT_EXCHANGE": f"{prefix}.results",
        "WORKER_RESULT_QUEUE": f"{prefix}.results",
        "WORKER_DEAD_LETTER_QUEUE": f"{prefix}.dlq",
    }


@pytest.fixture
def start_worker(
    cluster: Cluster, mock_url: str, queues: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(**env: str) -> WorkerProcess:
        worker = WorkerProcess(
            {
                "WORKER_AMQP_URL": ",".join(cluster.urls),
                "WORKER_UPSTREAM_BASE_URL": mock_url,
                "WORKER_QUEUE_TYPE": "quorum",
                **queues,
                **env,
            },
            tmp_path / f"worker-{len(started) + 1}.log",
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
