"""Every ``WORKER_*`` setting in one typed object, read from the environment."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Lane", "Settings", "SettingsError", "load_settings"]

ENV_PREFIX = "WORKER_"
DEFAULT_SECRETS_DIR = "/run/secrets"

PositiveSeconds = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    """The worker's configuration (contract §2). Field ``x`` is variable ``WORKER_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    upstream_base_url: str | None = None
    upstream_api_key: SecretStr | None = None
    request_queue: str = Field("chat.requests", min_length=1)
    result_exchange: str = Field("chat.results", min_length=1)
    result_queue: str = "chat.results"
    dead_letter_queue: str = Field("chat.requests.dlq", min_length=1)
    queue_type: Literal["quorum", "classic"] = "quorum"
    concurrency: int = Field(64, ge=1, le=65535)
    max_attempts: int = Field(5, ge=1)
    request_timeout: PositiveSeconds = 600.0
    stream_idle_timeout: PositiveSeconds = 60.0
    stream_flush_interval: float = Field(0.05, ge=0)
    shutdown_grace: float = Field(30.0, ge=0)
    allowed_models: Annotated[frozenset[str], NoDecode] = frozenset()
    reply_to_pattern: re.Pattern[str] | None = None
    max_message_bytes: int = Field(10 * 1024 * 1024, ge=1)
    http_port: int = Field(8080, ge=0, le=65535)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    # §11: several upstreams, rate limits
    upstreams_file: Path | None = None
    upstream_rpm: int | None = Field(None, ge=1)
    upstream_tpm: int | None = Field(None, ge=1)
    upstream_max_concurrency: int | None = Field(None, ge=1)
    rate_limit_max_wait: float = Field(3600.0, ge=0)
    redis_url: SecretStr | None = None
    # §12: tenants (lanes are parsed from request_queue, see :attr:`lanes`)
    trust_tenant_header: bool = False
    # §14: heartbeats and the operator page
    events: bool = True
    events_exchange: str = Field("chat.events", min_length=1)
    console_token: SecretStr | None = None

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr) -> SecretStr:
        urls = _split_urls(value.get_secret_value())
        if not urls:
            raise ValueError("must name at least one amqp:// or amqps:// URL")
        for url in urls:
            if not url.startswith(("amqp://", "amqps://")):
                raise ValueError("each URL must start with amqp:// or amqps://")
        return value

    @field_validator("request_queue")
    @classmethod
    def _lanes_syntax(cls, value: str) -> str:
        _parse_lanes(value)  # raises ValueError naming the bad part
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        if not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("console_token", mode="before")
    @classmethod
    def _strip_token(cls, value: Any) -> Any:
        return value.strip() or None if isinstance(value, str) else value

    @field_validator("upstream_base_url")
    @classmethod
    def _http_base(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("upstream_api_key", mode="before")
    @classmethod
    def _strip_key(cls, value: Any) -> Any:
        # Secret files usually end with a newline that is not part of the key.
        return value.strip() or None if isinstance(value, str) else value

    @field_validator("allowed_models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            return frozenset(m.strip() for m in value.split(",") if m.strip())
        return value

    @field_validator("reply_to_pattern", mode="before")
    @classmethod
    def _empty_pattern(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("log_format", "log_level", "queue_type", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    def to_env(self) -> dict[str, str]:
        """These settings as ``WORKER_*`` variables, secrets included: for a child process."""
        env = {}
        for name, value in self:
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, frozenset):
                value = ",".join(sorted(value))
            elif isinstance(value, re.Pattern):
                value = value.pattern
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
        return env

    @property
    def amqp_urls(self) -> list[str]:
        """The broker URLs (§13: several name nodes of one cluster), in the order given."""
        return _split_urls(self.amqp_url.get_secret_value())

    @property
    def lanes(self) -> list[Lane]:
        """The request queues consumed, with their weights (§12); one lane by default."""
        return _parse_lanes(self.request_queue)

    @property
    def upstream_url(self) -> str:
        """The chat-completions endpoint; only ``run`` requires a base URL."""
        if not self.upstream_base_url:
            raise SettingsError("WORKER_UPSTREAM_BASE_URL: required by `chat-worker run`")
        return f"{self.upstream_base_url}/chat/completions"

    @property
    def delivery_limit(self) -> int:
        """Deliveries after which the broker itself dead-letters a message (quorum queues).

        The worker fails a job with a result well before this; the limit is the backstop
        for a message that crashes the process before it can say anything.
        """
        return self.max_attempts + 5


@dataclass(frozen=True, slots=True)
class Lane:
    """One request queue consumed, and its share of the in-flight jobs while lanes compete."""

    queue: str
    weight: int = 1


def _split_urls(value: str) -> list[str]:
    return [url.strip() for url in value.split(",") if url.strip()]


def _parse_lanes(value: str) -> list[Lane]:
    """``chat.interactive:4,chat.batch:1`` → lanes; a bare name weighs 1."""
    lanes: list[Lane] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            raise ValueError("empty queue name in the list")
        name, sep, weight = part.rpartition(":")
        if not sep:
            name, weight = part, "1"
        if not name or not weight.isdigit() or int(weight) < 1:
            raise ValueError(f"{part!r} is not queue or queue:weight (weight an integer >= 1)")
        lanes.append(Lane(name, int(weight)))
    if len({lane.queue for lane in lanes}) != len(lanes):
        raise ValueError("a queue is named twice")
    return lanes


class SettingsError(Exception):
    """A setting is missing or invalid; the message names the variable."""


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, ``.env`` and the secrets directory.

    Raises :class:`SettingsError` with one line naming the first bad variable.
    """
    secrets_dir = Path(os.environ.get(f"{ENV_PREFIX}SECRETS_DIR", DEFAULT_SECRETS_DIR))
    extra: dict[str, Any] = {"_secrets_dir": secrets_dir} if secrets_dir.is_dir() else {}
    try:
        return Settings(**extra, **overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ENV_PREFIX + "_".join(str(p) for p in error["loc"]).upper()
        raise SettingsError(f"{name}: {error['msg']}") from None
