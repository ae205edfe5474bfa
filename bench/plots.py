"""The figures of a benchmark run as PNG files (matplotlib), each naming the machine and the
commit: ``python bench/plots.py bench/results/run-<time>.json [--out docs/bench]``.

``bench/run.py`` calls :func:`write_plots` after every run; a figure whose scenario was not
run is left as it was.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench"


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"{head}{'+dirty' if dirty else ''}"


def machine_label(document: dict[str, Any]) -> str:
    machine = document.get("machine") or {}
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "?"
    load = machine.get("load_avg")
    load_text = f", load {load[0]:.1f}" if load else ""
    return (
        f"{platform.node()}: {cpu}, {machine.get('cpus', '?')} CPUs{load_text}, "
        f"Python {machine.get('python', '?')}; commit {document.get('commit') or commit()}"
    )


def write_plots(document: dict[str, Any], out: Path = OUT) -> list[Path]:
    """Every figure the run's sections allow; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    sections = document.get("sections") or {}
    label = machine_label(document)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.text(0.01, 0.005, label, fontsize=7, color="0.35")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if s2 := sections.get("s2"):
        levels = sorted(s2["levels"].items(), key=lambda kv: int(kv[0]))
        xs = [int(c) for c, _ in levels]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(xs, [lv["run"]["rate"] for _, lv in levels], "o-", label="worker")
        ax.plot(xs, [lv["bound"] for _, lv in levels], "s--", label="bound: min(Little, S1)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrency (jobs in flight)")
        ax.set_ylabel("jobs/s")
        ax.set_title(f"S2: throughput against concurrency (upstream latency {s2['latency']} s)")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "s2-throughput.png")

    if s3 := sections.get("s3"):
        levels = sorted(s3["levels"].items(), key=lambda kv: int(kv[0]))
        xs = [int(c) for c, _ in levels]
        fig, (cpu, lat) = plt.subplots(1, 2, figsize=(11, 4))
        for who, color, line in (("worker", "tab:blue", "-"), ("raw", "tab:orange", "--")):
            cpu.plot(
                xs,
                [lv[who]["cpu_us_per_chunk"] for _, lv in levels],
                marker="o",
                ls=line,
                color=color,
                label=who,
            )
            for q, mark in (("p50", "o"), ("p99", "^")):
                lat.plot(
                    xs,
                    [lv[who]["first_delta_added_ms"][q] for _, lv in levels],
                    marker=mark,
                    ls=line,
                    color=color,
                    alpha=1.0 if q == "p50" else 0.6,
                    label=f"{who} {q}",
                )
        cpu.axhline(25, color="red", lw=0.8, ls=":", label="target (worker)")
        cpu.set_title("S3: CPU per upstream chunk")
        cpu.set_ylabel("µs of process CPU per chunk")
        lat.axhline(5, color="red", lw=0.8, ls=":", label="target p50")
        lat.axhline(20, color="darkred", lw=0.8, ls=":", label="target p99")
        lat.set_title("S3: time added to the first delta")
        lat.set_ylabel("ms")
        lat.set_yscale("log")
        for ax in (cpu, lat):
            ax.set_xlabel("concurrent streams")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "s3-streams.png")

    if latency := sections.get("latency"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for who, name in (
            ("direct", "direct HTTP call"),
            ("bare", "bare broker loop"),
            ("worker", "worker path"),
        ):
            samples = sorted(latency[who]["all"])
            if samples:
                ys = [(i + 1) / len(samples) for i in range(len(samples))]
                ax.plot(samples, ys, label=f"{name} (p50 {latency[who]['p50']:.2f} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("ms, publish to reply (direct: request to answer)")
        ax.set_ylabel("share of jobs (CDF)")
        ax.set_title(
            "Added latency at low load: worker's own share "
            f"{latency['share_p50_ms']:.2f} ms p50 (target 0.5)"
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "added-latency.png")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a bench/results/run-*.json")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    for path in write_plots(orjson.loads(args.run.read_bytes()), args.out):
        print(path)


if __name__ == "__main__":
    main()
