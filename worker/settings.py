"""Every ``WORKER_*`` setting in one typed object, read from the environment."""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, DotEnvSettingsSource, NoDecode, SettingsConfigDict

from worker.cost import known_provider

# The upstreams file's models and loader live in worker.upstreams_file; their names are
# re-exported here, where they have always been imported from.
from worker.upstreams_file import DEFAULT_SECRETS_DIR as DEFAULT_SECRETS_DIR
from worker.upstreams_file import ENV_PREFIX as ENV_PREFIX
from worker.upstreams_file import (
    CooldownSpec,
    LimitsSpec,
    SettingsError,
    UpstreamsFile,
    UpstreamSpec,
    _http_url,
    _read_upstreams,
)
from worker.upstreams_file import _line_of as _line_of

__all__ = [
    "CooldownSpec",
    "Lane",
    "LimitsSpec",
    "Settings",
    "SettingsError",
    "UpstreamSpec",
    "UpstreamsFile",
    "check_names",
    "known_names",
    "load_settings",
]

PositiveSeconds = Annotated[float, Field(gt=0)]
_DATABASE_SCHEMES = (
    "sqlite:",
    "sqlite+aiosqlite:",
    "postgresql:",
    "postgres:",
    "postgresql+asyncpg:",
)
DEFAULT_UPSTREAM = "default"  # the name of the single upstream of WORKER_UPSTREAM_BASE_URL


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
    # The broker's consumer timeout (RabbitMQ's consumer_timeout, 30 min by default): a
    # delivery held longer closes its channel. Retries leave through a delay queue before.
    consumer_timeout: PositiveSeconds = 1800.0
    # How long a copy the broker nacks (a quorum queue electing a leader) is published again.
    publish_retry_window: float = Field(60.0, ge=0)
    # The AMQP heartbeat, in seconds (0: none); a silent connection is left within about two.
    amqp_heartbeat: int = Field(10, ge=0, le=65535)
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
    # §16: the result store and the cache (with WORKER_REDIS_URL)
    result_ttl: float = Field(86400.0, ge=0)
    cache: Literal["off", "on"] = "off"
    cache_ttl: float = Field(3600.0, ge=0)
    # §17: cost and budgets
    budgets_file: Path | None = None
    upstream_provider: str | None = None
    # §15: the gateway (a SecretStr: a PostgreSQL URL may hold a password)
    database_url: SecretStr = SecretStr("sqlite:///chat-worker.db")
    gateway_host: str = Field("127.0.0.1", min_length=1)
    gateway_port: int = Field(8000, ge=0, le=65535)  # 0: any free port (tests)
    gateway_keys_file: Path | None = None
    gateway_batch_lane: str | None = None
    gateway_lane: str | None = None
    gateway_max_file_bytes: int = Field(200 * 1024 * 1024, ge=1)
    gateway_max_file_lines: int = Field(50_000, ge=1)
    # Beyond the contract's rows: the queue batch results come back on (every replica
    # consumes it), and the pace of the gateway's background work.
    gateway_results_queue: str = Field("chat.gateway.results", min_length=1)
    gateway_lease_seconds: float = Field(15.0, gt=0)
    gateway_cancel_grace: float = Field(10.0, ge=0)
    gateway_publish_chunk: int = Field(500, ge=1)
    gateway_sweep_interval: float = Field(1.0, gt=0)

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

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(_DATABASE_SCHEMES):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value

    @field_validator(
        "budgets_file",
        "upstream_provider",
        "gateway_keys_file",
        "gateway_batch_lane",
        "gateway_lane",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("upstream_provider")
    @classmethod
    def _known_upstream_provider(cls, value: str | None) -> str | None:
        if value is not None and not known_provider(value):
            raise ValueError(f"{value!r} is not a genai-prices provider id (openai, anthropic, …)")
        return value

    @model_validator(mode="after")
    def _budgets_need_redis(self) -> Settings:
        if self.budgets_file is not None and self.redis_url is None:
            raise ValueError(
                "WORKER_BUDGETS_FILE needs WORKER_REDIS_URL (every replica shares one ledger)"
            )
        return self

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
        return _http_url(value) if value else None

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

    @field_validator(
        "upstream_provider",
        "gateway_batch_lane",
        "gateway_lane",
        "budgets_file",
        "gateway_keys_file",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_format", "log_level", "queue_type", "cache", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _held_within_the_consumer_timeout(self) -> Settings:
        # A call longer than the broker's consumer timeout would have its delivery's
        # channel closed under it, every job on it cancelled, on every attempt.
        if self.request_timeout >= self.consumer_timeout:
            raise ValueError(
                "WORKER_REQUEST_TIMEOUT must be below WORKER_CONSUMER_TIMEOUT (the broker's "
                "consumer_timeout): raise both together"
            )
        return self

    def to_env(self) -> dict[str, str]:
        """These settings as ``WORKER_*`` variables, secrets included: for a child process."""
        env = {}
        # The fields only: iterating the model would also give cached properties
        # (``upstreams``), which are not settings.
        for name in type(self).model_fields:
            value = getattr(self, name)
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
    def batch_lane(self) -> str:
        """The queue batch lines go to: ``WORKER_GATEWAY_BATCH_LANE``, else the first lane."""
        return self.gateway_batch_lane or self.lanes[0].queue

    @property
    def call_lane(self) -> str:
        """The queue of the gateway's calls: ``WORKER_GATEWAY_LANE``, else the first lane."""
        return self.gateway_lane or self.lanes[0].queue

    @property
    def upstream_url(self) -> str:
        """The chat-completions endpoint; only ``run`` requires a base URL."""
        if not self.upstream_base_url:
            raise SettingsError("WORKER_UPSTREAM_BASE_URL: required by `chat-worker run`")
        return f"{self.upstream_base_url}/chat/completions"

    @functools.cached_property
    def upstreams(self) -> tuple[UpstreamSpec, ...]:
        """The upstreams with their keys: from ``WORKER_UPSTREAMS_FILE``, else a pool of one
        (``default``) from ``WORKER_UPSTREAM_BASE_URL``/``_API_KEY``/``_RPM``/....

        Raises :class:`SettingsError` with one line naming the file and the place in it.
        """
        if self.upstreams_file is not None:
            return _read_upstreams(self.upstreams_file)
        if not self.upstream_base_url:
            raise SettingsError(
                "WORKER_UPSTREAM_BASE_URL: required by `chat-worker run` "
                "unless WORKER_UPSTREAMS_FILE is set"
            )
        return (
            UpstreamSpec(
                name=DEFAULT_UPSTREAM,
                base_url=self.upstream_base_url,
                models=["*"],
                provider=self.upstream_provider,
                limits=LimitsSpec(
                    rpm=self.upstream_rpm,
                    tpm=self.upstream_tpm,
                    max_concurrency=self.upstream_max_concurrency,
                ),
            ).model_copy(update={"api_key": self.upstream_api_key}),
        )

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


#: ``WORKER_*`` variables that are not fields of :class:`Settings` and still not mistakes:
#: the secrets directory (read before the settings), and the test suite's own.
NOT_SETTINGS = frozenset({f"{ENV_PREFIX}SECRETS_DIR"})
NOT_SETTINGS_PREFIXES = (f"{ENV_PREFIX}TEST_",)
# A .env key without the prefix this close to a setting's name is taken for a misspelling.
DOTENV_LIKENESS = 0.85


def known_names() -> frozenset[str]:
    """Every variable a ``chat-worker`` command reads: one per field of :class:`Settings`."""
    return frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields) | NOT_SETTINGS


def check_names(
    environ: Mapping[str, str] | None = None, env_file: Path | str | None = ".env"
) -> None:
    """Refuse a misspelt setting: a ``WORKER_*`` variable (in the environment or ``.env``)
    that no setting has, or a ``.env`` key that looks like one. Raises :class:`SettingsError`
    with one line naming it and the closest known name."""
    known = known_names()
    environ = os.environ if environ is None else environ
    # Names are read regardless of case (as pydantic-settings reads them); each is shown as
    # it was written, with where it was found.
    found = {name.upper(): name for name in environ if name.upper().startswith(ENV_PREFIX)}
    if env_file is not None and Path(env_file).is_file():
        dotenv = DotEnvSettingsSource(Settings, env_file=env_file, case_sensitive=False)
        for name in dotenv.env_vars:
            upper = name.upper()
            if upper.startswith(ENV_PREFIX) or difflib.get_close_matches(
                upper, known, n=1, cutoff=DOTENV_LIKENESS
            ):
                found.setdefault(upper, f"{upper} (in {env_file})")
    unknown = sorted(
        name for name in found if name not in known and not name.startswith(NOT_SETTINGS_PREFIXES)
    )
    if not unknown:
        return
    name = unknown[0]
    closest = _closest(name, known)
    hint = f"; did you mean {closest}?" if closest else ""
    more = ", ".join(found[other] for other in unknown[1:4])
    more = f" ({len(unknown) - 1} more unknown: {more})" if more else ""
    raise SettingsError(f"{found[name]}: not a setting{hint}{more}")


def _closest(name: str, known: frozenset[str]) -> str | None:
    """The known name most like ``name`` (difflib), among those holding all of its words
    when some do (``WORKER_UPSTREAM_URL`` is ``WORKER_UPSTREAM_BASE_URL`` with a word left
    out, not ``WORKER_UPSTREAM_RPM`` with two letters changed)."""
    words = set(name.split("_"))
    holding = [k for k in known if words <= set(k.split("_"))]
    matches = difflib.get_close_matches(name, holding or known, n=1, cutoff=0.0)
    return matches[0] if matches else None


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, ``.env`` and the secrets directory.

    Raises :class:`SettingsError` with one line naming the first bad variable, or the first
    ``WORKER_*`` variable that is no setting (:func:`check_names`).
    """
    check_names(env_file=overrides.get("_env_file", ".env"))
    secrets_dir = Path(os.environ.get(f"{ENV_PREFIX}SECRETS_DIR", DEFAULT_SECRETS_DIR))
    extra: dict[str, Any] = {"_secrets_dir": secrets_dir} if secrets_dir.is_dir() else {}
    try:
        return Settings(**extra, **overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        if not error["loc"]:  # a rule between settings: its message names them
            raise SettingsError(error["msg"].removeprefix("Value error, ")) from None
        name = ENV_PREFIX + "_".join(str(p) for p in error["loc"]).upper()
        raise SettingsError(f"{name}: {error['msg']}") from None
