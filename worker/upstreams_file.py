"""The upstreams file (``WORKER_UPSTREAMS_FILE``, contract §11): its models and its loader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.cost import PriceSpec, known_provider, provider_of
from worker.messages import ENDPOINTS, Endpoint

__all__ = [
    "DEFAULT_SECRETS_DIR",
    "ENV_PREFIX",
    "CooldownSpec",
    "LimitsSpec",
    "SettingsError",
    "UpstreamSpec",
    "UpstreamsFile",
]

# Read by :mod:`worker.settings` too, which imports this module (never the reverse).
ENV_PREFIX = "WORKER_"
DEFAULT_SECRETS_DIR = "/run/secrets"

MAX_WEIGHT = 1_000_000.0
MAX_COOLDOWN = 7 * 24 * 3600.0  # a week: longer is a way of saying "never", which is not one


# Here rather than in worker.settings (which re-exports it) so that this module, imported by
# worker.settings, needs nothing of it.
class SettingsError(Exception):
    """A setting is missing or invalid; the message names the variable."""


def _http_url(value: str) -> str:
    """An ``http(s)://host[:port]/path`` base URL, without its trailing slash."""
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError when it is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if not parts.hostname:
        raise ValueError("names no host (http://HOST[:PORT]/PATH)")
    if port == 0:
        raise ValueError("port 0 is no port")
    return value.rstrip("/")


class _Strict(BaseModel):
    # A misspelt key (``priorty``) must stop the process, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsSpec(_Strict):
    """Configured limits of one upstream; each optional."""

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)


class CooldownSpec(_Strict):
    """``failures`` retryable failures in a row cool an upstream for ``seconds``."""

    failures: int = Field(3, ge=1)
    # Finite: ``.inf`` would rest an upstream for ever after three failures.
    seconds: float = Field(30.0, gt=0, le=MAX_COOLDOWN, allow_inf_nan=False)


class UpstreamSpec(_Strict):
    """One upstream of ``WORKER_UPSTREAMS_FILE``; ``api_key`` is filled by the loader from
    ``api_key_env`` or ``api_key_file``, never from the file."""

    name: str = Field(pattern=r"^[a-z0-9_-]+$", max_length=64)
    base_url: str
    api_key_env: str | None = Field(None, min_length=1)
    api_key_file: Path | None = None
    auth: Literal["bearer", "api-key", "none"] = "bearer"
    query: dict[str, str] = {}
    headers: dict[str, str] = {}
    models: list[str] = Field(default_factory=list)
    model_map: dict[str, str] = {}
    endpoints: list[Endpoint] = Field(default_factory=lambda: list(ENDPOINTS), min_length=1)
    priority: int = 0
    # Finite: an upstream of weight ``.inf`` makes the draw's sums infinite (never drawn).
    weight: float = Field(1.0, gt=0, le=MAX_WEIGHT, allow_inf_nan=False)
    limits: LimitsSpec = LimitsSpec()
    cooldown: CooldownSpec = CooldownSpec()
    # §17: prices and cheaper tiers
    provider: str | None = Field(None, min_length=1)  # a genai-prices id; else from the host
    prices: dict[str, PriceSpec] = {}  # model sent upstream -> USD per million tokens
    defaults: dict[str, Any] = {}  # body fields sent when the request does not set them
    lanes: list[str] = Field(default_factory=list)  # request queues it serves; empty: all
    api_key: SecretStr | None = Field(None, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _no_key_inline(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError("api_key: keys come from api_key_env or api_key_file, not the file")
        return data

    @field_validator("base_url")
    @classmethod
    def _http_base(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str | None) -> str | None:
        if value is not None and not known_provider(value):
            raise ValueError(f"{value!r} is not a genai-prices provider id (openai, anthropic, …)")
        return value

    @field_validator("defaults")
    @classmethod
    def _defaults_not_the_job(cls, value: dict[str, Any]) -> dict[str, Any]:
        if bad := {"model", "messages", "input", "stream", "stream_options"} & value.keys():
            raise ValueError(f"defaults cannot set {', '.join(sorted(bad))}")
        return value

    @property
    def price_provider(self) -> str | None:
        """The genai-prices provider of this upstream: its own, else by its host."""
        return provider_of(self.provider, self.base_url)

    def serves_lane(self, lane: str | None) -> bool:
        return not self.lanes or lane is None or lane in self.lanes

    @field_validator("headers")
    @classmethod
    def _no_auth_header(cls, value: dict[str, str]) -> dict[str, str]:
        # A key written here would sit in a ConfigMap in clear; it belongs in a Secret.
        if {"authorization", "api-key"} & {k.lower() for k in value}:
            raise ValueError("put the key in api_key_env or api_key_file, not in headers")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> UpstreamSpec:
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        if not self.models and not self.model_map:
            raise ValueError('models: name at least one model (or "*")')
        return self

    @property
    def url(self) -> str:
        """The chat-completions endpoint, without the fixed query parameters."""
        return f"{self.base_url}/chat/completions"

    def serves(self, model: str, endpoint: Endpoint = "chat") -> bool:
        if endpoint not in self.endpoints:
            return False
        return model in self.model_map or model in self.models or "*" in self.models

    def upstream_model(self, model: str) -> str:
        """The name sent upstream for a requested ``model``."""
        return self.model_map.get(model, model)


class UpstreamsFile(_Strict):
    """The document of ``WORKER_UPSTREAMS_FILE``."""

    upstreams: list[UpstreamSpec] = Field(min_length=1)

    @field_validator("upstreams")
    @classmethod
    def _unique_names(cls, value: list[UpstreamSpec]) -> list[UpstreamSpec]:
        names = [spec.name for spec in value]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"names must be unique: {', '.join(dupes)} repeated")
        return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: YAML says keys
    are unique, and PyYAML would silently keep the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden key by key, as YAML intends
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the constructor says so below
            if first is not None:
                problem = f"duplicate key {key!r} (first on line {first})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_upstreams(path: Path) -> tuple[UpstreamSpec, ...]:
    """Parse, validate and resolve the keys of the upstreams file (one-line errors)."""
    where = f"WORKER_UPSTREAMS_FILE {path}"
    try:
        text = path.read_text(encoding="utf-8")
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # a safe loader
    except OSError as exc:
        raise SettingsError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not YAML"
        raise SettingsError(f"{where}{at}: {problem}") from None
    try:
        parsed = UpstreamsFile.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [p for p in error["loc"] if p != "__root__"]
        place = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        line = _line_of(text, loc)
        message = error["msg"].removeprefix("Value error, ")
        raise SettingsError(
            f"{where}{f' line {line}' if line else ''}: {place or 'document'}: {message}"
        ) from None
    return tuple(
        spec.model_copy(update={"api_key": _resolve_key(spec, where)}) for spec in parsed.upstreams
    )


def _resolve_key(spec: UpstreamSpec, where: str) -> SecretStr | None:
    """The key of ``spec`` from its variable (or the secrets directory) or its file."""
    place = f"{where}: upstream {spec.name!r}"
    if spec.api_key_env:
        value = os.environ.get(spec.api_key_env)
        if not value:
            secrets = Path(os.environ.get(f"{ENV_PREFIX}SECRETS_DIR", DEFAULT_SECRETS_DIR))
            with_file = secrets / spec.api_key_env
            value = with_file.read_text(encoding="utf-8") if with_file.is_file() else None
        if not value or not value.strip():
            raise SettingsError(
                f"{place}: api_key_env {spec.api_key_env} is not set (nor a file of that name "
                "in WORKER_SECRETS_DIR)"
            )
        return SecretStr(value.strip())
    if spec.api_key_file:
        try:
            value = spec.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise SettingsError(
                f"{place}: api_key_file {spec.api_key_file}: cannot read: {reason}"
            ) from None
        if not value:
            raise SettingsError(f"{place}: api_key_file {spec.api_key_file} is empty")
        return SecretStr(value)
    return None


def _line_of(text: str, loc: list[Any]) -> int | None:
    """The 1-based line of the node at ``loc`` in the YAML ``text``, as near as it exists."""
    try:
        node: Any = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
            if node is None:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
        else:
            break
    if node is not None:
        line = node.start_mark.line + 1
    return line
