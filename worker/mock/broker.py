"""A throwaway RabbitMQ in Docker (testcontainers), for the demo and tests where Docker runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["BrokerNotFound", "docker_available", "throwaway_broker"]


THROWAWAY_IMAGE = "rabbitmq:3.13-alpine"


class BrokerNotFound(RuntimeError):
    """No broker at the URL and no Docker engine for a throwaway one."""


def docker_available() -> bool:
    """True when a Docker engine answers (a client binary alone is not enough)."""
    try:
        import docker
    except ImportError:
        return False
    try:
        docker.from_env().ping()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def throwaway_broker() -> Iterator[str]:
    """A RabbitMQ in Docker through testcontainers, for as long as the block runs."""
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer(THROWAWAY_IMAGE) as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(container.port)
        yield f"amqp://guest:guest@{host}:{port}/"
