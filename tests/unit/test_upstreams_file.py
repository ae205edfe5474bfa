"""``WORKER_UPSTREAMS_FILE``: parsed and validated at start, keys resolved, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.settings import Settings, SettingsError

FULL = """\
upstreams:
  - name: openai
    base_url: https://api.openai.com/v1/
    api_key_env: TEST_OPENAI_KEY
    models: ["gpt-4o-mini", "gpt-4o"]
    limits: {{rpm: 3000, tpm: 1000000, max_concurrency: 200}}
  - name: azure-backup
    base_url: https://example.openai.azure.com/openai/deployments/gpt-4o-mini
    auth: api-key
    api_key_file: {key_file}
    query: {{api-version: "2024-10-21"}}
    headers: {{x-team: search}}
    models: ["gpt-4o-mini"]
    model_map: {{fast: gpt-4o-mini}}
    priority: 1
    weight: 2
    cooldown: {{failures: 5, seconds: 10}}
  - name: vllm
    base_url: http://vllm:8000/v1
    auth: none
    models: ["*"]
    priority: 2
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("WORKER_"):
            monkeypatch.delenv(name)
    (tmp_path / "secrets").mkdir()
    monkeypatch.setenv("WORKER_SECRETS_DIR", str(tmp_path / "secrets"))
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-openai-secret\n")


def settings_for(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "upstreams.yaml"
    path.write_text(text)
    return Settings(_env_file=None, upstreams_file=path)  # type: ignore[call-arg]


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(SettingsError) as caught:
        _ = settings_for(tmp_path, text).upstreams
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"WORKER_UPSTREAMS_FILE {tmp_path / 'upstreams.yaml'}")
    return message


def test_a_full_file_reads_with_keys_from_env_and_file(tmp_path: Path) -> None:
    key_file = tmp_path / "azure-key"
    key_file.write_text("azure-secret\n")
    openai, azure, vllm = settings_for(tmp_path, FULL.format(key_file=key_file)).upstreams
    assert openai.base_url == "https://api.openai.com/v1"
    assert openai.url == "https://api.openai.com/v1/chat/completions"
    assert openai.api_key is not None and openai.api_key.get_secret_value() == "sk-openai-secret"
    assert openai.auth == "bearer" and openai.limits.rpm == 3000
    assert openai.cooldown.failures == 3 and openai.cooldown.seconds == 30  # the defaults
    assert azure.api_key is not None and azure.api_key.get_secret_value() == "azure-secret"
    assert azure.auth == "api-key" and azure.query == {"api-version": "2024-10-21"}
    assert azure.serves("fast") and azure.upstream_model("fast") == "gpt-4o-mini"
    assert azure.priority == 1 and azure.weight == 2 and azure.cooldown.failures == 5
    assert vllm.api_key is None and vllm.serves("whatever")
    assert "secret" not in repr(openai) and "secret" not in repr(azure)


def test_without_a_file_the_single_upstream_is_a_pool_of_one() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        upstream_base_url="http://127.0.0.1:8000/v1",
        upstream_api_key="sk-1",
        upstream_rpm=60,
        upstream_max_concurrency=4,
    )
    (only,) = settings.upstreams
    assert only.name == "default" and only.models == ["*"] and only.auth == "bearer"
    assert only.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert only.api_key is not None and only.api_key.get_secret_value() == "sk-1"
    assert only.limits.rpm == 60 and only.limits.max_concurrency == 4


def test_neither_file_nor_base_url_names_both_variables() -> None:
    with pytest.raises(SettingsError, match=r"WORKER_UPSTREAM_BASE_URL.*WORKER_UPSTREAMS_FILE"):
        _ = Settings(_env_file=None).upstreams  # type: ignore[call-arg]


def test_a_key_from_the_secrets_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secrets" / "GROQ_KEY").write_text("gsk-from-file\n")
    text = "upstreams:\n  - {name: groq, base_url: 'https://api.groq.com/openai/v1',"
    text += " api_key_env: GROQ_KEY, models: ['*']}\n"
    (groq,) = settings_for(tmp_path, text).upstreams
    assert groq.api_key is not None and groq.api_key.get_secret_value() == "gsk-from-file"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("upstreams: [", "line 1: expected the node content"),
        ("- just a list\n", "document: Input should be a valid dictionary"),
        ("upstreams: []\n", "upstreams: List should have at least 1 item"),
        (
            "upstreams:\n  - name: Open AI\n    base_url: https://x/v1\n    models: [a]\n",
            "line 2: upstreams[0].name: String should match pattern",
        ),
        (
            "upstreams:\n  - name: a\n    base_url: ftp://x\n    models: [a]\n",
            "line 3: upstreams[0].base_url: must start with http:// or https://",
        ),
        (
            "upstreams:\n  - name: a\n    base_url: https://x/v1\n    models: [a]\n"
            "    priorty: 1\n",
            "line 5: upstreams[0].priorty: Extra inputs are not permitted",
        ),
        (
            "upstreams:\n  - name: a\n    base_url: https://x/v1\n    models: [a]\n"
            "    auth: basic\n",
            "upstreams[0].auth: Input should be 'bearer', 'api-key' or 'none'",
        ),
        (
            "upstreams:\n  - name: a\n    base_url: https://x/v1\n    models: [a]\n"
            "    api_key: sk-inline\n",
            "upstreams[0]: api_key: keys come from api_key_env or api_key_file",
        ),
        (
            "upstreams:\n  - name: a\n    base_url: https://x/v1\n    models: [a]\n"
            "    headers: {Authorization: Bearer sk-inline}\n",
            "upstreams[0].headers: put the key in api_key_env or api_key_file",
        ),
        (
            "upstreams:\n  - name: a\n    base_url: https://x/v1\n",
            'upstreams[0]: models: name at least one model (or "*")',
        ),
        (
            "upstreams:\n  - name: a\n    base_url: https://x/v1\n    models: [a]\n"
            "    limits: {rpm: 0}\n",
            "line 5: upstreams[0].limits.rpm: Input should be greater than or equal to 1",
        ),
        (
            "upstreams:\n  - name: a\n    base_url: https://x/v1\n    models: [a]\n    weight: 0\n",
            "upstreams[0].weight: Input should be greater than 0",
        ),
        (
            "upstreams:\n  - name: a\n    base_url: https://x/v1\n    models: [a]\n"
            "    endpoints: [chat, completions]\n",
            "line 5: upstreams[0].endpoints[1]: Input should be 'chat' or 'embeddings'",
        ),
        (
            "upstreams:\n  - name: a\n    base_url: https://x/v1\n    models: [a]\n"
            "    endpoints: []\n",
            "upstreams[0].endpoints: List should have at least 1 item",
        ),
        (
            "upstreams:\n  - {name: a, base_url: 'https://x/v1', models: [a]}\n"
            "  - {name: a, base_url: 'https://y/v1', models: [b]}\n",
            "upstreams: Value error, names must be unique: a repeated",
        ),
        (
            "upstreams:\n  - {name: a, base_url: 'https://x/v1', models: [a],"
            " api_key_env: X, api_key_file: /y}\n",
            "upstreams[0]: give api_key_env or api_key_file, not both",
        ),
    ],
)
def test_a_bad_file_is_one_line_naming_the_place(tmp_path: Path, text: str, expected: str) -> None:
    message = error_for(tmp_path, text)
    assert expected.removeprefix("upstreams: Value error, ") in message, message


ONE = "upstreams:\n  - name: a\n    base_url: https://x/v1\n    models: [a]\n"


# Issue 22 item 18: files that load but cannot be right are refused like other bad files.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ONE + "    weight: .inf\n", "line 5: upstreams[0].weight: Input should be a finite"),
        (ONE + "    weight: .nan\n", "line 5: upstreams[0].weight: Input should be a finite"),
        (
            ONE + "    cooldown: {seconds: .inf}\n",
            "line 5: upstreams[0].cooldown.seconds: Input should be a finite number",
        ),
        (
            ONE + "    weight: 2\n    priority: 1\n    weight: 5\n",
            "line 7: duplicate key 'weight' (first on line 5)",
        ),
        (
            "upstreams:\n  - {name: a, base_url: 'https://x/v1', models: [a], name: b}\n",
            "line 2: duplicate key 'name' (first on line 2)",
        ),
        (
            "upstreams:\n  - name: a\n    base_url: https://x/v1\n    models: [a]\n"
            "upstreams:\n  - name: b\n    base_url: https://y/v1\n    models: [b]\n",
            "line 5: duplicate key 'upstreams' (first on line 1)",
        ),
        (
            'upstreams:\n  - name: a\n    base_url: "http://"\n    models: [a]\n',
            "line 3: upstreams[0].base_url: names no host",
        ),
        (
            'upstreams:\n  - name: a\n    base_url: "https://:443/v1"\n    models: [a]\n',
            "line 3: upstreams[0].base_url: names no host",
        ),
        (
            'upstreams:\n  - name: a\n    base_url: "http://x:99999/v1"\n    models: [a]\n',
            "line 3: upstreams[0].base_url: not a URL",
        ),
    ],
    ids=[
        "weight-inf",
        "weight-nan",
        "cooldown-inf",
        "dup-key",
        "dup-flow",
        "dup-top",
        "no-host",
        "no-host-port",
        "bad-port",
    ],
)
def test_item18_a_file_that_loads_but_cannot_be_right_is_refused(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert expected in error_for(tmp_path, text)


def test_item18_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    ok = "upstreams:\n  - &first {name: a, base_url: 'https://x/v1', models: [a], weight: 1}\n"
    ok += "  - <<: *first\n    name: b\n    weight: 3\n"
    specs = settings_for(tmp_path, ok).upstreams
    assert [(spec.name, spec.weight) for spec in specs] == [("a", 1.0), ("b", 3.0)]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("    weight: .inf\n", "line 5: upstreams[0].weight: Input should be a finite number"),
        ("    weight: 1\n    weight: 2\n", "line 6: duplicate key 'weight' (first on line 5)"),
    ],
    ids=["weight-inf", "dup-key"],
)
def test_item18_the_cli_refuses_with_one_line_and_exit_2(
    tmp_path: Path, extra: str, expected: str
) -> None:
    path = tmp_path / "upstreams.yaml"
    path.write_text(ONE + extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env |= {"WORKER_UPSTREAMS_FILE": str(path), "WORKER_SECRETS_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "worker", "upstreams", "check"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"chat-worker: invalid setting WORKER_UPSTREAMS_FILE {path} {expected}"
    ]


def test_item18_the_single_upstream_url_needs_a_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import load_settings

    monkeypatch.setenv("WORKER_UPSTREAM_BASE_URL", "http://")
    with pytest.raises(SettingsError, match=r"^WORKER_UPSTREAM_BASE_URL: .*names no host"):
        load_settings()


def test_a_missing_key_variable(tmp_path: Path) -> None:
    text = "upstreams:\n  - {name: a, base_url: 'https://x/v1', models: [a], api_key_env: NOPE}\n"
    message = error_for(tmp_path, text)
    assert "upstream 'a': api_key_env NOPE is not set" in message


def test_an_unreadable_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-key"
    text = "upstreams:\n  - {name: a, base_url: 'https://x/v1', models: [a], "
    text += f"api_key_file: '{missing}'}}\n"
    message = error_for(tmp_path, text)
    assert f"upstream 'a': api_key_file {missing}: cannot read: No such file" in message


def test_an_empty_key_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty-key"
    empty.write_text("\n")
    text = "upstreams:\n  - {name: a, base_url: 'https://x/v1', models: [a], "
    text += f"api_key_file: '{empty}'}}\n"
    assert "is empty" in error_for(tmp_path, text)


def test_a_missing_file(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, upstreams_file=tmp_path / "nope.yaml")  # type: ignore[call-arg]
    with pytest.raises(SettingsError, match=r"nope.yaml: cannot read: No such file"):
        _ = settings.upstreams


@pytest.mark.parametrize("command", [["run"], ["upstreams", "check"]])
def test_the_cli_stops_with_one_line_and_exit_2(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "upstreams.yaml"
    path.write_text("upstreams:\n  - name: a\n    base_url: https://x/v1\n    modles: [a]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "OTEL_SDK"}
    env |= {"WORKER_UPSTREAMS_FILE": str(path), "WORKER_SECRETS_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "worker", *command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0] == (
        f"chat-worker: invalid setting WORKER_UPSTREAMS_FILE {path} line 4: "
        "upstreams[0].modles: Extra inputs are not permitted"
    )


def test_the_cli_never_prints_a_key(tmp_path: Path) -> None:
    """A key variable that is missing is named; a key that is present is never printed."""
    path = tmp_path / "upstreams.yaml"
    path.write_text(
        "upstreams:\n  - {name: a, base_url: 'http://127.0.0.1:9/v1', models: [m],"
        " api_key_env: TEST_OPENAI_KEY}\n  - {name: b, base_url: 'http://127.0.0.1:9/v1',"
        " models: [m], api_key_env: MISSING_KEY}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env |= {"WORKER_UPSTREAMS_FILE": str(path), "WORKER_SECRETS_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "worker", "upstreams", "check"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "MISSING_KEY is not set" in done.stderr
    assert "sk-openai-secret" not in done.stderr + done.stdout


def test_endpoints_default_to_both_and_restrict_routing(tmp_path: Path) -> None:
    text = (
        "upstreams:\n"
        "  - {name: both, base_url: 'https://a/v1', models: ['*']}\n"
        "  - {name: vectors, base_url: 'https://b/v1', models: [e5], endpoints: [embeddings]}\n"
        "  - {name: talk, base_url: 'https://c/v1', models: [e5], endpoints: [chat]}\n"
    )
    both, vectors, talk = settings_for(tmp_path, text).upstreams
    assert both.endpoints == ["chat", "embeddings"]
    assert both.serves("e5") and both.serves("e5", "embeddings")
    assert vectors.endpoints == ["embeddings"]
    assert vectors.serves("e5", "embeddings") and not vectors.serves("e5", "chat")
    assert talk.serves("e5") and not talk.serves("e5", "embeddings")
