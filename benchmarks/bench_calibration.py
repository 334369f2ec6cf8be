"""How often the level from n_p pre-samples agrees with the level from many samples, under calibrated thresholds.

On the embedded world: M_0 samples ``n_p + n_ref`` solutions for each of ``--per-level`` problems of every world
level (held-out problems excluded), the learned PRM scores them (min step reward), the verifier checks them. The
first n_p samples of a problem give its estimated level, the other n_ref (independent) its reference level, both
by the same rule and thresholds. Three rules: the paper's with thresholds calibrated from the pre-samples
(:func:`trl_hsstar.difficulty.calibrate_thresholds`), the paper's with the world's fixed pair, and accuracy only.

    python benchmarks/bench_calibration.py --output docs/benchmarks.md
    python benchmarks/bench_calibration.py --report-only --output docs/benchmarks.md   # the section from the record
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

from bench_methods import add_report_only, commit_line, publish, republish, script_meta

ROOT = Path(__file__).resolve().parents[1]
MARKS = ("<!-- bench_calibration:start -->", "<!-- bench_calibration:end -->")
RESULTS = "benchmarks/results/bench_calibration.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-level", type=int, default=20)
    p.add_argument("--num-presamples", type=int, default=3)
    p.add_argument("--num-reference", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="a Markdown file to write the section into")
    p.add_argument("--results", default=str(ROOT / RESULTS))
    add_report_only(p)
    args = p.parse_args(argv)
    if args.report_only:
        republish(render, results=args.results, output=args.output, marks=MARKS)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    from trl_hsstar.difficulty import calibrate_thresholds, estimate_difficulty
    from trl_hsstar.rewards import as_reward_source
    from trl_hsstar.sampling import SamplingParams, TransformersSampler
    from trl_hsstar.toy.experiment import WorldRun, held_out_problems
    from trl_hsstar.toy.world import (
        LEVELS,
        level_of,
        level_problems,
        toy_prm_path,
        toy_reasoner_path,
    )
    from trl_hsstar.verify import verify_answer

    started = time.monotonic()
    reasoner = toy_reasoner_path(preset="m0", progress=True)  # M_0 of hsstar bench, not the tiny test model
    prm_dir = toy_prm_path(reasoner, progress=True)
    problems = level_problems(LEVELS, args.per_level, seed=args.seed, exclude=held_out_problems())
    tokenizer = AutoTokenizer.from_pretrained(reasoner)
    sampler = TransformersSampler(AutoModelForCausalLM.from_pretrained(reasoner), tokenizer, batch_size=128)
    n_p, n_ref = args.num_presamples, args.num_reference
    params = SamplingParams(
        temperature=0.7,
        top_p=0.95,
        max_new_tokens=max(len(q.rationale()) for q in problems) + 16,
        seed=args.seed,
    )
    outputs = sampler.generate([q.prompt for q in problems], [n_p + n_ref] * len(problems), params)
    prm = as_reward_source(
        AutoModelForTokenClassification.from_pretrained(prm_dir),
        tokenizer=AutoTokenizer.from_pretrained(prm_dir),
    )
    texts = [c.text for cs in outputs for c in cs]
    prompts = [q.prompt for q, cs in zip(problems, outputs) for _ in cs]
    answers = [str(q.answer) for q, cs in zip(problems, outputs) for _ in cs]
    scores = prm(prompts, texts)
    correct = [verify_answer(t, a) for t, a in zip(texts, answers)]
    k = n_p + n_ref
    per_problem = [(correct[i * k : (i + 1) * k], scores[i * k : (i + 1) * k]) for i in range(len(problems))]

    def difficulties(part: slice, **rule):
        return [estimate_difficulty(c[part], s[part], **rule) for c, s in per_problem]

    pre, ref = slice(0, n_p), slice(n_p, k)
    calibrated = calibrate_thresholds(difficulties(pre, estimator="accuracy"))
    from_reference = calibrate_thresholds(difficulties(ref, estimator="accuracy"))
    rules = {
        f"paper's rule, calibrated from the pre-samples {calibrated}": {"thresholds": calibrated},
        f"paper's rule, the world's fixed pair {tuple(WorldRun.reward_thresholds)}": {
            "thresholds": tuple(WorldRun.reward_thresholds)
        },
        "accuracy only": {"estimator": "accuracy"},
    }
    results = {}
    for name, rule in rules.items():
        est = [d.level.value for d in difficulties(pre, **rule)]
        refs = [d.level.value for d in difficulties(ref, **rule)]
        results[name] = {
            "agreement": sum(a == b for a, b in zip(est, refs)) / len(est),
            "confusion": dict(Counter(f"{a}->{b}" for a, b in zip(est, refs))),
            "by_world_level": {
                lv: sum(a == b for a, b, q in zip(est, refs, problems) if level_of(q) == lv)
                / sum(1 for q in problems if level_of(q) == lv)
                for lv in LEVELS
            },
        }
    data = {
        "meta": script_meta("bench_calibration.py", argv, started),
        "settings": {
            "per_level": args.per_level,
            "num_presamples": n_p,
            "num_reference": n_ref,
            "seed": args.seed,
        },
        "calibrated": calibrated,
        "calibrated_from_reference": from_reference,
        "rules": results,
    }
    publish(render, data, results=args.results, output=args.output, marks=MARKS)
    return 0


def render(record: dict) -> str:
    """The docs section, from the record alone."""
    meta, settings, results = record["meta"], record["settings"], record["rules"]
    calibrated, from_reference = record["calibrated"], record["calibrated_from_reference"]
    levels = list(next(iter(results.values()))["by_world_level"])
    n_p, n_ref = settings["num_presamples"], settings["num_reference"]
    lines = [
        MARKS[0],
        "## Thresholds for any PRM: calibration and agreement (`benchmarks/bench_calibration.py`)",
        "",
        f"Command: `{meta['command']}`. {commit_line(meta)} Machine: {meta['machine']}, torch {meta['torch']} "
        f"with {meta['threads']} threads; {meta['minutes']} minutes.",
        "",
        f"M_0 and the learned PRM of the world; {settings['per_level'] * len(levels)} problems "
        f"({settings['per_level']} per world level), {n_p} pre-samples and {n_ref} independent reference samples "
        f"each. Thresholds calibrated from the pre-samples: tau_l = {calibrated[0]}, tau_h = {calibrated[1]}; from "
        f"the {n_ref} reference samples the same rule gives ({from_reference[0]}, {from_reference[1]}).",
        "",
        "| rule | level from the pre-samples = level from the reference samples | "
        + " | ".join(levels)
        + " |",
        "|---|---|" + "---|" * len(levels),
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {100 * r['agreement']:.0f}% | "
            + " | ".join(f"{100 * r['by_world_level'][lv]:.0f}%" for lv in levels)
            + " |"
        )
    lines += [
        "",
        "Estimated -> reference, calibrated rule: "
        + ", ".join(f"{k} {v}" for k, v in sorted(next(iter(results.values()))["confusion"].items()))
        + ".",
        "",
        MARKS[1],
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
