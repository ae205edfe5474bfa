"""Break a worker's broker connection from outside, as an operator or a failing node would."""

from __future__ import annotations

import re
import subprocess

__all__ = ["close_connections_of", "connections_of"]


def connections_of(pid: int) -> list[str]:
    """Broker-side pids of the connections a worker process opened (by connection name)."""
    listing = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "-q", "--no-table-headers"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    pattern = re.compile(rf"chat-worker [^\"]*/{pid}\"")
    return [line.split("\t", 1)[0] for line in listing.splitlines() if pattern.search(line)]


def close_connections_of(pid: int, reason: str = "test: connection cut") -> int:
    """``rabbitmqctl close_connection`` for each of them; how many were closed."""
    pids = connections_of(pid)
    for connection in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", connection, reason],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return len(pids)
