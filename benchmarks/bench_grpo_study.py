"""The pre-registered GRPO study of docs/protocol.md ("The GRPO study"): ``HSStarGRPOTrainer`` with the ``hsstar``
allocation against plain GRPO (``uniform``) at equal generated completions, on the world, from the shipped M_0.

Per seed, four arms on the seed's 128 problems, 8 completions per prompt, 8 prompts per round, 3 epochs (3,072
completions, the offline study's budget): ``uniform``, ``hsstar``, ``uniform-again`` (uniform with another
procedure seed on the same problems: the noise floor) and ``dapo`` (DAPO's dynamic sampling, amendment 1). The endpoint is the offline study's: mean held-out greedy
accuracy after the last two epochs on levels 3x1 to 8x1, 400 problems each. Each run's record goes to
``benchmarks/results/grpo_study/`` as it ends (a rerun skips finished runs); at the end they are collected into
``benchmarks/results/bench_grpo_study.json`` (``--collect`` does only that), and the section between the markers is
rendered from that record alone (``--report-only`` renders it again, without touching the record).

    python benchmarks/bench_grpo_study.py                                   # 20 seeds x 4 arms, 2 runs at a time
    python benchmarks/bench_grpo_study.py --collect --output docs/benchmarks.md       # records -> record -> section
    python benchmarks/bench_grpo_study.py --report-only --output docs/benchmarks.md   # record -> section
    python benchmarks/bench_grpo_study.py --quick --work-dir /tmp/q         # a smoke test on the tiny reasoner
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_study
from bench_methods import (
    add_report_only,
    git_commit,
    in_workers,
    machine,
    portable_command,
    publish,
    republish,
)
from stats import holm, paired

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results/bench_grpo_study.json"
RUNS = ROOT / "benchmarks" / "results" / "grpo_study"
MARKS = ("<!-- bench_grpo_study:start -->", "<!-- bench_grpo_study:end -->")

# -- the protocol's fixed numbers (docs/protocol.md, "The GRPO study"); changing one is a new protocol

SETTING = {
    "problems": 128,
    "num_generations": 8,
    "prompts_per_round": 8,
    "num_train_epochs": 3,
    "learning_rate": 1e-4,
    "temperature": 0.7,
    "top_p": 0.95,
    "reprobe_rate": 0.1,
    "eval_per_level": 400,
}
SEEDS = 20
ARMS = {
    "uniform": ("uniform", 0),
    "hsstar": ("hsstar", 0),
    "uniform-again": ("uniform", 10_000),
    "dapo": ("dapo", 0),
}
PRIMARY = ("hsstar", "uniform")
NOISE_FLOOR = ("uniform-again", "uniform")
SECONDARY = {"hsstar - dapo": ("hsstar", "dapo"), "dapo - uniform": ("dapo", "uniform")}
"""Amendment 1's comparisons, Holm over these two."""
ENDPOINT_LEVELS = bench_study.ENDPOINT_LEVELS
ENDPOINT_EPOCHS = 2
TARGETS = {"signal_share": 0.9, "gain": 0.02}
"""The issue's targets: >= 90% of hsstar's rollouts in groups with signal; hsstar - uniform >= +2 points."""


def _epoch(record: dict, i: int, levels=ENDPOINT_LEVELS) -> float:
    """Mean held-out accuracy over ``levels`` after epoch ``i``."""
    return statistics.mean(record["held_out_by_epoch"][i][lv] for lv in levels)


def endpoint(record: dict, *, last: int = ENDPOINT_EPOCHS, levels=ENDPOINT_LEVELS) -> float:
    """Mean over the last ``last`` epochs of the mean held-out accuracy over ``levels``."""
    return statistics.mean(_epoch(record, i, levels) for i in range(-last, 0))


# -- one run (the pieces the real-model reading, bench_grpo_smollm2.py, shares)


def study_config(size: dict, *, output_dir: str, allocation: str, seed: int, max_completion_length: int):
    """The ``HSStarGRPOConfig`` the GRPO studies fix: one optimizer step per round, cosine, nothing saved."""
    from trl_hsstar import HSStarGRPOConfig

    return HSStarGRPOConfig(
        output_dir=output_dir,
        allocation=allocation,
        reprobe_rate=size["reprobe_rate"],
        num_generations=size["num_generations"],
        per_device_train_batch_size=size["num_generations"] * size["prompts_per_round"],
        max_completion_length=max_completion_length,
        temperature=size["temperature"],
        top_p=size["top_p"],
        learning_rate=size["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        num_train_epochs=size["num_train_epochs"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        use_cpu=True,
        bf16=False,
    )


def counted_reward(is_right, spent: Counter):
    """A TRL reward function: 1 where ``is_right(text, answer)``; counts into ``spent`` the completions, the groups
    and the groups whose rewards differ."""

    def correct(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = [1.0 if is_right(t, a) else 0.0 for t, a in zip(texts, answer)]
        groups: dict[str, set[float]] = {}
        for p, r in zip(prompts, rewards):
            groups.setdefault(json.dumps(p), set()).add(r)
        spent["completions"] += len(completions)
        spent["groups"] += len(groups)
        spent["groups_with_signal"] += sum(len(v) > 1 for v in groups.values())
        return rewards

    return correct


def allocation_fields(trainer, spent: Counter) -> dict:
    """What a run record keeps of the trainer's allocation."""
    return {
        "completions": spent["completions"],
        "groups": spent["groups"],
        "groups_with_signal": spent["groups_with_signal"],
        "rollouts_by_level_when_drawn": dict(trainer.rollouts),
        "steps": trainer.state.global_step,
        "rounds": trainer.rounds_spent,
        "dropped_groups": sum(h.get("allocation/dropped_groups", 0) for h in trainer.state.log_history),
    }


def key(run: dict) -> str:
    return f"grpo-{run['arm']}-s{run['seed']}"


def execute(run: dict, *, args, reasoner: str, initial: dict, context: dict) -> tuple[str, dict]:
    """One arm of one seed from M_0; its record is written as it ends."""
    import shutil

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback

    from trl_hsstar import HSStarGRPOTrainer
    from trl_hsstar.artifacts import atomic_write_text
    from trl_hsstar.toy.experiment import world_problems
    from trl_hsstar.toy.world import evaluate_levels
    from trl_hsstar.verify import verify_answer

    size = sizes(args)
    allocation, offset = ARMS[run["arm"]]
    held = bench_study.held_out(size["eval_per_level"])
    problems = world_problems(size["problems"], seed=run["seed"], exclude=held)
    spent = Counter()

    tokenizer = AutoTokenizer.from_pretrained(reasoner)
    by_epoch: list[dict] = []

    class EvalEachEpoch(TrainerCallback):
        """After each epoch's worth of completions: the epoch's end, or DAPO's first step past it."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            passed = trainer.rounds_spent // rounds_per_epoch  # epochs' worth of completions spent
            if passed > len(by_epoch):
                model.eval()
                accuracy = evaluate_levels(model, tokenizer, held)
                model.train()
                by_epoch.extend([accuracy] * (passed - len(by_epoch)))  # one step may pass two marks

    out_dir = Path(args.work_dir) / "out" / key(run)
    if out_dir.exists():  # an interrupted run restarts from scratch: its record is what counts
        shutil.rmtree(out_dir)
    longest = max(len(p.rationale()) for p in problems)
    rounds_per_epoch = size["problems"] // size["prompts_per_round"]
    config = study_config(
        size,
        output_dir=str(out_dir),
        allocation=allocation,
        seed=run["seed"] + offset,
        max_completion_length=longest + 16,
    )
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": str(p.answer)} for p in problems])
    trainer = HSStarGRPOTrainer(
        model=reasoner,
        reward_funcs=counted_reward(verify_answer, spent),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[EvalEachEpoch()],
    )
    trainer.remove_callback(PrinterCallback)
    started = time.monotonic()
    trainer.train()
    wall = time.monotonic() - started
    record = {
        **run,
        "quick": args.quick,
        "setting": size,
        "initial": initial,
        "held_out_by_epoch": by_epoch,
        **allocation_fields(trainer, spent),
        "wall_seconds": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        **context,
    }
    record["endpoint"] = endpoint(record, last=min(ENDPOINT_EPOCHS, len(by_epoch)))
    shutil.rmtree(out_dir, ignore_errors=True)  # nothing is saved but the record
    atomic_write_text(Path(args.records) / f"{key(run)}.json", json.dumps(record, indent=1) + "\n")
    return key(run), record


def sizes(args) -> dict:
    if args.quick:
        return {**SETTING, "problems": 16, "num_generations": 4, "prompts_per_round": 4, "eval_per_level": 5}
    return dict(SETTING)


# -- the analysis and the report (from the collected record alone)


def protocol_runs(runs: dict, *, quick: bool = False, seeds: int = SEEDS) -> dict:
    return {
        k: r
        for k, r in runs.items()
        if r.get("quick", False) == quick
        and r["seed"] in range(seeds)
        and (quick or str(r.get("reasoner_sha256")).startswith(bench_study.M0_SHA256))
    }


def _by_seed(runs: dict, arm: str) -> dict[int, dict]:
    return {r["seed"]: r for r in runs.values() if r["arm"] == arm}


def comparison(runs: dict, pair: tuple[str, str], value=endpoint) -> dict:
    a, b = _by_seed(runs, pair[0]), _by_seed(runs, pair[1])
    both = set(a) & set(b)
    seeds = sorted(s for s in both if a[s]["machine"] == b[s]["machine"])
    return {
        **(paired([value(a[s]) - value(b[s]) for s in seeds]) or {"n": len(seeds), "p": 1.0}),
        "seeds": seeds,
        "mixed_machines": sorted(both - set(seeds)),
    }


def _signal_share(r: dict) -> float:
    """Share of the run's completions in groups whose rewards were not all equal."""
    return r["groups_with_signal"] * r["setting"]["num_generations"] / r["completions"]


EXPLORATORY = {
    "final epoch only: hsstar - uniform": (PRIMARY, lambda r: endpoint(r, last=1)),
    **{
        f"level {lv}: hsstar - uniform": (PRIMARY, lambda r, lv=lv: endpoint(r, levels=(lv,)))
        for lv in ENDPOINT_LEVELS
    },
    "share of completions with signal: hsstar - uniform": (PRIMARY, _signal_share),
}


def analyse(runs: dict) -> dict:
    exploratory = {name: comparison(runs, pair, value) for name, (pair, value) in EXPLORATORY.items()}
    adjusted = holm({k: v["p"] for k, v in exploratory.items()})
    for k, v in exploratory.items():
        v["p_holm"] = adjusted[k]
    secondary = {name: comparison(runs, pair) for name, pair in SECONDARY.items()}
    adjusted = holm({k: v["p"] for k, v in secondary.items()})
    for k, v in secondary.items():
        v["p_holm"] = adjusted[k]
    return {
        "primary": comparison(runs, PRIMARY),
        "noise_floor": comparison(runs, NOISE_FLOOR),
        "exploratory": exploratory,
        "secondary": secondary,
    }


def _arm_row(arm: str, recs: list[dict]) -> str:
    eps = [r["endpoint"] for r in recs]
    levels = Counter()
    for r in recs:
        levels.update(r["rollouts_by_level_when_drawn"])
    total = sum(levels.values())
    return (
        f"| {arm} | {len(recs)} | {statistics.mean(eps):.4f}"
        + (f" ± {statistics.stdev(eps):.4f}" if len(eps) > 1 else "")
        + f" | {statistics.mean(r['initial']['endpoint'] for r in recs):.4f}"
        + f" | {', '.join(sorted({str(r['completions']) for r in recs}))}"
        + f" | {100 * statistics.mean(_signal_share(r) for r in recs):.0f}%"
        + f" | {1000 * statistics.mean(r['groups_with_signal'] / r['completions'] for r in recs):.0f}"
        + " | "
        + ", ".join(
            f"{lv} {100 * levels[lv] / total:.0f}%" for lv in ("unprobed", "easy", "boundary", "hard")
        )
        + f" | {statistics.mean(r['steps'] for r in recs):.1f}"
        + f" | {statistics.mean(r.get('dropped_groups', 0) for r in recs):.1f}"
        + f" | {statistics.mean(r['wall_seconds'] for r in recs):.0f} |"
    )


def render(record: dict) -> str:
    """The study's section of docs/benchmarks.md, from its collected record alone."""
    runs, planned = record["runs"], record["planned_seeds"]
    a = analyse(runs)
    complete = bench_study.is_complete(a["primary"], planned)
    done = len(a["primary"]["seeds"])
    status = "complete" if complete else f"**interim: {done} of {planned} seeds; no claim is drawn**"
    values = lambda field: sorted({str(r[field]) for r in runs.values()})  # noqa: E731
    arms = {arm: [r for r in runs.values() if r["arm"] == arm] for arm in ARMS}
    lines = [
        MARKS[0],
        "",
        f"## The pre-registered GRPO study: hsstar against uniform allocation ({status})",
        "",
        "The protocol, committed before these runs: [protocol.md](protocol.md#the-grpo-study). `HSStarGRPOTrainer` "
        f"from the shipped M_0 on each seed's {record['setting']['problems']} problems, "
        f"{record['setting']['num_generations']} completions per prompt, {record['setting']['prompts_per_round']} "
        f"prompts per round, {record['setting']['num_train_epochs']} epochs, learning rate "
        f"{record['setting']['learning_rate']:g}; `uniform` is TRL's own sampler. Primary endpoint: the mean held-out "
        f"greedy accuracy after the last {ENDPOINT_EPOCHS} epochs on levels {ENDPOINT_LEVELS[0]} to "
        f"{ENDPOINT_LEVELS[-1]} ({record['setting']['eval_per_level']} problems each), in points. Primary "
        f"comparison: hsstar - uniform at equal generated completions, paired by seed. Planned seeds: {planned} "
        "(the offline study's power calculation). Everything else is exploratory, Holm-adjusted over "
        f"{len(EXPLORATORY)}.",
        "",
        f"Record: `{RESULTS}` (collected from {len(runs)} runs in `benchmarks/results/grpo_study/`). Commit "
        f"`{record['meta']['commit']}`; run commits: {', '.join(f'`{c}`' for c in values('commit'))}. Machines: "
        + "; ".join(values("machine"))
        + ". Torch threads per run: "
        + " or ".join(values("torch_threads"))
        + f", {' or '.join(values('jobs'))} runs at a time. Command: `{record['meta']['command']}`; runs made with:",
        "",
        *[f"    {c}" for c in values("command")],
        "",
        "| comparison (paired by seed) | seeds | mean (points) | 95% interval | half-width | p |",
        "|---|---:|---:|---|---:|---:|",
        bench_study._row("**primary: hsstar - uniform, equal completions**", a["primary"]),
        bench_study._row("noise floor: uniform-again - uniform", a["noise_floor"]),
        "",
        *bench_study.verdict(a, complete=complete),
        "",
        f"Exploratory (Holm over the {len(EXPLORATORY)}; the last row in share points, not accuracy):",
        "",
        "| comparison (paired by seed) | seeds | mean (points) | 95% interval | half-width | p | p, Holm |",
        "|---|---:|---:|---|---:|---:|---:|",
        *[bench_study._row(name, c, holm_p=True) for name, c in a["exploratory"].items()],
        "",
    ]
    if any(r["arm"] == "dapo" for r in runs.values()):
        lines += [
            "Secondary (protocol amendment 1, Holm over these 2): DAPO's dynamic sampling at the same completions. "
            "`dapo` is evaluated after each epoch's worth of completions, at the first step past it.",
            "",
            "| comparison (paired by seed) | seeds | mean (points) | 95% interval | half-width | p | p, Holm |",
            "|---|---:|---:|---|---:|---:|---:|",
            *[bench_study._row(name, c, holm_p=True) for name, c in a["secondary"].items()],
            "",
        ]
    lines += [
        "| arm | seeds | endpoint, mean ± sd | M_0 on the endpoint | completions per run | completions in groups "
        "with signal | signal-bearing groups per 1,000 completions | completions by the prompt's level when drawn "
        "| optimizer steps | groups dropped | wall s / run |",
        "|---|---:|---|---:|---|---:|---:|---|---:|---:|---:|",
        *[_arm_row(arm, recs) for arm, recs in arms.items() if recs],
        "",
        "Held-out accuracy on the endpoint's levels after each epoch, mean over seeds (M_0 first):",
        "",
    ]
    for arm, recs in arms.items():
        if recs:
            n = min(len(r["held_out_by_epoch"]) for r in recs)
            curve = [statistics.mean(r["initial"]["endpoint"] for r in recs)]
            curve += [statistics.mean(_epoch(r, i) for r in recs) for i in range(n)]
            lines.append(f"- {arm}: " + " → ".join(f"{v:.4f}" for v in curve))
    h, c = arms.get("hsstar"), a["primary"]
    lines += ["", "Targets (issue 28):", ""]
    if h:
        share = statistics.mean(_signal_share(r) for r in h)
        lines.append(
            f"- completions in groups with signal under hsstar >= {100 * TARGETS['signal_share']:.0f}%: "
            f"**{'met' if share >= TARGETS['signal_share'] else 'not met'}** ({100 * share:.0f}%)."
        )
    if "mean" in c:
        met = complete and c["mean"] >= TARGETS["gain"] and c["low"] > 0
        lines.append(
            f"- hsstar - uniform >= +{100 * TARGETS['gain']:.0f} points with the interval above 0: "
            f"**{'met' if met else 'not met'}** ({bench_study._pts(c['mean'])} [{bench_study._pts(c['low'])}, "
            f"{bench_study._pts(c['high'])}]{'' if complete else ', interim'})."
        )
    d = a["secondary"]["hsstar - dapo"]
    if "mean" in d:
        met = set(range(planned)) <= set(d["seeds"]) and d["low"] > 0
        lines.append(
            f"- ahead of `dapo` (hsstar - dapo, interval above 0): **{'met' if met else 'not met'}** "
            f"({bench_study._pts(d['mean'])} [{bench_study._pts(d['low'])}, {bench_study._pts(d['high'])}])."
        )
    else:
        lines.append("- ahead of `dapo`: not measured yet.")
    lines += ["", MARKS[1]]
    return "\n".join(lines)


# -- the command


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--seeds", type=int, default=None, help=f"seeds 0 to N-1 (the protocol: {SEEDS}; --quick: 2)"
    )
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "grpo-study"), help="the runs' scratch space")
    p.add_argument("--records", default=None, help="one JSON record per run (benchmarks/results/grpo_study)")
    p.add_argument("--results", default=None, help=f"the collected record ({RESULTS})")
    p.add_argument("--output", default=None, help="a Markdown file to write the section into")
    p.add_argument(
        "--jobs", type=int, default=2, help="runs at a time, each with its share of the torch threads"
    )
    p.add_argument("--quick", action="store_true", help="smoke test: the tiny reasoner, 2 seeds, 16 problems")
    p.add_argument(
        "--collect",
        action="store_true",
        help="collect the run records into --results and render; run nothing",
    )
    add_report_only(p)
    return p


def collect(args, argv) -> None:
    """The collected record: every run record of ``--records``, with the collection's own provenance."""
    runs = bench_study.read_records(Path(args.records))
    kept = protocol_runs(runs, quick=args.quick, seeds=args.seeds)
    record = {
        "meta": {
            "commit": git_commit(),
            "command": portable_command(["python", "benchmarks/bench_grpo_study.py", *argv]),
            "machine": machine(),
        },
        "setting": sizes(args),
        "planned_seeds": args.seeds,
        "runs": kept,
        "left_out": sorted(set(runs) - set(kept)),
    }
    publish(render, record, results=args.results, output=args.output, marks=MARKS)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    home = Path(args.work_dir) if args.quick else ROOT
    args.seeds = args.seeds or (2 if args.quick else SEEDS)
    args.records = args.records or str(home / "benchmarks" / "results" / "grpo_study")
    args.results = args.results or str(home / RESULTS)
    Path(args.records).mkdir(parents=True, exist_ok=True)
    if args.report_only:  # the section from the collected record alone
        republish(render, results=args.results, output=args.output, marks=MARKS)
        return 0
    if args.collect:
        collect(args, argv)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    size = sizes(args)
    reasoner, build, initial = bench_study.start_from_m0(args, size)
    runs = [{"seed": s, "arm": arm} for s in range(args.seeds) for arm in args.arms]
    pending = [r for r in runs if not (Path(args.records) / f"{key(r)}.json").exists()]
    jobs = max(1, min(args.jobs, len(pending)))
    threads = max(1, torch.get_num_threads() // jobs)
    context = {
        "commit": git_commit(),
        "command": portable_command(["python", "benchmarks/bench_grpo_study.py", *argv]),
        "machine": machine(),
        "torch": torch.__version__,
        "jobs": jobs,
        "reasoner_sha256": build.get("sha256"),
    }
    print(
        f"{len(runs)} runs, {len(pending)} to do, {jobs} at a time with {threads} torch thread(s)", flush=True
    )
    if jobs == 1:
        torch.set_num_threads(threads)
    common = dict(args=args, reasoner=reasoner, initial=initial, context=context)
    for done, (k, record) in enumerate(
        in_workers(execute, pending, at_a_time=jobs, threads=threads, **common), 1
    ):
        print(
            f"[{done}/{len(pending)}] {k}: endpoint {record['endpoint']:.4f} (M_0 {initial['endpoint']:.4f}), "
            f"signal {100 * _signal_share(record):.0f}%, {record['wall_seconds']} s",
            flush=True,
        )
    collect(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
