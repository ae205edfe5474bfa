"""The gateway's own settings (the §2 rows of §15), read as ``worker.settings`` reads its own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.settings import DEFAULT_SECRETS_DIR, ENV_PREFIX, Settings, SettingsError

__all__ = ["GatewaySettings", "load_gateway_settings"]

MB = 1024 * 1024
_SCHEMES = ("sqlite:", "sqlite+aiosqlite:", "postgresql:", "postgres:", "postgresql+asyncpg:")


class GatewaySettings(BaseSettings):
    """``WORKER_DATABASE_URL``, ``WORKER_GATEWAY_*``: to be folded into ``Settings`` later."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    database_url: SecretStr = SecretStr("sqlite:///chat-worker.db")
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8000, ge=0, le=65535)
    gateway_keys_file: Path | None = None
    gateway_batch_lane: str | None = None
    gateway_lane: str | None = None
    gateway_max_file_bytes: int = Field(200 * MB, ge=1)
    gateway_max_file_lines: int = Field(50_000, ge=1)
    # Beyond the contract's rows: the shared reply queue, and the pace of the background work.
    gateway_results_queue: str = Field("chat.gateway.results", min_length=1)
    gateway_lease_seconds: float = Field(15.0, gt=0)
    gateway_cancel_grace: float = Field(10.0, ge=0)
    gateway_publish_chunk: int = Field(500, ge=1)
    gateway_sweep_interval: float = Field(1.0, gt=0)

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(_SCHEMES):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value

    @field_validator("gateway_batch_lane", "gateway_lane", "gateway_keys_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    def batch_lane(self, settings: Settings) -> str:
        """The queue batch lines go to: ``WORKER_GATEWAY_BATCH_LANE``, else the first lane."""
        return self.gateway_batch_lane or settings.lanes[0].queue

    def call_lane(self, settings: Settings) -> str:
        """The queue of synchronous calls: ``WORKER_GATEWAY_LANE``, else the first lane."""
        return self.gateway_lane or settings.lanes[0].queue


def load_gateway_settings(**overrides: Any) -> GatewaySettings:
    """Read the gateway's settings; :class:`SettingsError` names the first bad variable."""
    secrets_dir = Path(os.environ.get(f"{ENV_PREFIX}SECRETS_DIR", DEFAULT_SECRETS_DIR))
    extra: dict[str, Any] = {"_secrets_dir": secrets_dir} if secrets_dir.is_dir() else {}
    try:
        return GatewaySettings(**extra, **overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ENV_PREFIX + "_".join(str(p) for p in error["loc"]).upper()
        raise SettingsError(f"{name}: {error['msg']}") from None
