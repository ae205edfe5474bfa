"""API keys and their tenants (``WORKER_GATEWAY_KEYS_FILE``), checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.gateway.errors import Unauthorized
from worker.settings import DEFAULT_SECRETS_DIR, ENV_PREFIX, SettingsError

__all__ = ["OPEN_PATHS", "Keys", "auth_middleware", "load_keys", "tenant_of"]

#: paths answered without a key: probes and the scraper
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: where a request's tenant is kept (None: the open gateway)
TENANT: web.RequestKey[str | None] = web.RequestKey("tenant")


class _KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=256)
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    key_env: str | None = Field(None, min_length=1)
    key_file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> _KeySpec:
        given = [self.key_sha256, self.key_env, self.key_file]
        if sum(value is not None for value in given) != 1:
            raise ValueError("give exactly one of key_sha256, key_env, key_file")
        return self


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[_KeySpec] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class Keys:
    """SHA-256 digests of the keys, each with its tenant."""

    digests: tuple[tuple[bytes, str], ...]

    def tenant_of(self, key: str) -> str | None:
        """The key's tenant, or None; every digest is compared, in constant time each."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for known, tenant in self.digests:
            if hmac.compare_digest(digest, known) and found is None:
                found = tenant
        return found


def _secret(spec: _KeySpec, where: str) -> bytes:
    if spec.key_sha256 is not None:
        return bytes.fromhex(spec.key_sha256)
    if spec.key_env is not None:
        value = os.environ.get(spec.key_env)
        if not value:
            secrets = Path(os.environ.get(f"{ENV_PREFIX}SECRETS_DIR", DEFAULT_SECRETS_DIR))
            path = secrets / spec.key_env
            value = path.read_text(encoding="utf-8") if path.is_file() else None
        if not value or not value.strip():
            raise SettingsError(f"{where}: key_env {spec.key_env} is not set")
        return hashlib.sha256(value.strip().encode()).digest()
    assert spec.key_file is not None
    try:
        value = spec.key_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"{where}: key_file {spec.key_file}: {exc.strerror}") from None
    if not value:
        raise SettingsError(f"{where}: key_file {spec.key_file} is empty")
    return hashlib.sha256(value.encode()).digest()


def load_keys(path: Path) -> Keys:
    """Read the keys file; :class:`SettingsError` says what is wrong (never a key)."""
    where = f"WORKER_GATEWAY_KEYS_FILE {path}"
    try:
        document: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
        parsed = _KeysFile.model_validate(document)
    except OSError as exc:
        raise SettingsError(f"{where}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError:
        raise SettingsError(f"{where}: not YAML") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        place = ".".join(str(part) for part in error["loc"])
        raise SettingsError(f"{where}: {place}: {error['msg']}") from None
    return Keys(
        tuple(
            (_secret(spec, f"{where}: keys[{n}]"), spec.tenant)
            for n, spec in enumerate(parsed.keys)
        )
    )


def auth_middleware(keys: Keys | None) -> Middleware:
    """Every API request needs ``Authorization: Bearer KEY`` when there are keys."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        tenant = None
        if keys is not None and request.path not in OPEN_PATHS:
            header = request.headers.get("Authorization", "")
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthorized(
                    "You didn't provide an API key: Authorization: Bearer KEY",
                    code="missing_api_key",
                )
            tenant = keys.tenant_of(key.strip())
            if tenant is None:
                raise Unauthorized("Incorrect API key provided", code="invalid_api_key")
        request[TENANT] = tenant
        return await handler(request)

    return authenticate


def tenant_of(request: web.Request) -> str | None:
    """The tenant of the request's key (None on an open gateway)."""
    return request.get(TENANT)
