"""The world's regime, measured before any method is compared: is there something for HS-STaR to find?

On the default pool (one demo iteration's problems, drawn evenly from the world's levels), M_0 samples 16
solutions per problem at the loop's temperature. Reported:

* the share of easy (16 of 16 right), boundary (some) and hard (none) problems, overall and per world level;
* on boundary problems, the number of distinct fully correct rationales (the paths SFT can learn from);
* the share of correct-answer samples with a wrong step (right answer, flawed rationale);
* how well the world's PRM (min step reward) separates clean from flawed correct-answer samples (AUROC).

Targets (issue 13): each level share >= 15%, median distinct correct rationales on boundary problems >= 3,
5% to 25% flawed correct-answer samples, AUROC >= 0.8. The table goes to ``docs/toy_world.md`` between
``<!-- world_regime:start -->`` and ``<!-- world_regime:end -->``, the record to ``--results``.

    python benchmarks/world_regime.py                  # the shipped M_0 and PRM (about 2 minutes on 2 cores)
    python benchmarks/world_regime.py --reasoner DIR --prm DIR --no-report
    python benchmarks/world_regime.py --report-only    # the section of docs/toy_world.md from the record
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_methods import (  # noqa: E402
    add_report_only,
    commit_line,
    git_commit,
    machine,
    portable_command,
    portable_path,
    publish,
    republish,
)

START, END = "<!-- world_regime:start -->", "<!-- world_regime:end -->"
RESULTS = "benchmarks/results/world_regime.json"
TARGETS = {"share": 0.15, "distinct": 3, "flawed": (0.05, 0.25), "auroc": 0.8}


def auroc(positives: list[float], negatives: list[float]) -> float | None:
    """P(a random positive scores above a random negative), ties counted half (Mann-Whitney U)."""
    if not positives or not negatives:
        return None
    ranked = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        rank_sum += sum(label for _, label in ranked[i:j]) * (i + j + 1) / 2
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def measure(
    reasoner: Path, prm: Path | None, *, problems: int, samples: int, temperature: float, seed: int
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    from trl_hsstar.rewards import ProcessRewardModel
    from trl_hsstar.sampling import SamplingParams, TransformersSampler
    from trl_hsstar.toy.experiment import world_problems
    from trl_hsstar.toy.problems import is_rationale_correct, split_steps
    from trl_hsstar.toy.world import held_out_problems, level_of
    from trl_hsstar.verify import verify_answer

    pool = world_problems(problems, seed=seed, exclude=held_out_problems())
    tokenizer = AutoTokenizer.from_pretrained(reasoner)
    policy = AutoModelForCausalLM.from_pretrained(reasoner)
    longest = max(len(p.rationale()) for p in pool)
    started = time.monotonic()
    outputs = TransformersSampler(policy, tokenizer, batch_size=128, progress=True).generate(
        [p.prompt for p in pool],
        [samples] * len(pool),
        SamplingParams(temperature=temperature, top_p=0.95, max_new_tokens=longest + 16, seed=seed),
    )
    sampling_seconds = time.monotonic() - started
    scorer = None
    if prm is not None:
        scorer = ProcessRewardModel(
            AutoModelForTokenClassification.from_pretrained(prm),
            AutoTokenizer.from_pretrained(prm),
            batch_size=64,
        )

    levels: dict[str, Counter] = {}
    overall: Counter = Counter()
    distinct_on_boundary: list[int] = []
    clean_scores: list[float] = []
    flawed_scores: list[float] = []
    for p, completions in zip(pool, outputs):
        texts = [c.text for c in completions]
        right = [verify_answer(t, str(p.answer)) for t in texts]
        level = "easy" if all(right) else "hard" if not any(right) else "boundary"
        overall[level] += 1
        levels.setdefault(level_of(p), Counter())[level] += 1
        correct_texts = [t for t, r in zip(texts, right) if r]
        clean = [is_rationale_correct(p, t) for t in correct_texts]
        if level == "boundary":
            paths = {"\n\n".join(split_steps(t)) for t, c in zip(correct_texts, clean) if c}
            distinct_on_boundary.append(len(paths))
        if correct_texts:
            if scorer is None:
                scores = [0.0] * len(correct_texts)  # no PRM: the flawed share only
            else:
                with torch.no_grad():
                    scores = scorer([p.prompt] * len(correct_texts), correct_texts)
            for s, c in zip(scores, clean):
                if s is not None:
                    (clean_scores if c else flawed_scores).append(s)
    n_correct = len(clean_scores) + len(flawed_scores)
    return {
        "reasoner": str(reasoner),
        "prm": None if prm is None else str(prm),
        "problems": len(pool),
        "samples_per_problem": samples,
        "temperature": temperature,
        "seed": seed,
        "shares": {k: overall[k] / len(pool) for k in ("easy", "boundary", "hard")},
        "by_world_level": {
            w: {k: c[k] for k in ("easy", "boundary", "hard")} for w, c in sorted(levels.items())
        },
        "boundary_distinct_correct_rationales": {
            "median": statistics.median(distinct_on_boundary) if distinct_on_boundary else None,
            "quartiles": statistics.quantiles(distinct_on_boundary, n=4)
            if len(distinct_on_boundary) > 1
            else None,
        },
        "correct_answer_samples": n_correct,
        "flawed_share_of_correct_answers": len(flawed_scores) / n_correct if n_correct else None,
        "prm_auroc_clean_vs_flawed": auroc(clean_scores, flawed_scores) if scorer else None,
        "sampling_seconds": round(sampling_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }


def verdicts(r: dict) -> dict[str, bool]:
    low, high = TARGETS["flawed"]
    flawed = r["flawed_share_of_correct_answers"]
    median = r["boundary_distinct_correct_rationales"]["median"]
    return {
        "shares": all(v >= TARGETS["share"] for v in r["shares"].values()),
        "distinct": median is not None and median >= TARGETS["distinct"],
        "flawed": flawed is not None and low <= flawed <= high,
        "auroc": (r["prm_auroc_clean_vs_flawed"] or 0) >= TARGETS["auroc"],
    }


def render(r: dict) -> str:
    """The section of docs/toy_world.md, from the record alone."""
    ok = verdicts(r)
    mark = {True: "met", False: "**not met**"}
    s = r["shares"]
    q = r["boundary_distinct_correct_rationales"]
    lines = [
        START,
        f"Measured with `{r['command']}` on {r['machine']} ({r['torch_threads']} torch threads): M_0 sampled "
        f"{r['samples_per_problem']} solutions (temperature {r['temperature']}, top-p 0.95) for each of {r['problems']} "
        f"problems of the default pool (seed {r['seed']}); sampling took {r['sampling_seconds']} s. {commit_line(r)}",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
        f"| easy / boundary / hard share | {s['easy']:.2f} / {s['boundary']:.2f} / {s['hard']:.2f} | each >= 0.15 | "
        f"{mark[ok['shares']]} |",
        f"| distinct fully correct rationales per boundary problem, median (quartiles) | {q['median']} "
        f"({', '.join(f'{x:g}' for x in q['quartiles'] or [])}) | >= 3 | {mark[ok['distinct']]} |",
        f"| correct-answer samples with a wrong step | {r['flawed_share_of_correct_answers']:.3f} "
        f"(of {r['correct_answer_samples']}) | 0.05 to 0.25 | {mark[ok['flawed']]} |",
        f"| PRM AUROC, clean against flawed correct-answer samples | {r['prm_auroc_clean_vs_flawed'] or float('nan'):.3f} "
        f"| >= 0.8 | {mark[ok['auroc']]} |",
        "",
        "Per world level (problems easy / boundary / hard):",
        "",
        "| level | easy | boundary | hard |",
        "|---|---|---|---|",
    ]
    for w, c in r["by_world_level"].items():
        lines.append(f"| {w} | {c['easy']} | {c['boundary']} | {c['hard']} |")
    return "\n".join([*lines, END])


def main(argv: list[str] | None = None) -> int:
    from trl_hsstar.toy.world import toy_prm_path, toy_reasoner_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reasoner", default=None, help="default: the shipped M_0")
    p.add_argument(
        "--prm", default=None, help="default: the shipped PRM (of the shipped M_0); 'none': no AUROC"
    )
    p.add_argument("--problems", type=int, default=256, help="the default pool: one demo iteration")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7, help="the loop's sampling temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=str(ROOT / "docs" / "toy_world.md"))
    p.add_argument("--results", default=str(ROOT / RESULTS))
    p.add_argument("--no-report", action="store_true", help="print only; write no file")
    add_report_only(p)
    args = p.parse_args(argv)
    if args.report_only:
        republish(render, results=args.results, output=args.report, marks=(START, END))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    reasoner = Path(args.reasoner) if args.reasoner else toy_reasoner_path(preset="m0")
    prm = None if args.prm == "none" else Path(args.prm) if args.prm else toy_prm_path(reasoner)
    r = measure(
        reasoner,
        prm,
        problems=args.problems,
        samples=args.samples,
        temperature=args.temperature,
        seed=args.seed,
    )
    for name in ("reasoner", "prm"):  # no path of this machine in the record
        if r[name]:
            r[name] = portable_path(r[name], f"--{name}")
    record = {
        "commit": git_commit(),
        "command": portable_command(
            ["python", "benchmarks/world_regime.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        **r,
        "verdicts": verdicts(r),
    }
    if args.no_report:
        print(render(record))
    else:
        publish(render, record, results=args.results, output=args.report, marks=(START, END))
    return 0


if __name__ == "__main__":
    sys.exit(main())
