"""The pre-registered study of docs/protocol.md: hsstar against uniform at equal generated samples, powered.

``hsstar bench --protocol`` runs it. Per objective (SFT first, then DPO) and seed, five arms from the shipped M_0
on the seed's problems:

* ``uniform`` and ``hsstar`` at equal samples: the primary comparison, ``hsstar - uniform`` paired by seed;
* ``uniform-again``: uniform with another procedure seed (sampling, tie-breaks, data order) on the same problems,
  so that ``uniform-again - uniform`` is the noise floor measured inside the study;
* ``hsstar-steps`` and ``uniform-steps``: the same pair at equal optimizer steps per iteration (``max_steps``:
  each method's rows cut or repeated to the same number of updates).

The primary endpoint is the mean held-out greedy accuracy after the last two iterations on the levels M_0 can learn
(3x1 to 8x1, 400 problems each). Each run's record (its commit, command and machine in it) is written to
``--records`` as it finishes; a rerun skips finished runs, so the study can span sessions. The report is generated
from the records alone (``--report-only`` regenerates it without running anything) and replaces the section between
``<!-- bench_study:start -->`` and ``<!-- bench_study:end -->``.

    hsstar bench --protocol --objectives sft            # SFT's 20 seeds x 5 arms (about 2 hours on 2 cores)
    hsstar bench --protocol --report-only               # the report from the committed records
    hsstar bench --protocol --quick --work-dir /tmp/q   # a smoke test on the tiny reasoner
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import check_work_dir, git_commit, in_workers, machine, portable_command, write_report
from stats import holm, paired, t_quantile, t_sf  # noqa: F401  (t_sf: re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
MARKS = ("<!-- bench_study:start -->", "<!-- bench_study:end -->")
README_MARKS = ("<!-- bench_study:readme:start -->", "<!-- bench_study:readme:end -->")

# -- the protocol's fixed numbers (docs/protocol.md); changing one is a new protocol

SETTING = {
    "num_iterations": 3,
    "problems_per_iteration": 128,
    "sampling_budget": 8,
    "num_presamples": 3,
    "eval_per_level": 400,
    "max_rows_per_problem": 4,
    "per_device_train_batch_size": 16,
    "reward_thresholds": [0.25, 0.5],
}
"""The earlier study's setting, fixed before any of its runs (docs/protocol.md, "The setting")."""
LEARNING_RATES = {"sft": 1e-4, "dpo": 1.5e-5}
M0_SHA256 = "03fa733b05ce"
"""The shipped world-2 M_0 (the start of its weights' sha256): a record from another M_0 is left out."""
SEEDS = 20
"""Seeds per objective: the power calculation asks for more than 20 under SFT's prior sd, and 20 is the most the
study was allowed, so 20 (SFT then has about 75% power at 1 point)."""
ENDPOINT_LEVELS = ("3x1", "4x1", "5x1", "6x1", "7x1", "8x1")
"""The levels M_0 can learn: 2x2 is left out (M_0 and every run of the earlier study scored 0.00 on it)."""
EVAL_PER_LEVEL = SETTING["eval_per_level"]
ENDPOINT_ITERATIONS = 2
"""The endpoint averages the held-out accuracy after the last this-many iterations."""
EQUAL_STEPS = {"sft": 17, "dpo": 12}
"""Optimizer steps per iteration of the equal-steps setting: the mean of hsstar's and uniform's steps per
iteration in the earlier study (SFT 14 and 20, DPO 12.3 and 11), rounded."""
AGAIN_SEED_OFFSET = 10_000
"""The same-procedure arm's procedure seed: seed + this, on the problems of seed."""
ARMS = {  # name: (method, equal steps, procedure seed offset)
    "uniform": ("uniform", False, 0),
    "hsstar": ("hsstar", False, 0),
    "uniform-again": ("uniform", False, AGAIN_SEED_OFFSET),
    "hsstar-steps": ("hsstar", True, 0),
    "uniform-steps": ("uniform", True, 0),
}
PRIMARY = ("hsstar", "uniform")
NOISE_FLOOR = ("uniform-again", "uniform")
EQUAL_STEPS_PAIR = ("hsstar-steps", "uniform-steps")
EFFECT = 0.01
"""The effect the study is powered for: 1 point of accuracy."""
HALF_WIDTH = 0.006
"""The 95% interval's half-width asked for: 0.6 points (SFT would need 31 seeds at its prior sd)."""
PRIOR = ROOT / "benchmarks" / "results" / "bench_methods.json"
"""The earlier study's records, whose hsstar - uniform differences give the sd of the power calculation."""


# -- power (Student's t and Holm live in stats.py, shared with the other studies)


def _normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def power(n: int, sd: float, effect: float = EFFECT) -> float:
    """Power of the two-sided paired t-test at 0.05 to detect ``effect`` with ``n`` pairs (normal approximation
    of the noncentral t)."""
    return _normal_cdf(effect * math.sqrt(n) / sd - t_quantile(0.975, n - 1))


def seeds_for_power(sd: float, effect: float = EFFECT, target: float = 0.8) -> int:
    """The fewest pairs with ``target`` power to detect ``effect``."""
    return next(n for n in range(2, 10_000) if power(n, sd, effect) >= target)


def seeds_for_half_width(sd: float, half: float = HALF_WIDTH) -> int:
    """The fewest pairs whose 95% interval is at most ``half`` wide on each side."""
    return next(n for n in range(2, 10_000) if t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= half)


def detectable(n: int, sd: float, target: float = 0.8) -> float:
    """The smallest effect with ``target`` power at ``n`` pairs (bisection on :func:`power`)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power(n, sd, mid) < target else (lo, mid)
    return hi


# -- the endpoint and the power calculation


def endpoint(record: dict, levels=ENDPOINT_LEVELS, last: int = ENDPOINT_ITERATIONS) -> float:
    """Mean held-out accuracy over ``levels`` (equal problems per level), averaged over the last ``last``
    iterations."""
    its = record["iterations"][-last:]
    return statistics.mean(statistics.mean(it["held_out"][lv] for lv in levels) for it in its)


def power_calculation(prior_path: Path = PRIOR) -> dict:
    """The sd of hsstar - uniform on this endpoint in the earlier study (150 problems per level there), and the
    seeds it asks for."""
    records = json.loads(prior_path.read_text())["records"]
    out = {}
    for objective in ("sft", "dpo"):
        seeds = sorted(
            r["run"]["seed"] for k, r in records.items() if k.startswith(f"{objective}-hsstar-np3-s")
        )
        diffs = [
            endpoint(records[f"{objective}-hsstar-np3-s{s}"])
            - endpoint(records[f"{objective}-uniform-np3-s{s}"])
            for s in seeds
            if f"{objective}-uniform-np3-s{s}" in records
        ]
        sd = statistics.stdev(diffs)
        out[objective] = {
            "prior_seeds": len(diffs),
            "prior_sd": sd,
            "seeds_for_power": seeds_for_power(sd),
            "seeds_for_half_width": seeds_for_half_width(sd),
            "seeds": SEEDS,
            "half_width_at_seeds": t_quantile(0.975, SEEDS - 1) * sd / math.sqrt(SEEDS),
            "detectable_at_seeds": detectable(SEEDS, sd),
        }
    return out


# -- the runs


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hsstar bench --protocol",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--objectives", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"seeds per objective, 0 to N-1 (the protocol: {SEEDS}; --quick: 2)",
    )
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument(
        "--work-dir", default=str(ROOT / "runs" / "study"), help="the runs' artifacts (large; not committed)"
    )
    p.add_argument(
        "--records", default=None, help="one JSON record per finished run (benchmarks/results/study)"
    )
    p.add_argument("--report", default=None, help="the page the report goes to (docs/benchmarks.md)")
    p.add_argument(
        "--readme", default=None, help="where the one-line result goes (README.md; '' for nowhere)"
    )
    p.add_argument(
        "--report-only", action="store_true", help="regenerate the report from the records, run nothing"
    )
    p.add_argument(
        "--jobs", type=int, default=2, help="runs at a time, each with its share of the torch threads"
    )
    p.add_argument(
        "--cache-dir", default=None, help="where M_0 and the PRM are cached when built (default ~/.cache)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: the tiny reasoner, 2 seeds, 2 iterations; records and report under --work-dir unless given",
    )
    return p


def sizes(args) -> dict:
    """The study's setting: the protocol's, or the smoke test's smaller one."""
    if args.quick:
        return {
            **SETTING,
            "num_iterations": 2,
            "problems_per_iteration": 16,
            "sampling_budget": 4,
            "eval_per_level": 5,
        }
    return dict(SETTING)


def plan(args) -> list[dict]:
    """Objective by objective, seed by seed, every arm: a seed's arms run side by side on one machine."""
    return [
        {"objective": objective, "seed": seed, "arm": arm}
        for objective in args.objectives
        for seed in range(args.seeds)
        for arm in args.arms
    ]


def key(run: dict) -> str:
    return f"{run['objective']}-{run['arm']}-s{run['seed']}"


def held_out(per_level: int):
    from trl_hsstar.toy.world import held_out_problems, level_of

    return [p for p in held_out_problems(per_level) if level_of(p) in ENDPOINT_LEVELS]


def execute(
    run: dict, *, args, reasoner: str, prm: str | None, initial: dict, context: dict
) -> tuple[str, dict]:
    """One arm of one seed from M_0; its record is written as it ends."""
    import shutil

    import torch

    from trl_hsstar.toy.experiment import WorldRun, run_world, world_problems

    size = sizes(args)
    method, equal_steps, offset = ARMS[run["arm"]]
    ho = held_out(size["eval_per_level"])
    problems = world_problems(
        size["num_iterations"] * size["problems_per_iteration"], seed=run["seed"], exclude=ho
    )
    out_dir = Path(args.work_dir) / "out" / key(run)
    if out_dir.exists():  # an interrupted run restarts from scratch: its record is what counts
        shutil.rmtree(out_dir)
    record = run_world(
        WorldRun(
            method=method,
            objective=run["objective"],
            seed=run["seed"] + offset,
            num_iterations=size["num_iterations"],
            problems_per_iteration=size["problems_per_iteration"],
            sampling_budget=size["sampling_budget"],
            num_presamples=min(size["num_presamples"], size["sampling_budget"]),
            reward="prm" if prm else "oracle",
            reward_thresholds=tuple(size["reward_thresholds"]),
            learning_rate=LEARNING_RATES[run["objective"]],
            per_device_train_batch_size=size["per_device_train_batch_size"],
            max_rows_per_problem=size["max_rows_per_problem"],
            extra={"max_steps": EQUAL_STEPS[run["objective"]]} if equal_steps else {},
        ),
        reasoner_dir=reasoner,
        prm_dir=prm,
        output_dir=out_dir,
        held_out=ho,
        problems=problems,
        initial_eval=initial,
    )
    record.update(
        {
            **run,
            "quick": args.quick,
            "endpoint": endpoint(record, last=min(ENDPOINT_ITERATIONS, size["num_iterations"])),
            "torch_threads": torch.get_num_threads(),
            "finished_at": time.time(),
            **context,
        }
    )
    path = Path(args.records) / f"{key(run)}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return key(run), record


def start_from_m0(args, size: dict) -> tuple[str, dict, dict]:
    """The reasoner the runs start from (M_0, or the tiny one under ``--quick``), its build file, and its held-out
    accuracy on the endpoint's problems; the work dir is checked to hold runs of this setting only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_hsstar.toy.world import evaluate_levels, toy_reasoner_path

    reasoner = str(
        toy_reasoner_path(
            getattr(args, "cache_dir", None), preset="tiny" if args.quick else "m0", progress=True
        )
    )
    build_file = Path(reasoner) / "build.json"
    build = json.loads(build_file.read_text()) if build_file.exists() else {}
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    check_work_dir(work, {"reasoner_sha256": build.get("sha256"), **size, "quick": args.quick})
    initial = evaluate_levels(
        AutoModelForCausalLM.from_pretrained(reasoner),
        AutoTokenizer.from_pretrained(reasoner),
        held_out(size["eval_per_level"]),
    )
    initial["endpoint"] = statistics.mean(initial[lv] for lv in ENDPOINT_LEVELS)
    return reasoner, build, initial


def read_records(directory: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))}


# -- the analysis and the report (from the records alone)


def protocol_records(records: dict, *, quick: bool = False, seeds: int = SEEDS) -> tuple[dict, dict]:
    """The records the protocol analyses (its seeds, its M_0, not a smoke test's), and the others with why."""
    kept, left_out = {}, {}
    for name, r in records.items():
        if r.get("quick", False) != quick:
            left_out[name] = "a smoke test's" if r.get("quick") else "not a smoke test's"
        elif r["seed"] not in range(seeds):
            left_out[name] = f"seed {r['seed']} is not among the protocol's 0-{seeds - 1}"
        elif not quick and not str(r.get("reasoner_sha256")).startswith(M0_SHA256):
            left_out[name] = f"another M_0 (sha256 {str(r.get('reasoner_sha256'))[:12]})"
        else:
            kept[name] = r
    return kept, left_out


def _by_seed(records: dict, objective: str, arm: str) -> dict[int, dict]:
    return {r["seed"]: r for r in records.values() if r["objective"] == objective and r["arm"] == arm}


def comparison(records: dict, objective: str, pair: tuple[str, str], value=endpoint) -> dict:
    """``value(a) - value(b)`` paired by seed, over the seeds where both arms ran on the same machine (CPU model,
    architecture and cores, as recorded); ``None`` figures under two pairs."""
    a, b = _by_seed(records, objective, pair[0]), _by_seed(records, objective, pair[1])
    both = set(a) & set(b)
    seeds = sorted(s for s in both if a[s]["machine"] == b[s]["machine"])
    return {
        **(paired([value(a[s]) - value(b[s]) for s in seeds]) or {"n": len(seeds), "p": 1.0}),
        "seeds": seeds,
        "mixed_machines": sorted(both - set(seeds)),
    }


def _on_level(level: str):
    return functools.partial(endpoint, levels=(level,))


EXPLORATORY = {
    "equal steps: hsstar-steps - uniform-steps": (EQUAL_STEPS_PAIR, endpoint),
    "final iteration only: hsstar - uniform": (PRIMARY, functools.partial(endpoint, last=1)),
    **{f"level {lv}: hsstar - uniform": (PRIMARY, _on_level(lv)) for lv in ENDPOINT_LEVELS},
}
"""The exploratory family of each objective (8 comparisons), Holm-adjusted as one: a comparison without two pairs
yet counts with p = 1."""


def analyse(records: dict) -> dict:
    """Per objective: the primary comparison, the noise floor and the exploratory family (Holm-adjusted)."""
    out = {}
    for objective in ("sft", "dpo"):
        if not any(r["objective"] == objective for r in records.values()):
            continue
        exploratory = {
            name: comparison(records, objective, pair, value) for name, (pair, value) in EXPLORATORY.items()
        }
        adjusted = holm({k: v["p"] for k, v in exploratory.items()})
        for k, v in exploratory.items():
            v["p_holm"] = adjusted[k]
        out[objective] = {
            "primary": comparison(records, objective, PRIMARY),
            "noise_floor": comparison(records, objective, NOISE_FLOOR),
            "exploratory": exploratory,
        }
    return out


def _pts(x: float) -> str:
    return f"{100 * x:+.2f}"


def _row(name: str, c: dict, holm_p: bool = False) -> str:
    if "mean" not in c:  # under two pairs
        return f"| {name} | {c['n']} | | | | |" + (f" {c['p_holm']:.3f} |" if holm_p else "")
    cells = [
        name,
        str(c["n"]),
        _pts(c["mean"]),
        f"[{_pts(c['low'])}, {_pts(c['high'])}]",
        f"{100 * c['half_width']:.2f}",
        f"{c['p']:.3f}",
    ]
    if holm_p:
        cells.append(f"{c['p_holm']:.3f}")
    return "| " + " | ".join(cells) + " |"


def _arm_row(arm: str, recs: list[dict]) -> str:
    its = [it for r in recs for it in r["iterations"]]
    rows = statistics.mean(it["rows"] for it in its)
    steps = [it.get("train_steps") for it in its if it.get("train_steps") is not None]
    by_rows = Counter()  # rows a problem gave -> problems
    for it in its:
        by_rows.update({int(k): v for k, v in it.get("problems_by_row_count", {}).items()})
    with_rows = sum(by_rows.values())
    cap = recs[0]["run"]["max_rows_per_problem"]
    eps = [r["endpoint"] for r in recs]
    return (
        f"| {arm} | {len(recs)} | {statistics.mean(eps):.4f}"
        + (f" ± {statistics.stdev(eps):.4f}" if len(eps) > 1 else "")
        + f" | {statistics.mean(r['initial_endpoint'] for r in recs):.4f}"
        + f" | {statistics.mean(it['budget_spent'] for it in its):.0f}"
        + f" | {'yes' if all(it['budget_spent'] == it['budget_planned'] for it in its) else 'NO'}"
        + f" | {rows:.0f} | {with_rows / len(its):.0f}"
        + f" | {100 * by_rows[cap] / with_rows if with_rows else 0:.0f}%"
        + f" | {statistics.mean(steps) if steps else float('nan'):.1f}"
        + f" | {statistics.mean(r['wall_seconds'] for r in recs):.0f} |"
    )


def is_complete(c: dict, planned_seeds: int = SEEDS) -> bool:
    """Every planned seed has its pair, both arms on one machine."""
    return set(range(planned_seeds)) <= set(c["seeds"])


def verdict(a: dict, *, complete: bool, expected_half_width: float | None = None) -> list[str]:
    """The readings the protocol fixed in advance, as bullet lines."""
    out, floor, c = [], a["noise_floor"], a["primary"]
    sound = "mean" not in floor or floor["low"] <= 0 <= floor["high"]
    if "mean" in floor:
        out.append(
            "- Noise floor: the same-procedure interval "
            + (
                "holds 0, as the protocol requires"
                if sound
                else "**excludes 0: the cause is found before anything else is read**"
            )
            + ("." if complete else " (so far).")
        )
    for name, comp in (("primary", c), ("noise floor", floor)):
        if comp["mixed_machines"]:
            out.append(
                f"- Left out of the {name}, their arms on different machines: seeds {', '.join(map(str, comp['mixed_machines']))}."
            )
    if "mean" not in c:
        return out
    expected = (
        ""
        if expected_half_width is None
        else f"; the power calculation expected {100 * expected_half_width:.2f} at the planned seeds"
    )
    out.append(
        f"- Half-width reached: {100 * c['half_width']:.2f} points (the protocol asked for {100 * HALF_WIDTH:.1f}{expected})."
    )
    if not complete:
        out.append("- Primary: interim; the protocol draws no conclusion before every planned seed has run.")
    elif not sound:
        out.append("- Primary: withheld until the noise floor's failure is explained.")
    elif c["low"] > 0:
        out.append(
            f"- Primary: **confirmed on this world**: hsstar ahead by {_pts(c['mean'])} points, interval above 0."
        )
    elif c["high"] < 0:
        out.append(
            f"- Primary: **refuted on this world**: hsstar behind by {abs(100 * c['mean']):.2f} points, interval below 0."
        )
    else:
        out.append(
            f"- Primary: **no effect detected**: the 95% interval rules out an advantage of hsstar above "
            f"{100 * c['high']:.2f} points and a deficit beyond {-100 * c['low']:.2f} points."
        )
    return out


def _curves(recs: list[dict]) -> str:
    """Mean endpoint-level accuracy after each iteration over the records (M_0 first)."""
    n = min(len(r["iterations"]) for r in recs)
    means = [statistics.mean(r["initial_endpoint"] for r in recs)]
    means += [
        statistics.mean(
            statistics.mean(r["iterations"][i]["held_out"][lv] for lv in ENDPOINT_LEVELS) for r in recs
        )
        for i in range(n)
    ]
    return " → ".join(f"{v:.4f}" for v in means)


def report(all_records: dict, power_calc: dict, *, quick: bool = False, planned_seeds: int = SEEDS) -> str:
    """The study's section of docs/benchmarks.md, from its records and the power calculation alone."""
    records, left_out = protocol_records(all_records, quick=quick, seeds=planned_seeds)
    analysis = analyse(records)
    lines = [
        MARKS[0],
        "",
        "## The pre-registered study: hsstar against uniform (`benchmarks/bench_study.py`)",
        "",
        "The protocol, committed before these runs: [protocol.md](protocol.md). Primary endpoint: the mean held-out "
        f"greedy accuracy after the last {ENDPOINT_ITERATIONS} iterations on levels {ENDPOINT_LEVELS[0]} to "
        f"{ENDPOINT_LEVELS[-1]} ({EVAL_PER_LEVEL} problems each), in points (1 point = 0.01). Primary comparison: "
        "hsstar - uniform at equal generated samples, paired by seed, one per objective. Everything else is "
        f"exploratory, its p-values Holm-adjusted over the {len(EXPLORATORY)} comparisons of its objective.",
        "",
        "**Power calculation** (the sd of hsstar - uniform on this endpoint in the earlier study, "
        "`benchmarks/results/bench_methods.json`, 150 problems per level there; normal approximation of the "
        "noncentral t, two-sided 0.05):",
        "",
        "| objective | prior seeds | prior sd (points) | seeds for 80% power at 1 point | seeds for a half-width of 0.6 "
        "points | seeds planned | half-width at the planned seeds | 80%-power effect at the planned seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for objective, pc in power_calc.items():
        lines.append(
            f"| {objective.upper()} | {pc['prior_seeds']} | {100 * pc['prior_sd']:.2f} | {pc['seeds_for_power']} | "
            f"{pc['seeds_for_half_width']} | {pc['seeds']} | {100 * pc['half_width_at_seeds']:.2f} | "
            f"{100 * pc['detectable_at_seeds']:.2f} |"
        )
    lines.append("")
    values = lambda field: sorted({str(r[field]) for r in records.values()})  # noqa: E731
    lines += [
        f"Records: {len(records)} runs in `benchmarks/results/study/`, one JSON each"
        + (
            f" ({len(left_out)} more left out: {'; '.join(f'{k}, {v}' for k, v in sorted(left_out.items()))})"
            if left_out
            else ""
        )
        + ". Commits: "
        + ", ".join(f"`{c}`" for c in values("commit"))
        + ". Machines: "
        + "; ".join(values("machine"))
        + ". Torch threads per run: "
        + " or ".join(values("torch_threads"))
        + f", {' or '.join(values('jobs'))} runs at a time. Commands:",
        "",
        *[f"    {c}" for c in values("command")],
        "",
    ]
    for objective, a in analysis.items():
        complete = is_complete(a["primary"], planned_seeds)
        done = len(a["primary"]["seeds"])
        status = (
            "complete" if complete else f"**interim: {done} of {planned_seeds} seeds; no claim is drawn**"
        )
        lines += [
            f"### {objective.upper()} ({status})",
            "",
            "| comparison (paired by seed) | seeds | mean (points) | 95% interval | half-width | p |",
            "|---|---:|---:|---|---:|---:|",
            _row("**primary: hsstar - uniform, equal samples**", a["primary"]),
            _row("noise floor: uniform-again - uniform", a["noise_floor"]),
            "",
            *verdict(
                a,
                complete=complete,
                expected_half_width=power_calc.get(objective, {}).get("half_width_at_seeds"),
            ),
            "",
            f"Exploratory (Holm over the {len(EXPLORATORY)}):",
            "",
            "| comparison (paired by seed) | seeds | mean (points) | 95% interval | half-width | p | p, Holm |",
            "|---|---:|---:|---|---:|---:|---:|",
            *[_row(name, c, holm_p=True) for name, c in a["exploratory"].items()],
            "",
            "| arm | seeds | endpoint, mean ± sd | M_0 on the endpoint | samples per iteration | budget exact | rows "
            "per iteration | problems with rows | of those at the cap | optimizer steps per iteration | wall s / run |",
            "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        arms = {
            arm: [r for r in records.values() if r["objective"] == objective and r["arm"] == arm]
            for arm in ARMS
        }
        lines += [_arm_row(arm, recs) for arm, recs in arms.items() if recs]
        lines += [
            "",
            "Held-out accuracy on the endpoint's levels after each iteration, mean over seeds (M_0 first):",
            "",
        ]
        lines += [f"- {arm}: {_curves(recs)}" for arm, recs in arms.items() if recs]
        lines.append("")
    lines.append(MARKS[1])
    return "\n".join(lines)


def readme_line(all_records: dict, *, quick: bool = False, planned_seeds: int = SEEDS) -> str:
    """The README's one line of what the study measured, from its records alone."""
    analysis = analyse(protocol_records(all_records, quick=quick, seeds=planned_seeds)[0])
    parts = []
    for objective in ("sft", "dpo"):
        c = analysis.get(objective, {}).get("primary")
        if c is None or "mean" not in c:
            parts.append(f"{objective.upper()} not yet run")
            continue
        done = len(c["seeds"])
        parts.append(
            f"{objective.upper()} {_pts(c['mean'])} points, 95% interval [{_pts(c['low'])}, {_pts(c['high'])}] "
            + (
                f"({done} seeds)"
                if is_complete(c, planned_seeds)
                else f"(interim, {done} of {planned_seeds} seeds: no claim drawn yet)"
            )
        )
    return (
        f"{README_MARKS[0]}\n**Measured here:** on the embedded world, hsstar minus uniform at equal samples, on the "
        "pre-registered endpoint ([protocol](docs/protocol.md), [results](docs/benchmarks.md)): "
        + "; ".join(parts)
        + f".\n{README_MARKS[1]}"
    )


def publish(records: dict, args) -> None:
    """The report into ``--report`` and the README's line into ``--readme``, from the records."""
    settings = {"quick": args.quick, "planned_seeds": SEEDS if not args.quick else args.seeds}
    write_report(Path(args.report), report(records, power_calculation(), **settings), marks=MARKS)
    if args.readme:
        write_report(Path(args.readme), readme_line(records, **settings), marks=README_MARKS)


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1 (runs at a time), got {args.jobs}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    # a smoke test never writes into the study: its records and report go under its work dir unless named
    home = Path(args.work_dir) if args.quick else ROOT
    args.seeds = args.seeds or (2 if args.quick else SEEDS)
    args.records = args.records or str(home / "benchmarks" / "results" / "study")
    args.report = args.report or str(home / "docs" / "benchmarks.md")
    args.readme = str(home / "README.md") if args.readme is None else args.readme
    records_dir = Path(args.records)
    records_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        records = read_records(records_dir)
        publish(records, args)
        print(f"report from {len(records)} records: {args.report}")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from trl_hsstar.toy.world import toy_prm_path

    size = sizes(args)
    reasoner, build, initial = start_from_m0(args, size)
    prm = None if args.quick else str(toy_prm_path(reasoner, args.cache_dir, progress=True))
    runs = plan(args)
    pending = [r for r in runs if not (records_dir / f"{key(r)}.json").exists()]
    jobs = max(1, min(args.jobs, len(pending)))
    threads = max(1, torch.get_num_threads() // jobs)
    context = {
        "commit": git_commit(),
        "command": portable_command(
            ["hsstar", "bench", "--protocol", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "torch": torch.__version__,
        "jobs": jobs,
        "reasoner_sha256": build.get("sha256"),
        "initial_endpoint": initial["endpoint"],
    }
    print(
        f"{len(runs)} runs, {len(runs) - len(pending)} recorded; {len(pending)} to do, {jobs} at a time with {threads} torch thread(s)",
        flush=True,
    )
    common = dict(args=args, reasoner=str(reasoner), prm=prm, initial=initial, context=context)
    if jobs == 1:
        torch.set_num_threads(threads)
    for done, (k, record) in enumerate(
        in_workers(execute, pending, at_a_time=jobs, threads=threads, **common), 1
    ):
        print(
            f"[{done}/{len(pending)}] {k}: endpoint {record['endpoint']:.4f} (M_0 {initial['endpoint']:.4f}), "
            f"{record['wall_seconds']} s",
            flush=True,
        )
    publish(read_records(records_dir), args)
    print(f"report: {args.report}\nrecords: {records_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
