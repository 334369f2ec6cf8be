"""Why not GRPO? TRL's ``GRPOTrainer`` on the embedded world at the sample budget of ``hsstar bench``.

Per seed, from the same M_0, on the same training problems as ``hsstar bench`` (3 x 128, drawn with the seed), 8
generations per problem (3,072 samples, as every method there), reward 1 for a right answer (the package's
verifier), one epoch; then the same greedy held-out evaluation per level. The learning rates are fixed in advance
(the world's SFT rate and a tenth of it; GRPO's own default, 1e-6, is sized for billion-parameter models). The
figure is the paired difference by seed against the records of ``hsstar bench`` (``--bench-results``), whose final
accuracies are copied into this benchmark's record, so that its section is a function of its record alone.

    python benchmarks/bench_grpo.py --output docs/benchmarks.md      # 5 seeds x 2 rates
    python benchmarks/bench_grpo.py --quick                            # a smoke test on the tiny reasoner
    python benchmarks/bench_grpo.py --report-only --output docs/benchmarks.md   # the section from the record

Each run's record is kept in ``<work-dir>/records`` and read back by a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench_methods import (
    add_report_only,
    commit_line,
    portable_path,
    publish,
    republish,
    script_meta,
)

ROOT = Path(__file__).resolve().parents[1]
MARKS = ("<!-- bench_grpo:start -->", "<!-- bench_grpo:end -->")
RESULTS = "benchmarks/results/bench_grpo.json"
COMPARED = (
    "sft-hsstar",
    "sft-hsstar_adaptive",
    "sft-uniform",
    "dpo-hsstar",
    "dpo-hsstar_adaptive",
    "dpo-uniform",
)


def run(seed: int, lr: float, args, reasoner: str, held, initial: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_hsstar.toy.experiment import world_problems
    from trl_hsstar.toy.world import evaluate_levels
    from trl_hsstar.verify import verify_answer

    problems = world_problems(args.num_iterations * args.problems_per_iteration, seed=seed, exclude=held)
    generated = []

    def correct(completions, answer, **_):
        """1 for a right final answer, else 0 (the check every method of hsstar bench uses)."""
        generated.append(len(completions))
        return [1.0 if verify_answer(c, a) else 0.0 for c, a in zip(completions, answer)]

    longest = max(len(p.rationale()) for p in problems)
    config = GRPOConfig(
        output_dir=str(Path(args.work_dir) / "out" / f"lr{lr:g}-s{seed}"),
        num_generations=args.sampling_budget,
        per_device_train_batch_size=8 * args.sampling_budget,  # 8 problems per step
        max_completion_length=longest + 16,  # as hsstar bench
        temperature=0.7,  # the trainer's sampling defaults, as hsstar bench
        top_p=0.95,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        use_cpu=True,
        bf16=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(reasoner)
    model = AutoModelForCausalLM.from_pretrained(reasoner)
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": str(p.answer)} for p in problems])
    trainer = GRPOTrainer(
        model=model, reward_funcs=correct, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)
    started = time.monotonic()
    trainer.train()
    wall = time.monotonic() - started
    after = evaluate_levels(trainer.model, tokenizer, held)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    zero_std = [h["frac_reward_zero_std"] for h in logs if "frac_reward_zero_std" in h]
    return {
        "seed": seed,
        "learning_rate": lr,
        "initial": initial,
        "held_out": after,
        "samples_generated": sum(generated),
        "mean_reward": statistics.mean(h["reward"] for h in logs) if logs else None,
        "share_of_groups_without_signal": statistics.mean(zero_std) if zero_std else None,
        "steps": trainer.state.global_step,
        "wall_seconds": round(wall, 1),
    }


def render(record: dict) -> str:
    """The docs section, from the record alone (the paired methods' final accuracies are copied into it)."""
    meta, records, settings = record["meta"], record["records"], record["settings"]
    compared = record["compared"]["final_accuracy"]
    lines = [
        MARKS[0],
        "## Why not GRPO? TRL's GRPOTrainer on the world at the same sample budget",
        "",
        f"Command: `{meta['command']}`. {commit_line(meta)} Machine: {meta['machine']}, torch {meta['torch']} with "
        f"{meta['threads']} threads, trl {meta['trl']}; {meta['minutes']} minutes for the runs this invocation made.",
        "",
        f"From the same M_0 (held-out greedy {records[0]['initial']['all']:.3f}), on the problems `hsstar bench` "
        f"draws for each seed ({settings['num_iterations']} x {settings['problems_per_iteration']}), "
        f"{settings['sampling_budget']} "
        "generations per problem, reward 1 for a right answer, one epoch, cosine schedule, GRPOConfig's other "
        "defaults (loss `dapo`, beta 0, scale_rewards `group`); greedy held-out accuracy on the same problems.",
        "",
        "| learning rate | seeds | final accuracy | gain | samples generated per run | mean reward | groups without signal | wall s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rates = sorted({r["learning_rate"] for r in records})
    for lr in rates:
        rs = [r for r in records if r["learning_rate"] == lr]
        final = [r["held_out"]["all"] for r in rs]
        gain = [r["held_out"]["all"] - r["initial"]["all"] for r in rs]

        def sd(v):
            return f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else ""

        lines.append(
            f"| {lr:g} | {len(rs)} | {statistics.mean(final):.3f}{sd(final)} | {statistics.mean(gain):+.3f}{sd(gain)} | "
            f"{', '.join(sorted({str(r['samples_generated']) for r in rs}))} | "
            f"{statistics.mean(r['mean_reward'] for r in rs):.3f} | "
            f"{100 * statistics.mean(r['share_of_groups_without_signal'] for r in rs):.0f}% | "
            f"{statistics.mean(r['wall_seconds'] for r in rs):.0f} |"
        )
    lines.append("")
    from stats import holm, paired

    family = {}  # (rate, name) -> paired differences: the 12 comparisons, one family for the correction
    for lr in rates:
        by_seed = {r["seed"]: r["held_out"]["all"] for r in records if r["learning_rate"] == lr}
        for name in COMPARED:
            track, method = name.split("-", 1)
            other = {
                s: compared[f"{track}-{method}-np3-s{s}"]
                for s in by_seed
                if f"{track}-{method}-np3-s{s}" in compared
            }
            if other:
                family[(lr, name)] = [other[s] - by_seed[s] for s in sorted(other)]
    tests = {k: paired(d) for k, d in family.items()}
    adjusted = holm({k: t["p"] for k, t in tests.items() if t is not None})
    for lr in rates:
        pairs = []
        for name in COMPARED:
            diffs, t = family.get((lr, name)), tests.get((lr, name))
            if not diffs:
                continue
            track, method = name.split("-", 1)
            pairs.append(
                f"{track.upper()} {method} {', '.join(f'{d:+.3f}' for d in diffs)} (ahead on "
                f"{sum(d > 0 for d in diffs)} of {len(diffs)}"
                + (
                    ""
                    if t is None
                    else f"; mean {t['mean']:+.3f}, 95% interval [{t['low']:+.3f}, {t['high']:+.3f}], p {t['p']:.3f}, "
                    f"Holm over the {len(adjusted)} comparisons {adjusted[(lr, name)]:.3f}"
                )
                + ")"
            )
        if pairs:
            lines += [
                f"Each method of `hsstar bench` minus GRPO at lr {lr:g}, seed by seed: "
                + "; ".join(pairs)
                + ".",
                "",
            ]
    lines += [f"Raw records: `{meta.get('results', RESULTS)}`.", "", MARKS[1]]
    return "\n".join(lines)


def main(argv=None) -> int:
    from trl_hsstar.toy.experiment import SFT_LEARNING_RATE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny reasoner, 1 seed, 24 problems")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--learning-rates", type=float, nargs="+", default=[SFT_LEARNING_RATE / 10, SFT_LEARNING_RATE]
    )
    p.add_argument("--num-iterations", type=int, default=3, help="as hsstar bench: the problems are 3 x 128")
    p.add_argument("--problems-per-iteration", type=int, default=128)
    p.add_argument("--sampling-budget", type=int, default=8)
    p.add_argument("--eval-per-level", type=int, default=150)
    p.add_argument("--bench-results", default=str(ROOT / "benchmarks" / "results" / "bench_methods.json"))
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-grpo"))
    p.add_argument("--output", default=None, help="a Markdown file to write the section into")
    p.add_argument("--results", default=str(ROOT / RESULTS))
    add_report_only(p)
    args = p.parse_args(argv)
    if args.report_only:
        republish(render, results=args.results, output=args.output, marks=MARKS)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_hsstar.toy.experiment import held_out_problems
    from trl_hsstar.toy.world import evaluate_levels, toy_reasoner_path

    if args.quick:
        args.seeds, args.num_iterations, args.problems_per_iteration, args.eval_per_level = [0], 1, 24, 10
        args.sampling_budget, args.learning_rates = 4, args.learning_rates[:1]
    started = time.monotonic()
    reasoner = str(toy_reasoner_path(preset="tiny" if args.quick else "m0", progress=True))
    held = held_out_problems(args.eval_per_level)
    initial = evaluate_levels(
        AutoModelForCausalLM.from_pretrained(reasoner), AutoTokenizer.from_pretrained(reasoner), held
    )
    folder = Path(args.work_dir) / "records"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for lr in args.learning_rates:
        for seed in args.seeds:
            path = folder / f"lr{lr:g}-s{seed}.json"
            if path.exists():
                records.append(json.loads(path.read_text()))
                continue
            records.append(run(seed, lr, args, reasoner, held, initial))
            path.write_text(json.dumps(records[-1], indent=1) + "\n")
            r = records[-1]
            print(
                f"lr {lr:g} seed {seed}: {r['held_out']['all']:.3f} (M_0 {initial['all']:.3f}), {r['wall_seconds']} s",
                flush=True,
            )
    bench = {}
    if (
        Path(args.bench_results).exists() and not args.quick
    ):  # --quick trains another M_0: nothing to pair with
        bench = json.loads(Path(args.bench_results).read_text())["records"]
    # the final accuracies paired with, copied: the section is a function of this record alone
    wanted = [f"{name}-np3-s{s}" for name in COMPARED for s in sorted({r["seed"] for r in records})]
    compared = {k: bench[k]["iterations"][-1]["held_out"]["all"] for k in wanted if k in bench}
    record = {
        "meta": script_meta(
            "bench_grpo.py",
            argv,
            started,
            trl=trl.__version__,
            results=portable_path(args.results, "--results"),
        ),
        "records": records,
        "settings": {
            k: getattr(args, k)
            for k in ("num_iterations", "problems_per_iteration", "sampling_budget", "eval_per_level")
        },
        "compared": {
            "source": portable_path(args.bench_results, "--bench-results"),
            "final_accuracy": compared,
        },
    }
    publish(render, record, results=args.results, output=args.output, marks=MARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
