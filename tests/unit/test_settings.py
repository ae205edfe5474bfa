"""Settings from the environment, ``.env`` and the secrets directory (contract §2)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from worker.settings import Lane, Settings, SettingsError, load_settings

SECRET_KEY = "sk-very-secret-0123456789"
SECRET_PASSWORD = "hunter2-broker-password"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No WORKER_* variable from the outside, no ``.env`` but the test's own, an empty
    secrets directory; returns that directory."""
    for name in list(os.environ):
        if name.startswith("WORKER_"):
            monkeypatch.delenv(name)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    monkeypatch.setenv("WORKER_SECRETS_DIR", str(secrets))
    monkeypatch.chdir(tmp_path)
    return secrets


# --- defaults ------------------------------------------------------------------------------


def test_defaults_are_the_contracts() -> None:
    settings = load_settings()
    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@localhost:5672/"
    assert settings.upstream_base_url is None
    assert settings.upstream_api_key is None
    assert settings.request_queue == "chat.requests"
    assert settings.result_exchange == "chat.results"
    assert settings.result_queue == "chat.results"
    assert settings.dead_letter_queue == "chat.requests.dlq"
    assert settings.queue_type == "quorum"
    assert settings.concurrency == 64
    assert settings.max_attempts == 5
    assert settings.request_timeout == 600
    assert settings.stream_idle_timeout == 60
    assert settings.stream_flush_interval == 0.05
    assert settings.shutdown_grace == 30
    assert settings.allowed_models == frozenset()
    assert settings.reply_to_pattern is None
    assert settings.max_message_bytes == 10_485_760
    assert settings.http_port == 8080
    assert settings.log_format == "json"
    assert settings.log_level == "info"
    assert settings.database_url.get_secret_value() == "sqlite:///chat-worker.db"
    assert (settings.gateway_host, settings.gateway_port) == ("127.0.0.1", 8000)
    assert settings.gateway_keys_file is None
    assert settings.gateway_batch_lane is None and settings.gateway_lane is None
    assert settings.gateway_max_file_bytes == 200 * 1024 * 1024
    assert settings.gateway_max_file_lines == 50_000
    assert settings.gateway_results_queue == "chat.gateway.results"
    assert settings.gateway_lease_seconds == 15
    assert settings.gateway_cancel_grace == 10
    assert settings.gateway_publish_chunk == 500
    assert settings.gateway_sweep_interval == 1


def test_upstream_url_requires_a_base() -> None:
    with pytest.raises(SettingsError, match=r"^WORKER_UPSTREAM_BASE_URL: "):
        _ = load_settings().upstream_url


# --- every variable from the environment ----------------------------------------------------


def _secret(value: Any) -> Any:
    return value.get_secret_value() if value is not None else None


BROKER = "amqps://u:p@rabbit:5671/vh"
# (variable, value in the environment, attribute, expected value)
FROM_ENV: list[tuple[str, str, str, Any]] = [
    ("WORKER_AMQP_URL", BROKER, "amqp_url", BROKER),
    (
        "WORKER_UPSTREAM_BASE_URL",
        "https://llm.test/v1/",
        "upstream_base_url",
        "https://llm.test/v1",
    ),
    ("WORKER_UPSTREAM_API_KEY", f" {SECRET_KEY}\n", "upstream_api_key", SECRET_KEY),
    ("WORKER_REQUEST_QUEUE", "jobs.in", "request_queue", "jobs.in"),
    ("WORKER_RESULT_EXCHANGE", "jobs.out", "result_exchange", "jobs.out"),
    ("WORKER_RESULT_QUEUE", "", "result_queue", ""),
    ("WORKER_DEAD_LETTER_QUEUE", "jobs.dead", "dead_letter_queue", "jobs.dead"),
    ("WORKER_QUEUE_TYPE", "Classic", "queue_type", "classic"),
    ("WORKER_CONCURRENCY", "8", "concurrency", 8),
    ("WORKER_MAX_ATTEMPTS", "3", "max_attempts", 3),
    ("WORKER_REQUEST_TIMEOUT", "12.5", "request_timeout", 12.5),
    ("WORKER_STREAM_IDLE_TIMEOUT", "7", "stream_idle_timeout", 7.0),
    ("WORKER_STREAM_FLUSH_INTERVAL", "0", "stream_flush_interval", 0.0),
    ("WORKER_SHUTDOWN_GRACE", "2.5", "shutdown_grace", 2.5),
    ("WORKER_ALLOWED_MODELS", "gpt-4o, llama-3 ,,", "allowed_models", {"gpt-4o", "llama-3"}),
    ("WORKER_MAX_MESSAGE_BYTES", "1024", "max_message_bytes", 1024),
    ("WORKER_HTTP_PORT", "0", "http_port", 0),
    ("WORKER_LOG_FORMAT", "console", "log_format", "console"),
    ("WORKER_LOG_LEVEL", "DEBUG", "log_level", "debug"),
    (
        "WORKER_UPSTREAMS_FILE",
        "/etc/chat-worker/upstreams.yaml",
        "upstreams_file",
        Path("/etc/chat-worker/upstreams.yaml"),
    ),
    ("WORKER_UPSTREAM_RPM", "3000", "upstream_rpm", 3000),
    ("WORKER_UPSTREAM_TPM", "1000000", "upstream_tpm", 1000000),
    ("WORKER_UPSTREAM_MAX_CONCURRENCY", "200", "upstream_max_concurrency", 200),
    ("WORKER_RATE_LIMIT_MAX_WAIT", "90", "rate_limit_max_wait", 90.0),
    ("WORKER_REDIS_URL", "redis://127.0.0.1:6379/0", "redis_url", "redis://127.0.0.1:6379/0"),
    ("WORKER_TRUST_TENANT_HEADER", "true", "trust_tenant_header", True),
    ("WORKER_EVENTS", "false", "events", False),
    ("WORKER_EVENTS_EXCHANGE", "ops.events", "events_exchange", "ops.events"),
    ("WORKER_CONSOLE_TOKEN", " s3cret\n", "console_token", "s3cret"),
    ("WORKER_RESULT_TTL", "0", "result_ttl", 0.0),
    ("WORKER_CACHE", "on", "cache", True),
    ("WORKER_CACHE_TTL", "60", "cache_ttl", 60.0),
    ("WORKER_UPSTREAM_PROVIDER", "anthropic", "upstream_provider", "anthropic"),
    (
        "WORKER_DATABASE_URL",
        f"postgresql://gw:{SECRET_PASSWORD}@db/gw",
        "database_url",
        f"postgresql://gw:{SECRET_PASSWORD}@db/gw",
    ),
    ("WORKER_GATEWAY_HOST", "0.0.0.0", "gateway_host", "0.0.0.0"),
    ("WORKER_GATEWAY_PORT", "9000", "gateway_port", 9000),
    ("WORKER_GATEWAY_KEYS_FILE", "/etc/keys.yaml", "gateway_keys_file", Path("/etc/keys.yaml")),
    ("WORKER_GATEWAY_BATCH_LANE", "chat.batch", "gateway_batch_lane", "chat.batch"),
    ("WORKER_GATEWAY_LANE", "chat.interactive", "gateway_lane", "chat.interactive"),
    ("WORKER_GATEWAY_MAX_FILE_BYTES", "1000", "gateway_max_file_bytes", 1000),
    ("WORKER_GATEWAY_MAX_FILE_LINES", "10", "gateway_max_file_lines", 10),
    ("WORKER_GATEWAY_RESULTS_QUEUE", "gw.results", "gateway_results_queue", "gw.results"),
    ("WORKER_GATEWAY_LEASE_SECONDS", "4.5", "gateway_lease_seconds", 4.5),
    ("WORKER_GATEWAY_CANCEL_GRACE", "0", "gateway_cancel_grace", 0.0),
    ("WORKER_GATEWAY_PUBLISH_CHUNK", "50", "gateway_publish_chunk", 50),
    ("WORKER_GATEWAY_SWEEP_INTERVAL", "0.25", "gateway_sweep_interval", 0.25),
]


@pytest.mark.parametrize(("variable", "value", "attribute", "expected"), FROM_ENV)
def test_variable_from_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, attribute: str, expected: Any
) -> None:
    monkeypatch.setenv(variable, value)
    got = getattr(load_settings(), attribute)
    if attribute in ("amqp_url", "upstream_api_key", "redis_url", "console_token", "database_url"):
        got = _secret(got)
    assert got == expected


def test_every_setting_is_covered_by_a_test() -> None:
    # WORKER_BUDGETS_FILE needs WORKER_REDIS_URL: tested with it below.
    tested = {variable for variable, *_ in FROM_ENV} | {
        "WORKER_REPLY_TO_PATTERN",
        "WORKER_BUDGETS_FILE",
    }
    assert tested == {f"WORKER_{name.upper()}" for name in Settings.model_fields}


def test_a_budgets_file_needs_redis(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORKER_BUDGETS_FILE", str(tmp_path / "budgets.yaml"))
    with pytest.raises(SettingsError, match="needs WORKER_REDIS_URL"):
        load_settings()
    monkeypatch.setenv("WORKER_REDIS_URL", "redis://127.0.0.1:6379/0")
    assert load_settings().budgets_file == tmp_path / "budgets.yaml"


def test_lanes_from_the_request_queue_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_REQUEST_QUEUE", "chat.interactive:4, chat.batch")
    assert load_settings().lanes == [Lane("chat.interactive", 4), Lane("chat.batch", 1)]


@pytest.mark.parametrize("value", ["a:0", "a:x", "a,,b", "a,a", ":3"])
def test_bad_lane_lists_name_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("WORKER_REQUEST_QUEUE", value)
    with pytest.raises(SettingsError, match="WORKER_REQUEST_QUEUE"):
        load_settings()


def test_several_broker_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_AMQP_URL", "amqp://a:5672/, amqp://b:5672/")
    assert load_settings().amqp_urls == ["amqp://a:5672/", "amqp://b:5672/"]
    monkeypatch.setenv("WORKER_AMQP_URL", "amqp://a:5672/,http://b/")
    with pytest.raises(SettingsError, match="WORKER_AMQP_URL"):
        load_settings()


def test_reply_to_pattern_is_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_REPLY_TO_PATTERN", r"amq\.gen-.*|replies\.[a-z]+")
    pattern = load_settings().reply_to_pattern
    assert isinstance(pattern, re.Pattern)
    assert pattern.fullmatch("amq.gen-abc123")
    assert pattern.fullmatch("replies.alice")
    assert not pattern.fullmatch("replies.alice.extra")


def test_empty_reply_to_pattern_allows_any(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_REPLY_TO_PATTERN", "")
    assert load_settings().reply_to_pattern is None


def test_gateway_lanes_default_to_the_first_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_REQUEST_QUEUE", "chat.interactive:4,chat.batch")
    settings = load_settings()
    assert (settings.batch_lane, settings.call_lane) == ("chat.interactive", "chat.interactive")
    monkeypatch.setenv("WORKER_GATEWAY_BATCH_LANE", "chat.batch")
    monkeypatch.setenv("WORKER_GATEWAY_LANE", "")
    settings = load_settings()
    assert (settings.batch_lane, settings.call_lane) == ("chat.batch", "chat.interactive")


def test_a_database_password_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_DATABASE_URL", f"postgresql://gw:{SECRET_PASSWORD}@db/gw")
    settings = load_settings()
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert SECRET_PASSWORD not in text
    monkeypatch.setenv("WORKER_DATABASE_URL", f"mysql://gw:{SECRET_PASSWORD}@db/gw")
    with pytest.raises(SettingsError, match=r"^WORKER_DATABASE_URL: ") as caught:
        load_settings()
    assert SECRET_PASSWORD not in str(caught.value)


def test_upstream_url_from_base(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_UPSTREAM_BASE_URL", "http://127.0.0.1:8000/v1/")
    assert load_settings().upstream_url == "http://127.0.0.1:8000/v1/chat/completions"


# --- .env and secrets ------------------------------------------------------------------------


def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "WORKER_CONCURRENCY=7\nWORKER_ALLOWED_MODELS=a,b\nWORKER_QUEUE_TYPE=classic\n"
    )
    settings = load_settings()
    assert settings.concurrency == 7
    assert settings.allowed_models == {"a", "b"}
    assert settings.queue_type == "classic"


def test_environment_wins_over_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WORKER_CONCURRENCY=7\n")
    monkeypatch.setenv("WORKER_CONCURRENCY", "9")
    assert load_settings().concurrency == 9


def test_secret_from_file(clean_env: Path) -> None:
    (clean_env / "WORKER_UPSTREAM_API_KEY").write_text(f"{SECRET_KEY}\n")
    (clean_env / "WORKER_AMQP_URL").write_text(f"amqp://u:{SECRET_PASSWORD}@rabbit:5672/\n")
    settings = load_settings()
    assert _secret(settings.upstream_api_key) == SECRET_KEY
    assert _secret(settings.amqp_url) == f"amqp://u:{SECRET_PASSWORD}@rabbit:5672/"


def test_missing_secrets_dir_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORKER_SECRETS_DIR", str(tmp_path / "nowhere"))
    assert load_settings().upstream_api_key is None


def test_secrets_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_UPSTREAM_API_KEY", SECRET_KEY)
    monkeypatch.setenv("WORKER_AMQP_URL", f"amqp://u:{SECRET_PASSWORD}@rabbit:5672/")
    settings = load_settings()
    assert _secret(settings.upstream_api_key) == SECRET_KEY
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert SECRET_KEY not in text
        assert SECRET_PASSWORD not in text


# --- bad values --------------------------------------------------------------------------------

BAD = [
    ("WORKER_CONCURRENCY", "lots"),
    ("WORKER_CONCURRENCY", "0"),
    ("WORKER_QUEUE_TYPE", "foo"),
    ("WORKER_AMQP_URL", "http://x"),
    ("WORKER_REPLY_TO_PATTERN", "("),
    ("WORKER_UPSTREAM_BASE_URL", "ftp://llm.example/v1"),
    ("WORKER_MAX_ATTEMPTS", "0"),
    ("WORKER_REQUEST_TIMEOUT", "0"),
    ("WORKER_STREAM_IDLE_TIMEOUT", "-1"),
    ("WORKER_STREAM_FLUSH_INTERVAL", "-0.1"),
    ("WORKER_HTTP_PORT", "70000"),
    ("WORKER_MAX_MESSAGE_BYTES", "0"),
    ("WORKER_LOG_FORMAT", "xml"),
    ("WORKER_LOG_LEVEL", "loud"),
    ("WORKER_DATABASE_URL", "mysql://db/gw"),
    ("WORKER_GATEWAY_PORT", "-1"),
    ("WORKER_GATEWAY_MAX_FILE_BYTES", "0"),
    ("WORKER_GATEWAY_RESULTS_QUEUE", ""),
    ("WORKER_GATEWAY_LEASE_SECONDS", "0"),
    ("WORKER_GATEWAY_CANCEL_GRACE", "-1"),
    ("WORKER_GATEWAY_PUBLISH_CHUNK", "0"),
    ("WORKER_GATEWAY_SWEEP_INTERVAL", "0"),
]


@pytest.mark.parametrize(("variable", "value"), BAD)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message


def test_bad_broker_url_does_not_leak_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_AMQP_URL", f"http://u:{SECRET_PASSWORD}@rabbit/")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert SECRET_PASSWORD not in str(caught.value)


def test_bad_value_in_dotenv_names_the_variable(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WORKER_QUEUE_TYPE=stream\n")
    with pytest.raises(SettingsError, match=r"^WORKER_QUEUE_TYPE: "):
        load_settings()


# --- the command line stops with one line and exit code 2 ------------------------------------


def _run_cli(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    clean.update(env, WORKER_SECRETS_DIR=str(tmp_path / "secrets"), OTEL_SDK_DISABLED="true")
    return subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "env"),
    [
        ("WORKER_CONCURRENCY", {"WORKER_CONCURRENCY": "lots"}),
        (
            "WORKER_AMQP_URL",
            {"WORKER_AMQP_URL": "http://x", "WORKER_UPSTREAM_BASE_URL": "http://u"},
        ),
        ("WORKER_UPSTREAM_BASE_URL", {}),
    ],
    ids=["bad-concurrency", "bad-amqp-url", "no-upstream"],
)
def test_cli_stops_with_one_line_and_code_2(
    tmp_path: Path, variable: str, env: dict[str, str]
) -> None:
    done = _run_cli(tmp_path, **env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert variable in lines[0]
    assert done.stdout == ""


# --- to_env: the same settings for a child process ----------------------------------------------


def test_to_env_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value, _, _ in FROM_ENV:
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("WORKER_REPLY_TO_PATTERN", r"replies\.\w+")
    original = load_settings()
    env = original.to_env()
    assert env["WORKER_UPSTREAM_API_KEY"] == SECRET_KEY  # a child process needs the real key
    assert env["WORKER_AMQP_URL"] == BROKER
    for name in list(os.environ):
        if name.startswith("WORKER_") and name != "WORKER_SECRETS_DIR":
            monkeypatch.delenv(name)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    assert load_settings() == original


def test_to_env_leaves_out_unset_values() -> None:
    env = load_settings().to_env()
    assert "WORKER_UPSTREAM_API_KEY" not in env
    assert "WORKER_UPSTREAM_BASE_URL" not in env
    assert "WORKER_REPLY_TO_PATTERN" not in env
    assert env["WORKER_CONCURRENCY"] == "64"
