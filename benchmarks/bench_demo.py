"""``hsstar demo`` timed against the hsstar-only demo it replaced, side by side on one machine.

The demo used to run hsstar alone on 256 problems per iteration; it now runs hsstar and then uniform, each on
128 problems per iteration, from the same M_0 on the same problems. The old demo is the new code with
``--methods hsstar --problems-per-iteration 256``: the same work. The two run in turn (``--rounds`` times, the order
alternating), each in a fresh process with the machine's torch threads; the record keeps every time and the new
demo's held-out accuracy per iteration, and the report (a section of docs/benchmarks.md and the demo's line in
README.md) is generated from the record alone.

    python benchmarks/bench_demo.py                  # one round each (about 6 minutes on 2 cores)
    python benchmarks/bench_demo.py --report-only    # regenerate the report from the record
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import git_commit, machine, portable_command, publish, republish

ROOT = Path(__file__).resolve().parents[1]
MARKS = ("<!-- bench_demo:start -->", "<!-- bench_demo:end -->")
README_MARKS = ("<!-- bench_demo:readme:start -->", "<!-- bench_demo:readme:end -->")
SIDES = {
    "before: hsstar only, 256 problems per iteration": [
        "--methods",
        "hsstar",
        "--problems-per-iteration",
        "256",
    ],
    "now: hsstar and uniform, 128 problems per iteration each": [],
}
NOW = "now: hsstar and uniform, 128 problems per iteration each"
CLI = "import sys; from trl_hsstar.cli import main; sys.exit(main())"
LIMIT = 1.6
"""The most the side-by-side demo may take, as a multiple of the hsstar-only demo's time."""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=1, help="runs of each side, alternating")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "bench_demo.json"))
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--report-only", action="store_true", help="regenerate the report from the record")
    return p


def measure(rounds: int) -> dict:
    """Each side ``rounds`` times, in turn; seconds per run and the last run's results of each side."""
    times = {side: [] for side in SIDES}
    results = {}
    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    try:
        for r in range(rounds):
            order = list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]
            for side in order:
                out = work / f"run-{len(times[side])}-{list(SIDES).index(side)}"
                cmd = [sys.executable, "-c", CLI, "demo", "--output-dir", str(out), *SIDES[side]]
                start = time.monotonic()
                with open(work / "log.txt", "w") as log:
                    done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
                times[side].append(round(time.monotonic() - start, 1))
                if done.returncode:
                    raise SystemExit(f"{side}: the demo failed:\n" + (work / "log.txt").read_text()[-3000:])
                results[side] = json.loads((out / "results.json").read_text())
                print(f"{side}: {times[side][-1]} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    curves = {
        method: [run["initial"]["all"], *(it["held_out"]["all"] for it in run["iterations"])]
        for method, run in results[NOW]["methods"].items()
    }
    return {"seconds": times, "curves": curves, "torch_threads": results[NOW]["torch_threads"]}


def render(record: dict) -> tuple[str, str]:
    """The docs section and the README's line, from the record alone."""
    seconds = {side: statistics.median(v) for side, v in record["seconds"].items()}
    before, now = (seconds[side] for side in SIDES)
    ratio = now / before
    curves = record["curves"]
    methods = list(curves)
    lines = [
        MARKS[0],
        "",
        "## `hsstar demo`: hsstar beside uniform (`benchmarks/bench_demo.py`)",
        "",
        f"Command: `{record['command']}`. Commit `{record['commit']}`; machine: {record['machine']}; "
        f"torch threads {record['torch_threads']}; load average at start {record['load_average']}.",
        "",
        "The demo runs hsstar, then uniform, from the same M_0 on the same problems at the same budget. Time, each "
        "side in a fresh process, in turn (the hsstar-only demo it replaced is the same code with "
        "`--methods hsstar --problems-per-iteration 256`):",
        "",
        "| demo | runs | seconds (median) | against the hsstar-only demo |",
        "|---|---:|---:|---:|",
        *(
            f"| {side} | {len(record['seconds'][side])} | {seconds[side]:.1f} | {seconds[side] / before:.2f}x |"
            for side in SIDES
        ),
        "",
        f"Target: at most {LIMIT}x: **{'met' if ratio <= LIMIT else 'not met'}** ({ratio:.2f}x).",
        "",
        "Held-out greedy accuracy (all levels) of the side-by-side demo, one seed:",
        "",
        "| after iteration | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
        *(
            f"| {'M_0' if i == 0 else i} | " + " | ".join(f"{curves[m][i]:.3f}" for m in methods) + " |"
            for i in range(len(curves[methods[0]]))
        ),
        "",
        MARKS[1],
    ]
    finals = " and ".join(f"{m} {' → '.join(f'{v:.3f}' for v in curves[m][1:])}" for m in methods)
    readme = (
        f"{README_MARKS[0]}\nOn {record['machine']} (commit `{record['commit']}`, {record['torch_threads']} torch threads) "
        f"it took {now:.0f} s, {ratio:.2f}x the hsstar-only demo it replaced, measured side by side; held-out accuracy "
        f"went from {curves[methods[0]][0]:.3f} (M_0) to {finals} over its {len(curves[methods[0]]) - 1} iterations "
        "([record](docs/benchmarks.md#hsstar-demo-hsstar-beside-uniform-benchmarksbench_demopy)).\n"
        f"{README_MARKS[1]}"
    )
    return "\n".join(lines), readme


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    targets = {"results": args.results, "output": args.output, "marks": MARKS}
    targets.update(readme=args.readme, readme_marks=README_MARKS)
    if args.report_only:
        republish(render, **targets)
        return 0
    import torch

    load = os.getloadavg()
    record = {
        "commit": git_commit(),
        "command": portable_command(
            ["python", "benchmarks/bench_demo.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "torch": torch.__version__,
        "load_average": ", ".join(f"{x:.2f}" for x in load),
        **measure(args.rounds),
    }
    publish(render, record, **targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
