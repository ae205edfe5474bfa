"""The benchmark figures (bench/plots.py) draw from a run's JSON, alone or within run.py's."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("matplotlib")

PLOTS = Path(__file__).resolve().parents[2] / "bench" / "plots.py"
PNG = b"\x89PNG\r\n\x1a\n"


def load_plots() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_plots", PLOTS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def s5_data() -> dict[str, Any]:
    lanes = [0.5 + i / 1000 for i in range(200)]
    one_queue = [10.0 + i / 10 for i in range(200)]
    run = {"published": 200, "answered": 200}
    return {
        "runs": [
            {**run, "mode": "lanes", "p50": 0.6, "p99": 0.7, "waits": lanes},
            {
                **run,
                "mode": "one queue",
                "answered": 150,
                "p50": 20,
                "p99": 29.9,
                "waits": one_queue,
            },
        ],
        "split": {"interactive": 800, "batch": 200, "interactive_share": 0.8},
        "backlog": 3000,
        "rate": 20.0,
        "seconds": 10.0,
        "window": 8.0,
        "weights": [4, 1],
        "targets": {"p50": 0.6, "p99": 1.5, "split": 0.1},
    }


def s6_run(label: str, processes: int, budgeted: bool) -> dict[str, Any]:
    scenario = {
        "label": label,
        "processes": processes,
        "rpm": None,
        "tpm": None,
        "retry_after": True,
        "max_concurrent": None if budgeted else 8,
    }
    calls = [[i / 2, 14 * i + i // 4, i // 4] for i in range(24)]
    return {
        "label": label,
        "scenario": scenario,
        "jobs": 300,
        "ok": 300,
        "failed": 0,
        "calls": 310,
        "refused": 10,
        "seconds": 11.0,
        "calls_per_job": 310 / 300,
        "goodput": 0.95 if budgeted else None,
        "budget_jobs_per_s": 27.0 if budgeted else None,
        "codes": {},
        "first_result_s": 1.0,
        "ok_at": [[1 + i / 27, 370] for i in range(300)],
        "calls_at": calls,
    }


def s6_data() -> dict[str, Any]:
    return {
        "seconds": 10.0,
        "tpm": 600_000,
        "targets": {"goodput": 0.9, "calls_per_job": 1.1, "failed": 0},
        "runs": [s6_run("2proc-retry-after", 2, True), s6_run("4proc-redis", 4, False)],
    }


def test_run_json_draws_the_lanes_and_rate_limit_figures(tmp_path: Path) -> None:
    plots = load_plots()
    document = {
        "commit": "abc1234",
        "machine": {"cpus": 2, "python": "3.11", "load_avg": [0.5, 0.5, 0.5]},
        "sections": {"s5": s5_data(), "s6": s6_data()},
    }
    written = plots.write_plots(document, tmp_path)
    assert sorted(path.name for path in written) == ["s5-lanes.png", "s6-ratelimits.png"]
    for path in written:
        assert path.read_bytes().startswith(PNG)


def test_a_scenario_run_alone_draws_its_figure(tmp_path: Path) -> None:
    plots = load_plots()
    document = {"commit": "abc1234", "section": {"name": "s6", "rows": [], "data": s6_data()}}
    written = plots.write_plots(document, tmp_path)
    assert [path.name for path in written] == ["s6-ratelimits.png"]


def test_each_figure_names_the_machine_and_the_commit() -> None:
    plots = load_plots()
    label = plots.machine_label({"commit": "abc1234", "machine": {"cpus": 2, "python": "3.11"}})
    assert "2 CPUs" in label
    assert "commit abc1234" in label
