"""Cost growth: one HS-STaR iteration on the embedded world at 1k, 4k and 16k problems per iteration.

Each size runs in a fresh process (so that its peak RSS is its own): M_0 of the world and its learned PRM, the
release's allocation (B=8, n_p=3, SFT), one iteration, no held-out evaluation. The record splits the wall time
into the loop's phases (from the trainer's per-phase timings) and the report fits the log-log slope of time
against problems. Target: time grows at most linearly (slope <= 1), peak RSS flat.

    python benchmarks/bench_scale.py --output docs/benchmarks.md                 # 1k, 4k, 16k (about 40 min here)
    python benchmarks/bench_scale.py --sizes 64 128 --work-dir /tmp/scale        # a smoke run
    python benchmarks/bench_scale.py --report-only --output docs/benchmarks.md   # the section from the record

The verifier's rate is measured on GSM8K's test split: ``--gsm8k DIR`` (a folder with ``test.jsonl``; default
``$HSSTAR_GSM8K``, else ``../shared/data/gsm8k`` beside the checkout), or ``--skip-verifier`` to leave it out. A
missing folder stops the script before any run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_methods import add_report_only, commit_line, publish, republish, script_meta  # noqa: E402

SECTION = "bench_scale"
MARKS = (f"<!-- {SECTION}:start -->", f"<!-- {SECTION}:end -->")
RESULTS = "benchmarks/results/bench_scale.json"
GSM8K = os.environ.get("HSSTAR_GSM8K") or str(ROOT.parent / "shared" / "data" / "gsm8k")
LEVELS = ("4x1", "5x1", "6x1", "7x1", "8x1", "2x2")  # 3x1 has too few distinct problems for 16k


def run_one(size: int, work_dir: Path, budget: int, presamples: int) -> dict:
    """One iteration at ``size`` problems, in this process; returns its record."""
    import random

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    from trl_hsstar import HSStarConfig, HSStarTrainer
    from trl_hsstar.toy.world import level_problems, toy_prm_path, toy_reasoner_path

    reasoner = toy_reasoner_path(preset="m0")
    prm = toy_prm_path(reasoner)
    pool = level_problems(LEVELS, -(-size // len(LEVELS)), seed=0)
    random.Random(0).shuffle(pool)
    problems = pool[:size]
    longest = max(len(p.rationale()) for p in problems)
    tokenizer = AutoTokenizer.from_pretrained(reasoner)
    args = HSStarConfig(
        output_dir=str(work_dir / f"n{size}"),
        num_iterations=1,
        problems_per_iteration=size,
        sampling_budget=budget,
        num_presamples=presamples,
        reward_thresholds=[0.25, 0.5],
        max_completion_length=longest + 16,
        generation_batch_size=128,
        max_rows_per_problem=4,
        learning_rate=1e-4,
        per_device_train_batch_size=16,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = HSStarTrainer(
        model=AutoModelForCausalLM.from_pretrained(reasoner),
        args=args,
        train_dataset=Dataset.from_list([p.to_row() for p in problems]),
        processing_class=tokenizer,
        reward_funcs=str(prm),
    )
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    stats = trainer.iteration_stats[0]
    return {
        "problems": size,
        "samples": stats["budget_spent"],
        "rows": stats["rows"],
        "wall_seconds": wall,
        "phase_seconds": {
            **stats.get("phase_seconds", {}),
            "training and saving": wall - stats.get("data_seconds", wall),
        },
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }


def verify_rate(path: Path, n: int = 1000) -> dict:
    """The loop's verifier (one math-verify worker) on GSM8K test answers, each checked right against its own gold
    answer and wrong against its neighbour's: as plain numbers (``\\boxed{18}``: the fast numeric path) and as LaTeX
    (``\\boxed{\\frac{36}{2}}``: math-verify's parser)."""
    from trl_hsstar.verify import MathVerifier

    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    golds = [r["answer"].split("####")[-1].strip().replace(",", "") for r in rows]
    wrong = golds[1:] + golds[:1]
    out = {"same_as_neighbour": sum(a == b for a, b in zip(golds, wrong))}
    with MathVerifier() as verifier:
        verifier("\\boxed{\\frac{2}{2}}", "1")  # the worker's start is not a check
        forms = {"number": golds, "latex": [f"\\frac{{{2 * float(g):g}}}{{2}}" for g in golds]}
        for form, answers in forms.items():
            completions = [f"The answer is \\boxed{{{a}}}." for a in answers]
            start = time.perf_counter()
            right = verifier.verify_batch(completions, golds)
            accepted_wrong = verifier.verify_batch(completions, wrong)
            seconds = time.perf_counter() - start
            out[form] = {
                "checks": 2 * len(rows),
                "per_second": 2 * len(rows) / seconds,
                "right_accepted": sum(right),
                "wrong_accepted": sum(accepted_wrong),
            }
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def render(record: dict) -> str:
    """The docs section, from the record alone."""
    meta, settings = record["meta"], record["settings"]
    records = sorted(record["records"], key=lambda r: r["problems"])
    phases = sorted({k for r in records for k in r["phase_seconds"]})
    lines = [
        MARKS[0],
        "## Cost growth: problems per iteration (`benchmarks/bench_scale.py`)",
        "",
        "Target: the time of one iteration grows at most linearly with the problems in it (log-log slope <= 1) and "
        f"peak memory stays flat. One SFT iteration on the world (its M_0 and learned PRM, B={settings['budget']}, "
        f"n_p={settings['presamples']}, levels {', '.join(settings['levels'])}), each size in a fresh process.",
        "",
        f"Command: `{meta['command']}`. {commit_line(meta)} Machine: {meta['machine']}, torch {meta['torch']} with "
        f"{meta['threads']} threads; {meta['minutes']} minutes of runs.",
        "",
        "| problems | samples | rows | seconds | seconds per 1k samples | peak RSS (MiB) | "
        + " | ".join(f"{p} s" for p in phases)
        + " |",
        "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(phases),
    ]
    for r in records:
        lines.append(
            f"| {r['problems']} | {r['samples']} | {r['rows']} | {r['wall_seconds']:.1f} | "
            f"{1000 * r['wall_seconds'] / r['samples']:.2f} | {r['peak_rss_mib']:.0f} | "
            + " | ".join(f"{r['phase_seconds'].get(p, 0.0):.1f}" for p in phases)
            + " |"
        )
    if len(records) >= 2:
        xs = [r["problems"] for r in records]
        lines += [
            "",
            f"Log-log slope of time against problems: **{slope(xs, [r['wall_seconds'] for r in records]):.3f}**; "
            f"of peak RSS: **{slope(xs, [r['peak_rss_mib'] for r in records]):.3f}** "
            f"({records[0]['peak_rss_mib']:.0f} -> {records[-1]['peak_rss_mib']:.0f} MiB).",
        ]
        for p in phases:
            ys = [max(r["phase_seconds"].get(p, 0.0), 1e-3) for r in records]
            lines.append(f"- {p}: slope {slope(xs, ys):.3f}")
    verify = record.get("verifier")
    if "verifier" not in record:  # a record from before the verifier's figures were kept in it
        lines += [
            "",
            f"The verifier's rate on GSM8K test answers, measured in the run of commit {meta['commit']}, was not "
            "kept as a record and is removed until the command is rerun (with `--gsm8k DIR`).",
        ]
    elif verify is None:
        lines += ["", "The verifier's rate was not measured (`--skip-verifier`)."]
    else:
        num, tex = verify["number"], verify["latex"]
        lines += [
            "",
            f"The verifier, one worker, on {num['checks'] // 2} GSM8K test answers (each checked against its gold "
            f"answer and against its neighbour's; {verify['same_as_neighbour']} neighbours share the answer): as "
            f"numbers (the fast path) **{num['per_second']:.0f} checks/s** ({num['right_accepted']} right accepted, "
            f"{num['wrong_accepted']} wrong accepted); as LaTeX fractions (math-verify's parser) "
            f"**{tex['per_second']:.0f} checks/s** ({tex['right_accepted']} right accepted, {tex['wrong_accepted']} "
            "wrong accepted).",
        ]
    return "\n".join([*lines, MARKS[1]])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--budget", type=int, default=8)
    p.add_argument("--presamples", type=int, default=3)
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench-scale"))
    p.add_argument("--output", type=Path, help="the Markdown file whose bench_scale section is replaced")
    p.add_argument("--results", type=Path, default=ROOT / RESULTS)
    p.add_argument(
        "--gsm8k",
        type=Path,
        default=Path(GSM8K),
        help="a folder with GSM8K's test split (test.jsonl, JSON lines) for the verifier's rate (default: "
        "$HSSTAR_GSM8K, else ../shared/data/gsm8k beside the checkout)",
    )
    p.add_argument("--skip-verifier", action="store_true", help="leave the verifier's rate out")
    add_report_only(p)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    args = p.parse_args(argv)
    if args.report_only:
        republish(render, results=str(args.results), output=args.output and str(args.output), marks=MARKS)
        return
    gsm8k = args.gsm8k if args.gsm8k.suffix == ".jsonl" else args.gsm8k / "test.jsonl"
    if not args.one and not args.skip_verifier and not gsm8k.is_file():
        p.error(
            f"--gsm8k: no GSM8K test split at {gsm8k} (the verifier's rate is measured on it). Pass --gsm8k DIR, "
            "a folder with test.jsonl (GSM8K's test split as JSON lines with 'question' and 'answer'), or set "
            "HSSTAR_GSM8K=DIR; or pass --skip-verifier to measure without it."
        )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.one:
        record = run_one(args.one, args.work_dir, args.budget, args.presamples)
        (args.work_dir / f"n{args.one}.json").write_text(json.dumps(record, indent=1))
        return
    records = []
    start = time.monotonic()
    for size in args.sizes:
        out = args.work_dir / f"n{size}.json"
        if not out.exists():  # a rerun keeps the sizes already measured
            cmd = [sys.executable, __file__, "--one", str(size), "--work-dir", str(args.work_dir)]
            cmd += ["--budget", str(args.budget), "--presamples", str(args.presamples)]
            subprocess.run(cmd, check=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        records.append(json.loads(out.read_text()))
        print(json.dumps(records[-1]), flush=True)
    verify = None if args.skip_verifier else verify_rate(gsm8k)
    meta = script_meta("bench_scale.py", argv, start)
    meta["minutes"] = round(sum(r["wall_seconds"] for r in records) / 60, 1)  # the runs, also when read back
    record = {
        "meta": meta,
        "records": records,
        "settings": {"budget": args.budget, "presamples": args.presamples, "levels": list(LEVELS)},
        "verifier": verify,
    }
    publish(
        render,
        record,
        results=str(args.results),
        output=str(args.output) if args.output else None,
        marks=MARKS,
    )


if __name__ == "__main__":
    main()
