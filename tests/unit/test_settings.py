"""Settings from the environment, ``.env`` and the secrets directory (contract §2)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from worker.settings import Lane, Settings, SettingsError, known_names, load_settings

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
    assert settings.consumer_timeout == 1800
    assert settings.publish_retry_window == 60
    assert settings.amqp_heartbeat == 10
    assert settings.allowed_models == frozenset()
    assert settings.reply_to_pattern is None
    assert settings.max_message_bytes == 10_485_760
    assert settings.http_port == 8080
    assert settings.log_format == "json"
    assert settings.log_level == "info"
    # v3 settings (§2), declared here so that a misspelling of them is caught
    assert settings.result_ttl == 86400
    assert settings.cache == "off"
    assert settings.cache_ttl == 3600
    assert settings.budgets_file is None
    assert settings.database_url.get_secret_value() == "sqlite:///chat-worker.db"
    assert (settings.gateway_host, settings.gateway_port) == ("127.0.0.1", 8000)
    assert settings.gateway_keys_file is None
    assert settings.gateway_batch_lane is None and settings.gateway_lane is None
    assert settings.gateway_max_file_bytes == 200 * 1024 * 1024
    assert settings.gateway_max_file_lines == 50_000
    assert settings.upstream_provider is None
    assert settings.consumer_timeout == 1800
    assert settings.amqp_heartbeat == 10
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
    ("WORKER_CONSUMER_TIMEOUT", "3600", "consumer_timeout", 3600.0),
    ("WORKER_PUBLISH_RETRY_WINDOW", "15", "publish_retry_window", 15.0),
    ("WORKER_AMQP_HEARTBEAT", "30", "amqp_heartbeat", 30),
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
    ("WORKER_CACHE", "ON", "cache", "on"),
    ("WORKER_CACHE_TTL", "60", "cache_ttl", 60.0),
    ("WORKER_BUDGETS_FILE", "/etc/budgets.yaml", "budgets_file", Path("/etc/budgets.yaml")),
    (
        "WORKER_DATABASE_URL",
        "postgresql://gw:pw@db/gw",
        "database_url",
        "postgresql://gw:pw@db/gw",
    ),
    ("WORKER_GATEWAY_HOST", "0.0.0.0", "gateway_host", "0.0.0.0"),
    ("WORKER_GATEWAY_PORT", "8443", "gateway_port", 8443),
    ("WORKER_GATEWAY_KEYS_FILE", "/etc/keys.yaml", "gateway_keys_file", Path("/etc/keys.yaml")),
    ("WORKER_GATEWAY_BATCH_LANE", "chat.batch", "gateway_batch_lane", "chat.batch"),
    ("WORKER_GATEWAY_LANE", "chat.interactive", "gateway_lane", "chat.interactive"),
    ("WORKER_GATEWAY_MAX_FILE_BYTES", "1000", "gateway_max_file_bytes", 1000),
    ("WORKER_GATEWAY_MAX_FILE_LINES", "10", "gateway_max_file_lines", 10),
    ("WORKER_UPSTREAM_PROVIDER", "anthropic", "upstream_provider", "anthropic"),
    ("WORKER_CONSUMER_TIMEOUT", "900", "consumer_timeout", 900.0),
    ("WORKER_AMQP_HEARTBEAT", "0", "amqp_heartbeat", 0),
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
    if variable == "WORKER_BUDGETS_FILE":  # budgets need the shared ledger
        monkeypatch.setenv("WORKER_REDIS_URL", "redis://127.0.0.1:6379/0")
    got = getattr(load_settings(), attribute)
    if attribute in ("amqp_url", "upstream_api_key", "redis_url", "console_token", "database_url"):
        got = _secret(got)
    assert got == expected


def test_every_setting_is_covered_by_a_test() -> None:
    tested = {variable for variable, *_ in FROM_ENV} | {"WORKER_REPLY_TO_PATTERN"}
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
    ("WORKER_CACHE", "maybe"),
    ("WORKER_RESULT_TTL", "-1"),
    ("WORKER_AMQP_HEARTBEAT", "-1"),
    ("WORKER_CONSUMER_TIMEOUT", "0"),
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


def test_item13_a_request_timeout_past_the_consumer_timeout_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKER_REQUEST_TIMEOUT", "1800")
    with pytest.raises(SettingsError, match=r"^WORKER_REQUEST_TIMEOUT must be below WORKER_CONS"):
        load_settings()
    monkeypatch.setenv("WORKER_CONSUMER_TIMEOUT", "3600")
    assert load_settings().request_timeout == 1800


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


def test_to_env_names_settings_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached property (the upstreams, once read) is no setting: a child process given
    WORKER_UPSTREAMS would refuse it as a misspelling."""
    monkeypatch.setenv("WORKER_UPSTREAM_BASE_URL", "http://llm.test/v1")
    settings = load_settings()
    assert settings.upstreams
    assert set(settings.to_env()) <= known_names()


def test_to_env_leaves_out_unset_values() -> None:
    env = load_settings().to_env()
    assert "WORKER_UPSTREAM_API_KEY" not in env
    assert "WORKER_UPSTREAM_BASE_URL" not in env
    assert "WORKER_REPLY_TO_PATTERN" not in env
    assert env["WORKER_CONCURRENCY"] == "64"


# --- issue 27 item 2: a misspelt setting is refused, not ignored -----------------------------


def test_item2_an_unknown_variable_names_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKER_CONCURENCY", "8")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value) == (
        "WORKER_CONCURENCY: not a setting; did you mean WORKER_CONCURRENCY?"
    )


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("WORKER_UPSTREAM_URL", "WORKER_UPSTREAM_BASE_URL"),
        ("WORKER_UPSTREAM_FILE", "WORKER_UPSTREAMS_FILE"),
        ("WORKER_ALLOWED_MODEL", "WORKER_ALLOWED_MODELS"),
        ("WORKER_CACHE_TL", "WORKER_CACHE_TTL"),  # a v3 setting: known by the model's fields
        ("worker_log_levl", "WORKER_LOG_LEVEL"),  # read case-insensitively, checked alike
    ],
)
def test_item2_every_misspelling_is_caught(
    monkeypatch: pytest.MonkeyPatch, name: str, closest: str
) -> None:
    monkeypatch.setenv(name, "x")
    with pytest.raises(SettingsError, match=f"did you mean {closest}\\?$"):
        load_settings()


def test_item2_a_misspelling_in_dotenv_is_caught(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WORKER_CONCURRENCY=7\nWORKER_QUEUE_TPYE=classic\n")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value) == (
        "WORKER_QUEUE_TPYE (in .env): not a setting; did you mean WORKER_QUEUE_TYPE?"
    )
    (tmp_path / ".env").write_text("WORKR_CONCURRENCY=7\nOTEL_SERVICE_NAME=x\n")
    with pytest.raises(SettingsError, match=r"^WORKR_CONCURRENCY \(in \.env\): not a setting"):
        load_settings()


def test_item2_secrets_dir_and_test_variables_are_no_mistake(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WORKER_TEST_AMQP_URL", "amqp://x/")
    monkeypatch.setenv("WORKER_TEST_REDIS_URL", "redis://x/")
    (tmp_path / ".env").write_text("OTEL_SERVICE_NAME=x\nPATH_EXTRA=y\n")
    assert load_settings().concurrency == 64  # WORKER_SECRETS_DIR is set by the fixture


def test_item2_the_known_names_are_the_settings_fields() -> None:
    assert known_names() == {f"WORKER_{name.upper()}" for name in Settings.model_fields} | {
        "WORKER_SECRETS_DIR"
    }


def test_item2_several_unknown_are_counted_on_the_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORKER_A", "WORKER_B", "WORKER_C"):
        monkeypatch.setenv(name, "1")
    with pytest.raises(
        SettingsError, match=r"^WORKER_A: .*\(2 more unknown: WORKER_B, WORKER_C\)$"
    ):
        load_settings()


COMMANDS = [
    ["run"],
    ["demo"],
    ["submit", "jobs.jsonl"],
    ["mock-upstream"],
    ["dlq", "list"],
    ["dlq", "replay", "--all"],
    ["console"],
    ["upstreams", "check"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_item2_every_command_stops_with_one_line_and_code_2(
    tmp_path: Path, command: list[str]
) -> None:
    (tmp_path / "jobs.jsonl").write_text("{}\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    clean.update(
        WORKER_SECRETS_DIR=str(tmp_path / "secrets"),
        WORKER_UPSTREAM_BASE_URL="http://127.0.0.1:9/v1",
        WORKER_CONCURENCY="8",
        OTEL_SDK_DISABLED="true",
    )
    done = subprocess.run(
        [sys.executable, "-m", "worker", *command],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "chat-worker: invalid setting WORKER_CONCURENCY: not a setting; "
        "did you mean WORKER_CONCURRENCY?"
    ]
