"""How much M_0 depends on the floating-point path, under each stopping rule (``benchmarks/bench_m0.py``).

M_0 is a snapshot of a from-scratch training run taken while it learns to carry, and the step at which that
happens moves with the smallest change of the arithmetic. This script builds M_0 with the real builder
(:func:`trl_hsstar.toy.world.build_reasoner`) along several floating-point paths of one machine, standing in for
other CPUs: 2 and 1 torch threads (another order of the sums inside each matrix product), and the initial weights
nudged by one part in a million. For each stopping rule it reports the step M_0 stopped at and its greedy
held-out accuracy per level, and writes the section between ``<!-- bench_m0:start -->`` and
``<!-- bench_m0:end -->`` of ``--output``.

Rules: ``shipped`` (the ``m0`` preset: probe of 40 problems a cell, checked every 20 steps, the stop found to 5),
``before`` (the earlier rule: probe of 20 a cell, stop at the first 20-step check that passes), ``fixed`` (no
probe: 300 steps of the same 600-step schedule, where the shipped rule stops on this machine's 2-thread path).

    python benchmarks/bench_m0.py --output docs/benchmarks.md     # about 20 minutes on 2 cores
    python benchmarks/bench_m0.py --report-only --output docs/benchmarks.md   # the section from the record
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_methods import add_report_only, commit_line, publish, republish, script_meta  # noqa: E402

MARKS = ("<!-- bench_m0:start -->", "<!-- bench_m0:end -->")
RESULTS = "benchmarks/results/bench_m0.json"
RULES = {
    "shipped": {},
    "before": {"probe_per_cell": 20, "refine_every": None},
    "fixed": {"target_accuracy": None, "steps": 300, "schedule_steps": 600},
}
PATHS = {  # name: (torch threads, perturb)
    "2 threads": (2, 0.0),
    "1 thread": (1, 0.0),
    "2 threads, nudged 1e-6": (2, 1e-6),
}


@contextlib.contextmanager
def nudged_init(scale: float):
    """Multiply every initial weight of the reasoner by ``1 + scale * N(0, 1)`` (a fixed draw): with ``1e-6`` it
    stands in for another CPU's floating-point path, to measure how much the result depends on that path."""
    from weights import add_weight_noise

    from trl_hsstar.toy import model as toy_model

    original = toy_model.build_tiny_model
    if scale:
        toy_model.build_tiny_model = lambda *a, **k: add_weight_noise(
            original(*a, **k), scale, seed=12345, relative=True
        )
    try:
        yield
    finally:
        toy_model.build_tiny_model = original


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--output", default=None, help="a Markdown file to write the section into")
    p.add_argument("--results", default=str(ROOT / RESULTS))
    add_report_only(p)
    args = p.parse_args(argv)
    if args.report_only:
        republish(render, results=args.results, output=args.output, marks=MARKS)
        return 0

    import torch

    from trl_hsstar.toy.world import (
        REASONER_PRESETS,
        build_reasoner,
        evaluate_levels,
        held_out_problems,
    )

    started = time.monotonic()
    held_out = held_out_problems()
    load = os.getloadavg()
    rows = []
    for rule in args.rules:
        for path in args.paths:
            threads, perturb = PATHS[path]
            torch.set_num_threads(threads)
            settings = {**REASONER_PRESETS["m0"], **RULES[rule]}
            start = time.monotonic()
            with nudged_init(perturb):
                model, tokenizer, build = build_reasoner(settings)
            model.eval()
            table = evaluate_levels(model, tokenizer, held_out)
            rows.append(
                {
                    "rule": rule,
                    "path": path,
                    "steps": build["steps_trained"],
                    "held_out": table,
                    "seconds": round(time.monotonic() - start, 1),
                }
            )
            print(
                f"{rule:8s} {path:24s} stopped at step {build['steps_trained']}, held-out {table['all']:.3f}, "
                f"{rows[-1]['seconds']} s",
                flush=True,
            )
    meta = script_meta("bench_m0.py", argv, started, load_average=", ".join(f"{x:.2f}" for x in load))
    publish(render, {"meta": meta, "rows": rows}, results=args.results, output=args.output, marks=MARKS)
    return 0


def render(record: dict) -> str:
    """The docs section, from the record alone."""
    meta, rows = record["meta"], record["rows"]
    levels = [lv for lv in rows[0]["held_out"] if lv != "all"]
    lines = [
        MARKS[0],
        "## M_0 on other floating-point paths (`benchmarks/bench_m0.py`)",
        "",
        "M_0 is a snapshot of a from-scratch run taken while it learns to carry, and the step at which that "
        "happens moves with the smallest change of the arithmetic. Here M_0 is built with the real builder "
        "along three floating-point paths of one machine, standing in for other CPUs (2 or 1 torch threads sum "
        "inside each matrix product in another order; the nudge multiplies every initial weight by 1 + 1e-6 N(0, 1)), "
        "under three stopping rules: `shipped` (the `m0` preset: greedy accuracy 0.5 on a probe of 40 problems "
        "a cell, run every 20 steps, the stop then found to 5 steps among the weights kept between probe runs), "
        "`before` (the earlier rule: 20 problems a cell, the first 20-step check that passes) and `fixed` (no "
        "probe: step 300 of the same schedule). Held-out: 100 greedy problems per level.",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; load average at start {meta['load_average']}. "
        + commit_line(meta),
        "",
        "| rule | path | stopped at step | " + " | ".join(levels) + " | all | build s |",
        "|---|---|---:|" + "---:|" * (len(levels) + 2),
    ]
    for r in rows:
        t = r["held_out"]
        lines.append(
            f"| {r['rule']} | {r['path']} | {r['steps']} | "
            + " | ".join(f"{t[lv]:.2f}" for lv in levels)
            + f" | **{t['all']:.3f}** | {r['seconds']:.0f} |"
        )
    lines += ["", "Spread of held-out accuracy over the paths, per rule (max - min):", ""]
    for rule in dict.fromkeys(r["rule"] for r in rows):
        values = [r["held_out"]["all"] for r in rows if r["rule"] == rule]
        steps = [r["steps"] for r in rows if r["rule"] == rule]
        spread = max(values) - min(values)
        lines.append(
            f"- {rule}: {min(values):.3f} to {max(values):.3f} (spread {spread:.3f}, mean {statistics.mean(values):.3f}); "
            f"steps {min(steps)} to {max(steps)}"
        )
    lines += ["", MARKS[1]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
