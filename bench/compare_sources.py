"""The S1 worker (plain jobs, zero-latency mock, c=64) from several versions of the code, side
by side in one invocation: what a change costs a job in CPU.

Each ``--ref`` is a git revision of this repository, exported to a temporary folder and put
first on the worker processes' ``PYTHONPATH``; ``--ref .`` is the working tree as installed.

    .venv/bin/python bench/compare_sources.py --ref main --ref . --jobs 5000 --repeat 3
"""

from __future__ import annotations

import argparse
import subprocess
import tarfile
import tempfile
from pathlib import Path

from common import BENCH, chat_worker, run_main
from measure import Setup, measure_each, median_run
from report import Row, table, write_json

ROOT = BENCH.parent


def export(ref: str, into: Path) -> str:
    """The ``worker`` package of ``ref`` under ``into``; returns the PYTHONPATH entry."""
    folder = into / ref.replace("/", "_")
    folder.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "worker"],
        check=True,
        capture_output=True,
    ).stdout
    tar = folder / "worker.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as opened:
        opened.extractall(folder, filter="data")
    return str(folder)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as scratch:
        setups = []
        for ref in args.ref:
            env = {} if ref == "." else {"PYTHONPATH": export(ref, Path(scratch))}
            setups.append(
                (Setup(f"s1-{ref}", args.jobs, timeout=args.timeout), chat_worker(64, **env))
            )
        runs = await measure_each(setups, args.repeat)
    rows = []
    for ref in args.ref:
        done = runs[f"s1-{ref}"]
        cpu = sorted(run.cpu_us_per_job for run in done)
        rows.append(
            Row(
                f"S1 worker at {ref}",
                median_run(done).rate,
                cpu_us_per_job=cpu[(len(cpu) - 1) // 2],
            )
        )
        print(
            f"{ref}: " + ", ".join(f"{r.rate:.0f} jobs/s {r.cpu_us_per_job:.0f} us" for r in done)
        )
    print(table(rows))
    print(write_json("compare_sources", {"args": vars(args), "runs": runs}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", action="append", required=True, help="git revision, or '.'")
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240.0)
    run_main(main(parser.parse_args()))
