"""A real three-node RabbitMQ cluster on this machine, for the cluster tests.

Three extra ``rabbitmq-server`` nodes (``cw1@localhost`` … on ports 5681-5683 by default),
run as the ``rabbitmq`` user so they share its Erlang cookie, each with its own node name,
ports, data, logs, pid file, configuration and (empty) plugin list, so the machine's own
node on 5672 is never touched. ``kill`` is ``kill -9`` of one node's Erlang VM; ``restart``
boots it again on its data, and it rejoins the cluster by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Cluster", "Node", "port_free", "running_cluster"]

RABBITMQ_USER = "rabbitmq"
RABBITMQ_HOME = "/var/lib/rabbitmq"  # holds the .erlang.cookie all nodes share
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # not the sbin wrapper: it resets the env
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
QUEUES = "/usr/lib/rabbitmq/bin/rabbitmq-queues"
BASE_PORT = int(os.environ.get("CW_CLUSTER_BASE_PORT", "5680"))
DIST_OFFSET = 20000
# A node boots in 10-20 s on a busy two-core machine; a restart after kill -9 can take
# longer while it waits for its peers' tables. Generous, but bounded.
BOOT_TIMEOUT = 180
CTL_TIMEOUT = 120


@dataclass
class Node:
    index: int
    base: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"cw{self.index}@localhost"

    @property
    def port(self) -> int:
        return BASE_PORT + self.index

    @property
    def dist_port(self) -> int:
        return self.port + DIST_OFFSET

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def home(self) -> Path:
        return self.base / f"cw{self.index}"

    def env(self) -> dict[str, str]:
        home = self.home
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": RABBITMQ_HOME,
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_PID_FILE": str(home / "pid"),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(home / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def prepare(self) -> None:
        home = self.home
        (home / "log").mkdir(parents=True, exist_ok=True)
        (home / "mnesia").mkdir(parents=True, exist_ok=True)
        # The machine's /etc/rabbitmq/rabbitmq.conf pins the listener to 5672: a file of our own.
        (home / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "log.file.level = info\n"
        )
        (home / "enabled_plugins").write_text("[].\n")
        (home / "rabbitmq-env.conf").write_text(
            "# this node's settings come from the environment\n"
        )

    def pid(self) -> int | None:
        try:
            return int((self.home / "pid").read_text().strip())
        except (OSError, ValueError):
            return None


def _as_rabbitmq(argv: list[str]) -> list[str]:
    """``argv`` as the rabbitmq user. Run it from a directory that user can read (the
    cluster's own): Erlang reads its boot file relative to the working directory, and a
    checkout in a private directory (``mktemp -d`` is mode 700) makes it fail with
    ``eacces`` before anything else."""
    return ["runuser", "-u", RABBITMQ_USER, "--", *argv]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Cluster:
    """Three nodes joined into one cluster; see the module docstring."""

    def __init__(self, size: int = 3) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="cw-cluster-"))
        shutil.chown(self.base, RABBITMQ_USER, RABBITMQ_USER)
        self.nodes = [Node(i, self.base) for i in range(1, size + 1)]
        self.log: list[str] = []

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def _say(self, line: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {line}")

    def ctl(self, node: Node, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """``rabbitmqctl -n <node> args…`` as the rabbitmq user; its stdout."""
        done = subprocess.run(
            _as_rabbitmq([CTL, "-n", node.name, *args]),
            env=node.env(),
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {node.name}: {done.stderr[-800:]}")
        return done.stdout

    def _spawn(self, node: Node) -> None:
        with contextlib.suppress(FileNotFoundError):
            (node.home / "pid").unlink()
        out = (node.home / "log" / "stdout.log").open("ab")
        node.process = subprocess.Popen(
            _as_rabbitmq([SERVER]),
            env=node.env(),
            cwd=self.base,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

    def _await(self, node: Node) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            assert node.process is not None
            if node.process.poll() is not None:
                raise RuntimeError(f"{node.name} exited while booting; see {node.home}/log")
            try:
                self.ctl(node, "await_startup", "--timeout", "20", timeout=40)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name} did not boot in {BOOT_TIMEOUT}s") from None
                time.sleep(1)

    def start(self) -> None:
        for node in self.nodes:
            for port in (node.port, node.dist_port):
                if not port_free(port):
                    raise RuntimeError(f"port {port} is taken: another cluster test running?")
        started = time.monotonic()
        for node in self.nodes:
            node.prepare()
        subprocess.run(["chown", "-R", f"{RABBITMQ_USER}:{RABBITMQ_USER}", str(self.base)])
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            self._await(node)
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", seed.name)
            self.ctl(node, "start_app")
        running = self.running_nodes()
        if sorted(running) != sorted(n.name for n in self.nodes):
            raise RuntimeError(f"cluster did not form: running {running}")
        self._say(f"cluster of {len(self.nodes)} up in {time.monotonic() - started:.1f}s")

    def running_nodes(self, via: Node | None = None) -> list[str]:
        out = self.ctl(via or self.nodes[0], "cluster_status", "--formatter", "json")
        return list(json.loads(out)["running_nodes"])

    def kill(self, node: Node) -> None:
        """``kill -9`` the node's Erlang VM (and the wrapper processes around it)."""
        pid = node.pid()
        if pid is None:
            raise RuntimeError(f"{node.name} wrote no pid file")
        os.kill(pid, signal.SIGKILL)
        if node.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(timeout=30)
            node.process = None
        deadline = time.monotonic() + 30
        while not port_free(node.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        self._say(f"killed {node.name} (kill -9 of pid {pid})")

    def restart(self, node: Node) -> float:
        """Boot a killed node again; seconds it took to be running."""
        started = time.monotonic()
        self._spawn(node)
        self._await(node)
        took = time.monotonic() - started
        self._say(f"restarted {node.name} in {took:.1f}s")
        return took

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def queue_info(self, queue: str) -> dict[str, object]:
        """``list_queues`` row of ``queue`` (type, leader, members, messages), via a live node."""
        via = self.alive()[0]
        out = self.ctl(
            via,
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
            "messages",
            "--formatter",
            "json",
        )
        for row in json.loads(out):
            if row["name"] == queue:
                return dict(row)
        raise KeyError(queue)

    def leader_of(self, queue: str) -> Node:
        return self.node(str(self.queue_info(queue)["leader"]))

    def stop(self) -> None:
        """Kill every node and delete its data: nothing of the cluster stays behind."""
        for node in self.nodes:
            pid = node.pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if node.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
