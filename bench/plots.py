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
    if single := document.get("section"):  # a scenario run alone (s5_lanes.py, s6_ratelimits.py)
        sections = {single["name"]: single["data"]}
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
        paired = latency.get("share_paired_p50_ms")
        ax.set_title(
            "Added latency at low load: worker's own share p50 (target 0.5)\n"
            f"{latency['share_p50_ms']:.2f} ms from the p50s"
            + (f", {paired:.2f} ms paired per round" if paired is not None else ""),
            fontsize=10,
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "added-latency.png")

    if s5 := sections.get("s5"):
        save(_lanes(plt, s5), "s5-lanes.png")

    if s6 := sections.get("s6"):
        save(_rate_limits(plt, s6), "s6-ratelimits.png")
    return written


def _lanes(plt: Any, s5: dict[str, Any]) -> Any:
    """S5: interactive publish-to-result CDFs, lanes against one queue; the saturated split."""
    targets = s5.get("targets") or {"p50": 0.6, "p99": 1.5, "split": 0.10}
    weights = s5.get("weights") or (4, 1)
    fig, (both, zoom, split_ax) = plt.subplots(
        1, 3, figsize=(14, 4.4), gridspec_kw={"width_ratios": (1.45, 1.2, 0.75)}
    )
    lanes_waits: list[float] = []
    for run, color in zip(s5["runs"], ("tab:blue", "tab:orange"), strict=False):
        waits = run.get("waits") or []
        if not waits:
            continue
        if run["mode"] == "lanes":
            lanes_waits = waits
        ys = [(i + 1) / len(waits) for i in range(len(waits))]
        missing = run["published"] - run["answered"]
        bound = "≥ " if missing else ""
        label = f"{run['mode']}: p50 {bound}{run['p50']:.2f} s, p99 {bound}{run['p99']:.2f} s"
        if missing:
            label += f"\n({missing:,} of {run['published']:,} unanswered: their wait so far)"
        both.plot(waits, ys, color=color, label=label)
        if run["mode"] == "lanes":
            zoom.plot(waits, ys, color=color, label=label)
    for ax in (both, zoom):
        for q, key, color in ((0.5, "p50", "red"), (0.99, "p99", "darkred")):
            limit = targets[key]
            ax.plot([limit, limit], [0, q], color=color, lw=0.8, ls=":")
            label = f"target {key} ≤ {limit:g} s"
            ax.plot([limit], [q], marker="o", mfc="none", color=color, ls="none", label=label)
            ax.axhline(q, color="0.6", lw=0.5, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("seconds, publish to result" + (" (log scale)" if ax is both else ""))
        ax.grid(alpha=0.3, which="both")
    both.set_xscale("log")
    both.set_ylabel("share of interactive jobs (CDF)")
    both.set_title(
        f"S5: interactive jobs at {s5.get('rate', 20):g}/s behind {s5['backlog']:,} batch jobs",
        fontsize=10,
    )
    both.legend(fontsize=7, loc="center", bbox_to_anchor=(0.5, 0.45))
    if lanes_waits:
        zoom.set_xlim(min(lanes_waits) * 0.95, max(targets["p99"] * 1.15, lanes_waits[-1] * 1.02))
    zoom.set_title("with lanes, against the targets", fontsize=10)
    zoom.legend(fontsize=7, loc="center right")

    split = s5["split"]
    expected = weights[0] / sum(weights)
    share = split["interactive_share"]
    low, high = expected * (1 - targets["split"]), expected * (1 + targets["split"])
    bars = (
        (f"measured\n({split['interactive']:,} + {split['batch']:,} jobs)", share),
        (f"weights\n{weights[0]} : {weights[1]}", expected),
    )
    for x, (_, value) in enumerate(bars):
        first = x == 0
        split_ax.bar(x, value, color="tab:blue", width=0.6, label="interactive" if first else None)
        split_ax.bar(
            x, 1 - value, bottom=value, color="0.75", width=0.6, label="batch" if first else None
        )
        split_ax.text(x, value / 2, f"{value:.3f}", ha="center", color="white", fontsize=9)
    split_ax.axhspan(low, high, color="red", alpha=0.12, label=f"target {low:.2f} to {high:.2f}")
    split_ax.axhline(expected, color="red", lw=0.8, ls=":")
    split_ax.set_xticks(range(len(bars)), [name for name, _ in bars], fontsize=8)
    split_ax.set_ylim(0, 1)
    split_ax.set_ylabel("share of jobs completed")
    window = s5.get("window")
    split_ax.set_title(
        "both lanes saturated" + (f", {window:g} s window" if window else ""), fontsize=10
    )
    split_ax.legend(fontsize=7, loc="upper right")
    return fig


def _scenario_name(scenario: dict[str, Any]) -> str:
    procs = f"{scenario['processes']} proc."
    if scenario.get("max_concurrent") is not None:
        return f"{procs},\nno headers,\n{scenario['max_concurrent']} at once (Redis)"
    return f"{procs},\n{'' if scenario.get('retry_after', True) else 'no '}retry-after"


def _rates(
    samples: list[list[float]], span: int = 2
) -> tuple[list[float], list[float], list[float]]:
    """Admitted calls/s and 429s/s from the simulator's cumulative counters."""
    ts, admitted, refused = [], [], []
    for before, after in zip(samples, samples[span:], strict=False):
        dt = after[0] - before[0]
        if dt <= 0:
            continue
        ts.append((before[0] + after[0]) / 2)
        refused.append((after[2] - before[2]) / dt)
        admitted.append(((after[1] - after[2]) - (before[1] - before[2])) / dt)
    return ts, admitted, refused


def _windowed(
    events: list[list[float]], window: float = 1.0, step: float = 0.5
) -> tuple[list[float], list[float]]:
    """``[time, amount]`` events as amount per second over sliding windows."""
    last = max(at for at, _ in events)
    ts, rates = [], []
    t = window / 2
    while t - window / 2 <= last:
        low, high = t - window / 2, t + window / 2
        ts.append(t)
        rates.append(sum(amount for at, amount in events if low < at <= high) / window)
        t += step
    return ts, rates


def _rate_limits(plt: Any, s6: dict[str, Any]) -> Any:
    """S6: goodput, calls per job and failed jobs per scenario; calls/s against the budget."""
    targets = s6.get("targets") or {"goodput": 0.9, "calls_per_job": 1.1, "failed": 0}
    runs = s6["runs"]
    names = [_scenario_name(run["scenario"]) for run in runs]
    colors = [f"C{i}" for i in range(len(runs))]
    xs = list(range(len(runs)))
    fig = plt.figure(figsize=(12, 11))
    grid = fig.add_gridspec(3, 3, height_ratios=(1, 0.9, 0.9))
    panels = (
        ("goodput", "goodput (jobs/s that succeeded ÷ budget)", targets["goodput"], "≥"),
        ("calls_per_job", "upstream calls per job (429s included)", targets["calls_per_job"], "≤"),
        ("failed", "jobs failed", targets["failed"], "≤"),
    )
    for column, (key, title, target, sign) in enumerate(panels):
        ax = fig.add_subplot(grid[0, column])
        values = [run[key] for run in runs]
        heights = [v if v is not None else 0.0 for v in values]
        ax.bar(xs, heights, color=colors, width=0.65)
        for x, run, value in zip(xs, runs, values, strict=True):
            if value is None:  # no budget to divide by: the rate it ran at instead
                rate = run["ok"] / run["seconds"] if run["seconds"] else 0.0
                text = f"no budget\n{rate:.0f} jobs/s"
            else:
                text = f"{value:.2f}" if key != "failed" else f"{value:g}"
            y = (value or 0) + max(heights) * 0.02
            ax.text(x, y, text, ha="center", va="bottom", fontsize=7)
        ax.axhline(target, color="red", lw=1, ls=":", label=f"target {sign} {target:g}")
        if key == "goodput":
            ax.set_ylim(0, 1.3)
        elif key == "calls_per_job":
            ax.set_ylim(0, max(1.45, max(heights) * 1.3))
        else:
            ax.set_ylim(0, max(1.0, max(heights) * 1.3))
        ax.set_xticks(xs, names, fontsize=6.5)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3, axis="y")

    calls = fig.add_subplot(grid[1, :])
    tokens = fig.add_subplot(grid[2, :], sharex=calls)
    top = {"calls": 1.0, "tokens": 1.0}
    for run, color, name in zip(runs, colors, names, strict=True):
        label = " ".join(name.split())
        budgeted = run["budget_jobs_per_s"] is not None
        ts, admitted, refused = _rates(run.get("calls_at") or [])
        if ts:
            calls.plot(ts, admitted, color=color, ls="-" if budgeted else "--", lw=1.2, label=label)
            hits = [(t, r) for t, r in zip(ts, refused, strict=True) if r > 0]
            if hits:
                xs_hit, ys_hit = zip(*hits, strict=True)
                calls.plot(xs_hit, ys_hit, "x", color=color, ms=6, mew=1.5)
            top["calls"] = max(top["calls"], *admitted)
        done = [at for at in run.get("ok_at") or [] if isinstance(at, list)]
        # Tokens bind in the runs whose headers give the minute's budget; requests bind in
        # the ``window`` runs (a quantising provider), so their tokens are not drawn.
        tokens_bind = run.get("scenario", {}).get("report", "minute") == "minute"
        if budgeted and done and tokens_bind:
            ts, per_s = _windowed(done)
            tokens.plot(ts, per_s, color=color, lw=1.2, label=label)
            top["tokens"] = max(top["tokens"], *per_s)
    budget_jobs = {round(r["budget_jobs_per_s"], 1) for r in runs if r["budget_jobs_per_s"]}
    for budget in sorted(budget_jobs):
        label = f"budget ÷ mean job: {budget:g} calls/s"
        calls.axhline(budget, color="black", lw=1, ls=":", label=label)
    calls.plot([], [], "x", color="0.3", mew=1.5, label="429s/s (when any)")
    calls.set_ylabel("calls/s admitted")
    calls.set_title(
        "upstream calls the provider admitted per second (1 s windows) and its 429s", fontsize=10
    )
    calls.set_ylim(0, top["calls"] * 1.45)
    calls.legend(fontsize=7, loc="upper center", ncol=3)
    if tpm := s6.get("tpm"):
        label = f"budget: {tpm:,} tokens/min = {tpm / 60:,.0f} tokens/s"
        tokens.axhline(tpm / 60, color="black", lw=1, ls=":", label=label)
    tokens.set_ylabel("tokens/s")
    tokens.set_title(
        "tokens the provider counted for the calls that succeeded, per second (1 s windows, "
        "at each result's arrival), against the budget that binds",
        fontsize=10,
    )
    tokens.set_ylim(0, top["tokens"] * 1.45)
    tokens.legend(fontsize=7, loc="upper center", ncol=3)
    tokens.set_xlabel("seconds since the workers started")
    for ax in (calls, tokens):
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"S6: worker processes sharing one organisation's rate limits "
        f"({s6.get('seconds', '?'):g} s of budget a run; mixed prompts, 1 in 5 streamed)",
        fontsize=11,
    )
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a bench/results/run-*.json")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    for path in write_plots(orjson.loads(args.run.read_bytes()), args.out):
        print(path)


if __name__ == "__main__":
    main()
