"""Equal-budget comparison of sampling-budget allocation methods on the embedded world (``hsstar bench``).

The same M_0, PRM, held-out problems, training problems and seeds for every method; every method spends exactly
``sampling_budget`` samples per problem on average. Three studies:

* main: by default hsstar (the release's rule) against uniform (STaR/RFT), SFT and DPO, 5 seeds, with the paired
  difference per seed and its 95% interval; ``--methods`` adds prop2diff (DART-Math), band (pass-rate band),
  knapsack (Knapsack RL, Li et al. 2025, arXiv 2509.25849) and hsstar_adaptive (the budget over four rounds, a
  problem dropped once it has its quota of rows);
* utility: the re-sampling budget (and the training) on easy, boundary or hard problems only (SFT);
* n_p sweep: hsstar with n_p pre-samples from 0 to B (SFT).

Every run's record is saved as it finishes (``<work-dir>/runs/<key>.json``) and a rerun skips finished runs, so
an interrupted benchmark resumes. The report (tables, plots, command, machine, threads) replaces the section
between ``<!-- bench_methods:start -->`` and ``<!-- bench_methods:end -->`` in ``--report`` and the merged
records go to ``--results``.

    hsstar bench                # hsstar against uniform, SFT and DPO, 5 seeds (about 20 minutes on 2 cores)
    hsstar bench --methods uniform hsstar prop2diff band knapsack hsstar_adaptive --studies main utility sweep
    hsstar bench --quick        # a smoke test on the tiny reasoner (CI)
    hsstar bench --report-only  # the section rendered again from the record in --results; nothing runs

The section is rendered from the record alone (``render``); the helpers every benchmark shares live here:
``git_commit``, ``machine``, ``portable_command``, ``script_meta``, ``publish``, ``republish``, ``write_report``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import interval95

from trl_hsstar.toy.world import DPO_LEARNING_RATE, LEVELS, SFT_LEARNING_RATE  # light: no torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results/bench_methods.json"
"""Where the record goes by default, relative to the checkout; the docs section is rendered from it."""


def markers(section: str) -> tuple[str, str]:
    name = "bench_methods" + (f":{section}" if section else "")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


MAIN_METHODS = ("uniform", "hsstar", "prop2diff", "band", "knapsack", "hsstar_adaptive")
SOURCES = {
    "uniform": "STaR / RFT / ReST-EM: all B samples up front, train on every problem",
    "hsstar": "the HS-STaR release (Xiong et al. 2025, arXiv 2505.19866): 3 pre-samples, the rest to boundary problems",
    "prop2diff": "DART-Math (Tong et al. 2024, arXiv 2407.13690): the rest in proportion to the fail rate",
    "band": "the pass-rate band of DAPO (Yu et al. 2025, arXiv 2503.14476) and open-r1: the rest to problems solved "
    "sometimes",
    "knapsack": "Knapsack RL (Li et al. 2025, arXiv 2509.25849): the rest by marginal knapsack value of each problem",
    "hsstar_adaptive": "ours (docs/method.md): the rest over 4 rounds, to boundary problems without their quota of rows",
}
"""Each method of the main study and its source, printed under the report's setup."""
OURS = ("hsstar", "hsstar_adaptive")
"""The methods compared seed by seed against every other method."""
DPO_LR = DPO_LEARNING_RATE  # the world's defaults (trl_hsstar.toy.world)
SFT_LR = SFT_LEARNING_RATE


def tracks(args) -> list[tuple[str, str, float | None]]:
    """(name, objective, learning rate) of every main-study track: "sft", "dpo", and "sft-lr<x>" / "dpo-lr<x>" for
    other rates."""
    out = []
    if "sft" in args.objectives:
        out += [("sft" if lr == SFT_LR else f"sft-lr{lr:g}", "sft", lr) for lr in args.sft_learning_rates]
    if "dpo" in args.objectives:
        out += [("dpo" if lr == DPO_LR else f"dpo-lr{lr:g}", "dpo", lr) for lr in args.dpo_learning_rates]
    return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hsstar bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke test: tiny reasoner, 1 seed, 1 iteration, few problems"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--sweep-seeds", type=int, nargs="+", default=[0, 1], help="seeds of the utility study and n_p sweep"
    )
    p.add_argument("--num-iterations", type=int, default=3)
    p.add_argument("--problems-per-iteration", type=int, default=128)
    p.add_argument("--sampling-budget", type=int, default=8)
    p.add_argument("--eval-per-level", type=int, default=150)
    p.add_argument("--presample-sweep", type=int, nargs="+", default=[0, 1, 3, 5, 8])
    p.add_argument("--objectives", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    p.add_argument(
        "--sft-learning-rates",
        type=float,
        nargs="+",
        default=[SFT_LR],
        help=f"SFT learning rates of the main study (default {SFT_LR:g})",
    )
    p.add_argument(
        "--dpo-learning-rates",
        type=float,
        nargs="+",
        default=[DPO_LR],
        help=f"DPO learning rates of the main study (default {DPO_LR:g})",
    )
    p.add_argument("--reward", choices=["prm", "oracle"], default="prm")
    p.add_argument("--methods", nargs="+", default=["hsstar", "uniform"], choices=MAIN_METHODS)
    p.add_argument("--studies", nargs="+", default=["main"], choices=["main", "utility", "sweep"])
    p.add_argument(
        "--section", default="", help="write the report between <!-- bench_methods:SECTION:start/end -->"
    )
    p.add_argument("--title", default="Allocation methods at equal budget (the embedded world)")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--report", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--results", default=str(ROOT / RESULTS))
    add_report_only(p)  # the section of --report from the record in --results
    p.add_argument("--cache-dir", default=None, help="where M_0 and the PRM are cached (default: ~/.cache)")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at a time, each in its own process with the torch threads split between them (default: one a "
        "torch thread, at most 4; 1 with --quick). Two at a time on 2 cores took 0.68x the time of one at a time.",
    )
    return p


def plan(args) -> list[dict]:
    """Every run of the benchmark: study, objective, method, n_p and seed."""
    runs = []
    for track, objective, lr in tracks(args):
        for method in args.methods if "main" in args.studies else ():
            for seed in args.seeds:
                runs.append(
                    {
                        "study": "main",
                        "track": track,
                        "learning_rate": lr,
                        "objective": objective,
                        "method": method,
                        "num_presamples": 3,
                        "seed": seed,
                    }
                )
    if not args.quick and "utility" in args.studies:
        for method in ("hsstar-easy", "hsstar-hard"):  # hsstar-boundary is the main study's hsstar
            for seed in args.sweep_seeds:
                runs.append(
                    {
                        "study": "utility",
                        "track": "sft",
                        "learning_rate": None,
                        "objective": "sft",
                        "method": method,
                        "num_presamples": 3,
                        "seed": seed,
                    }
                )
    if not args.quick and "sweep" in args.studies:
        for n_p in args.presample_sweep:
            if n_p == 3:
                continue  # the main study's hsstar
            for seed in args.sweep_seeds:
                runs.append(
                    {
                        "study": "sweep",
                        "track": "sft",
                        "learning_rate": None,
                        "objective": "sft",
                        "method": "hsstar",
                        "num_presamples": n_p,
                        "seed": seed,
                    }
                )
    return runs


def key(run: dict) -> str:
    return f"{run['track']}-{run['method']}-np{run['num_presamples']}-s{run['seed']}"


def _mean_sd(values):
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _values(recs: list[dict], field: str) -> str:
    """The values of one field over records, as text ("1", "1 or 2"; "not recorded")."""
    values = sorted({r[field] for r in recs if field in r})
    return " or ".join(map(str, values)) if values else "not recorded"


def _span_minutes(recs) -> float | None:
    """Minutes from the start of the first run to the end of the last, over every invocation (None for
    records without times)."""
    if not recs or any("finished_at" not in r for r in recs):
        return None
    return (
        max(r["finished_at"] for r in recs) - min(r["finished_at"] - r["wall_seconds"] for r in recs)
    ) / 60


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _final(record):
    return record["iterations"][-1]["held_out"]


def summarise(records: dict[str, dict], runs: list[dict], levels) -> dict:
    """Per (objective, method, n_p): the mean and spread over seeds of every reported figure."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        rec = records.get(key(run))
        if rec is not None:
            groups.setdefault((run["track"], run["method"], run["num_presamples"]), []).append(rec)
    out = {}
    for (objective, method, n_p), recs in groups.items():
        its = [it for r in recs for it in r["iterations"]]
        out[(objective, method, n_p)] = {
            "seeds": len(recs),
            "final": [_final(r)["all"] for r in recs],
            "gain": [_final(r)["all"] - r["initial"]["all"] for r in recs],
            "curve": [
                [r["initial"]["all"], *(it["held_out"]["all"] for it in r["iterations"])] for r in recs
            ],
            "per_level": {lv: [_final(r)[lv] for r in recs] for lv in levels},
            "useful_rows_per_1000": statistics.mean(it["useful_rows_per_1000"] for it in its),
            "samples_on_easy": statistics.mean(it["samples_on_easy"] for it in its),
            "samples_on_boundary": statistics.mean(it["samples_on_boundary"] for it in its),
            "samples_on_hard": statistics.mean(it["samples_on_hard"] for it in its),
            "clean_row_share": _mean_or_none(it.get("clean_row_share") for it in its),
            "final_by_seed": {r["run"]["seed"]: _final(r)["all"] for r in recs},
            "budget_exact": all(it["budget_spent"] == it["budget_planned"] for it in its),
            "wall_seconds": statistics.mean(r["wall_seconds"] for r in recs),
        }
    return out


def _paired_line(summary: dict, objective: str, ours: str) -> list[str]:
    """``ours`` minus every other method, final accuracy, seed by seed, with the mean and its 95% interval."""
    base = summary.get((objective, ours, 3))
    pairs = []
    for method in (m for m in MAIN_METHODS if m != ours):
        other = summary.get((objective, method, 3))
        if base is None or other is None:
            continue
        seeds = sorted(set(base["final_by_seed"]) & set(other["final_by_seed"]))
        diffs = [base["final_by_seed"][k] - other["final_by_seed"][k] for k in seeds]
        if diffs:
            wins = sum(d > 0 for d in diffs)
            ci = interval95(diffs)
            pairs.append(
                f"{method} "
                + ", ".join(f"{d:+.3f}" for d in diffs)
                + f" (ahead on {wins} of {len(diffs)}"
                + ("" if ci is None else f"; mean {ci[0]:+.3f}, 95% interval [{ci[1]:+.3f}, {ci[2]:+.3f}]")
                + ")"
            )
    if not pairs:
        return []
    return [
        f"{ours} minus each other method, final accuracy, seed by seed (same problems and held-out set per seed): "
        + "; ".join(pairs)
        + ".",
        "",
    ]


def report(args, records, runs, summary, meta, levels, plots) -> str:
    start, end = markers(args.section)
    lines = [start, "", f"## {args.title}", ""]
    lines += [
        f"Command: `{meta['command']}`  ",
        commit_line(meta) + "  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}; the runs had {meta['threads_per_run']} torch thread(s) "
        f"each{'' if meta['jobs'] == 'not recorded' else ', ' + meta['jobs'] + ' at a time'}; load average at start "
        f"{meta['load_average']}. The {meta['num_runs']} runs took {meta['run_minutes']:.1f} min of run time in all"
        + (
            ""
            if meta.get("span_minutes") is None
            else f", {meta['span_minutes']:.1f} min from the first run's start to the last run's end"
        )
        + f"; the invocation that wrote this took {meta['total_minutes']:.1f} min end to end (a rerun reads "
        "finished runs back; M_0 and the PRM are built when not cached).  ",
        f"Setup: M_0 `{meta['reasoner']}` (greedy held-out accuracy {meta['initial']['all']:.3f}; {meta['m0_build']}); reward "
        f"{meta['reward']}; {args.num_iterations} iterations x {args.problems_per_iteration} fresh problems, budget "
        f"B={args.sampling_budget} per problem ({args.problems_per_iteration * args.sampling_budget} samples per "
        f"iteration for every method); held-out: {args.eval_per_level} problems per level, greedy; the learning rate in each table's heading, cosine, one epoch per "
        "iteration, at most 4 rows (pairs) per problem. Figures are "
        "mean ± sd over seeds; `gain` is final minus M_0.",
        "",
        "M_0 per level: " + ", ".join(f"{lv} {meta['initial'][lv]:.2f}" for lv in levels),
        "",
        "Methods: " + "; ".join(f"`{m}` {SOURCES[m]}" for m in MAIN_METHODS if m in args.methods) + ".",
        "",
    ]
    for objective, _, lr in tracks(args):
        rate = f" (lr {lr:g})" if lr is not None else ""
        lines += [f"### Main study, {objective.split('-')[0].upper()}{rate}", ""]
        head = [
            "method",
            "seeds",
            "final accuracy",
            "gain",
            *levels,
            "useful rows / 1k samples",
            "rows with every step right",
            "samples on easy / boundary / hard per iteration",
            "budget exact",
            "wall s / run",
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in MAIN_METHODS:
            s = summary.get((objective, method, 3))
            if s is None:
                continue
            lines.append(
                "| "
                + " | ".join(
                    [
                        method,
                        str(s["seeds"]),
                        _mean_sd(s["final"]),
                        _mean_sd(s["gain"]),
                        *(f"{statistics.mean(s['per_level'][lv]):.2f}" for lv in levels),
                        f"{s['useful_rows_per_1000']:.0f}",
                        "n/a" if s["clean_row_share"] is None else f"{100 * s['clean_row_share']:.0f}%",
                        f"{s['samples_on_easy']:.0f} / {s['samples_on_boundary']:.0f} / {s['samples_on_hard']:.0f}",
                        "yes" if s["budget_exact"] else "NO",
                        f"{s['wall_seconds']:.0f}",
                    ]
                )
                + " |"
            )
        lines.append("")
        for ours in OURS:
            lines += _paired_line(summary, objective, ours)
        lines.append("Held-out accuracy after each iteration (mean over seeds; M_0 first):")
        lines.append("")
        for method in MAIN_METHODS:
            s = summary.get((objective, method, 3))
            if s is not None:
                curve = [statistics.mean(c[i] for c in s["curve"]) for i in range(len(s["curve"][0]))]
                lines.append(f"- {method}: " + " → ".join(f"{v:.3f}" for v in curve))
        lines.append("")
        if plots.get(objective):
            lines += [f"![{objective} accuracy per iteration]({plots[objective]})", ""]
    # the utility study and the sweep ran on fewer seeds: every row of theirs is over those seeds alone
    on_sweep_seeds = summarise(records, [r for r in runs if r["seed"] in args.sweep_seeds], levels)
    seeds_text = ", ".join(map(str, args.sweep_seeds))
    if "utility" in args.studies and not args.quick:
        lines += ["### Utility study (SFT): the re-sampling budget and the training on one level only", ""]
        lines += [f"Every row on the same seeds ({seeds_text}).", ""]
        lines += [
            "| re-sample and train on | seeds | final accuracy | gain | useful rows / 1k samples |",
            "|---|---|---|---|---|",
        ]
        for method, name in (("hsstar-easy", "easy"), ("hsstar", "boundary"), ("hsstar-hard", "hard")):
            s = on_sweep_seeds.get(("sft", method, 3))
            if s is not None:
                lines.append(
                    f"| {name} | {s['seeds']} | {_mean_sd(s['final'])} | {_mean_sd(s['gain'])} | {s['useful_rows_per_1000']:.0f} |"
                )
        lines.append("")
    if "sweep" in args.studies and not args.quick:
        lines += ["### n_p sweep (SFT, hsstar)", ""]
        lines += [
            f"Every row on the same seeds ({seeds_text}). n_p = 0 calls every problem boundary and spreads the whole "
            "budget evenly, so it is uniform by construction; uniform's own runs are the last row, and the distance "
            "between the two is the noise of the instrument, not an effect of n_p.",
            "",
        ]
        lines += [
            "| n_p | seeds | final accuracy | gain | useful rows / 1k samples | samples on easy / boundary / hard |",
            "|---|---|---|---|---|---|",
        ]
        sweep = [(str(n_p), ("sft", "hsstar", n_p)) for n_p in sorted(set(args.presample_sweep) | {3})]
        for name, group in [*sweep, ("uniform", ("sft", "uniform", 3))]:
            s = on_sweep_seeds.get(group)
            if s is not None:
                lines.append(
                    f"| {name} | {s['seeds']} | {_mean_sd(s['final'])} | {_mean_sd(s['gain'])} | {s['useful_rows_per_1000']:.0f} | "
                    f"{s['samples_on_easy']:.0f} / {s['samples_on_boundary']:.0f} / {s['samples_on_hard']:.0f} |"
                )
        lines.append("")
    lines += [f"Raw records: `{meta.get('results', RESULTS)}`.", "", end]
    return "\n".join(lines)


def render(record: dict) -> str:
    """The docs section of a ``hsstar bench`` record (``meta``, ``args``, ``records``), from the record alone."""
    args = argparse.Namespace(**record["args"])
    meta = record["meta"]
    levels = [lv for lv in LEVELS if lv in meta["initial"]]
    runs = plan(args)
    summary = summarise(record["records"], runs, levels)
    plots = meta.get("plots")
    if plots is None:  # a record from before the plots were recorded: the images the script writes
        plots = {track: plot_path(args, track) for track, _, _ in tracks(args)}
    return report(args, record["records"], runs, summary, meta, levels, plots)


def plot_path(args, track: str) -> str:
    """Where a track's plot goes, relative to the report's folder."""
    section = args.section + "_" if args.section else ""
    return f"images/bench_methods_{section}{track}{'_quick' if args.quick else ''}.png"


def portable_path(path: str | Path, option: str | None = None) -> str:
    """``path`` with no path of this machine in it: relative to the checkout when inside it, else a variable named
    after its option (``--work-dir`` -> ``$WORK_DIR``; ``$PATH`` without one)."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(ROOT):
        return str(resolved.relative_to(ROOT))
    return "$" + (option or "--path").lstrip("-").replace("-", "_").upper()


def portable_command(argv: Sequence[str]) -> str:
    """``argv`` as a shell command with no path of this machine in it: a path inside the checkout becomes relative
    to it, any other absolute path a variable named after its option (``--work-dir "$WORK_DIR"``)."""
    out, option = [], None
    for token in argv:
        if os.path.isabs(token):
            token = portable_path(token, option)
        out.append(token)
        option = token if token.startswith("--") else None
    return " ".join(f'"{t}"' if t.startswith("$") else shlex.quote(t) for t in out)


def git_commit() -> str:
    """The commit the runs are made from, with ``+dirty`` when the tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip()[:12] + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> str:
    """The machine a record was measured on: CPU model, architecture, cores."""
    from trl_hsstar.toy.world import cpu_name

    return f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs"


def commit_line(meta: dict) -> str:
    """The commit a record was measured at, as every docs section shows it (with the record's note, if any)."""
    note = meta.get("commit_note")
    return f"Commit: `{meta['commit']}`" + (f" ({note})" if note else "") + "."


def script_meta(script: str, argv, started: float, **extra) -> dict:
    """What every benchmark records of its invocation: commit, command (portable), machine, torch and its threads,
    minutes."""
    import torch

    return {
        "commit": git_commit(),
        "command": portable_command(
            ["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **extra,
        "minutes": round((time.monotonic() - started) / 60, 1),
    }


def publish(
    render, data: dict, *, results: str, output: str | None, marks: tuple[str, str], **readme
) -> None:
    """Write the record ``data`` to ``results``, then render the section from the record as written (so that it is
    the section ``--report-only`` gives), print it and put it into ``output`` between ``marks``."""
    Path(results).parent.mkdir(parents=True, exist_ok=True)
    Path(results).write_text(json.dumps(data, indent=1) + "\n")
    republish(render, results=results, output=output, marks=marks, **readme)


def add_report_only(parser: argparse.ArgumentParser) -> None:
    """The ``--report-only`` option every benchmark with a docs section has."""
    parser.add_argument(
        "--report-only", action="store_true", help="render the docs section from the record; measure nothing"
    )


def republish(
    render,
    *,
    results: str,
    output: str | None,
    marks: tuple[str, str],
    readme: str | None = None,
    readme_marks: tuple[str, str] | None = None,
) -> None:
    """``--report-only``: render the section from the record in ``results``, print it and put it into ``output``
    between ``marks``; nothing is measured. A ``render`` that returns ``(section, line)`` also puts its README line
    into ``readme`` between ``readme_marks``."""
    path = Path(results)
    if not path.exists():
        raise SystemExit(f"{path}: no record to render (run the benchmark without --report-only first)")
    rendered = render(json.loads(path.read_text()))
    section, line = rendered if isinstance(rendered, tuple) else (rendered, None)
    print(section)
    if output:
        write_report(Path(output), section, marks=marks)
    if line is not None and readme:
        write_report(Path(readme), line, marks=readme_marks)


def write_report(path: Path, section: str, name: str = "", *, marks: tuple[str, str] | None = None) -> None:
    """Put ``section`` between the markers of ``name`` (or ``marks``) in ``path``, else at its end."""
    START, END = marks or markers(name)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def plot_methods(
    curves: Mapping[str, Sequence[Sequence[float]]], path: str | Path, *, title: str
) -> Path | None:
    """Held-out accuracy per iteration for several methods: ``curves[method]`` is one list per seed (M_0
    first); draws the mean with the min-max band across seeds."""
    from trl_hsstar.toy.report import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in curves.items():
        xs = list(range(len(runs[0])))
        mean = [sum(r[i] for r in runs) / len(runs) for i in xs]
        ax.plot(xs, mean, marker="o", label=method)
        ax.fill_between(
            xs, [min(r[i] for r in runs) for i in xs], [max(r[i] for r in runs) for i in xs], alpha=0.15
        )
    ax.set_xticks(xs, ["M_0", *(str(i) for i in xs[1:])])
    ax.set_xlabel("after iteration")
    ax.set_ylabel("held-out greedy accuracy (all levels)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _worker(threads: int) -> None:
    """A worker process: its share of the torch threads, and (on Linux) it ends when the benchmark's process
    does, killed or not, instead of finishing its run unwatched."""
    import signal

    import torch

    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the benchmark ended before prctl took effect
            os._exit(1)


def in_workers(fn, runs: list, *, at_a_time: int, threads: int, **kwargs):
    """``fn(run, **kwargs)`` for every run, yielding each result as it finishes: ``at_a_time`` at a time in worker
    processes of ``threads`` torch threads each (:func:`_worker`), or in this process when ``at_a_time`` is 1."""
    if at_a_time == 1:
        yield from (fn(run, **kwargs) for run in runs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    executor = ProcessPoolExecutor(
        at_a_time, mp_context=multiprocessing.get_context("spawn"), initializer=_worker, initargs=(threads,)
    )
    try:
        yield from (f.result() for f in as_completed([executor.submit(fn, run, **kwargs) for run in runs]))
    finally:
        executor.shutdown(cancel_futures=True)


def check_work_dir(work: Path, settings: dict) -> None:
    """A work dir holds the runs of one setting (M_0, PRM, rates, sizes): a finished run is read back only when
    it was made with the same one. The first invocation records it (``settings.json``); another one is refused."""
    path = work / "settings.json"
    if not path.exists():
        path.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        return
    before = json.loads(path.read_text())
    if before != settings:
        changed = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
        raise SystemExit(
            f"{work} holds runs made with other settings ({', '.join(f'{k}: {before.get(k)!r} -> {settings.get(k)!r}' for k in changed)}): "
            "its records would be read back as if they were this benchmark's. Pass another --work-dir, or delete "
            f"{work} to start afresh."
        )


def execute(
    run: dict, *, args, reasoner: str, prm: str | None, initial: dict, work: str, jobs: int = 1
) -> tuple[str, dict]:
    """One run of the plan, from M_0 (in this process or in a worker process); its record is saved as it ends."""
    import shutil

    import torch

    from trl_hsstar.toy.experiment import WorldRun, held_out_problems, run_world, world_problems

    k = key(run)
    path = Path(work) / "runs" / f"{k}.json"
    held_out = held_out_problems(args.eval_per_level)
    problems = world_problems(
        args.num_iterations * args.problems_per_iteration, seed=run["seed"], exclude=held_out
    )
    out_dir = Path(work) / "out" / k
    if out_dir.exists():  # an interrupted run restarts from scratch: its record is what counts
        shutil.rmtree(out_dir)
    record = run_world(
        WorldRun(
            method=run["method"],
            objective=run["objective"],
            seed=run["seed"],
            num_iterations=args.num_iterations,
            problems_per_iteration=args.problems_per_iteration,
            sampling_budget=args.sampling_budget,
            num_presamples=min(run["num_presamples"], args.sampling_budget),
            reward=args.reward,
            learning_rate=run["learning_rate"],
        ),
        reasoner_dir=reasoner,
        prm_dir=prm,
        output_dir=out_dir,
        held_out=held_out,
        problems=problems,
        initial_eval=initial,
    )
    record["study"] = run["study"]
    record["torch_threads"] = torch.get_num_threads()
    record["jobs"] = jobs  # runs at a time when this one ran
    record["finished_at"] = time.time()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return k, record


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1 (runs at a time), got {args.jobs}")
    if args.report_only:  # the record names its section
        recorded = Path(args.results)
        section = json.loads(recorded.read_text())["args"]["section"] if recorded.exists() else args.section
        republish(render, results=args.results, output=args.report, marks=markers(section))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from trl_hsstar.toy.experiment import held_out_problems
    from trl_hsstar.toy.world import evaluate_levels, toy_prm_path, toy_reasoner_path

    if args.quick:
        args.seeds, args.num_iterations, args.problems_per_iteration, args.eval_per_level = [0], 1, 24, 10
        args.sampling_budget = 4
    start = time.monotonic()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    work = Path(args.work_dir)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    preset = "tiny" if args.quick else "m0"
    reasoner = toy_reasoner_path(args.cache_dir, preset=preset, progress=True)
    build = Path(reasoner) / "build.json"
    m0_build, m0_sha = "build not recorded", None
    if build.exists():
        b = json.loads(build.read_text())
        m0_sha = b.get("sha256")
        m0_build = f"trained {b['steps_trained']} steps in {b['seconds']:.0f} s on {b['cpu']}" + (
            f", shipped, sha256 {m0_sha[:12]}" if m0_sha else ""
        )
    prm = None
    if args.reward == "prm":
        prm_settings = (
            {"problems_per_level": 8, "samples_per_problem": 2, "num_train_epochs": 1} if args.quick else {}
        )
        prm = toy_prm_path(reasoner, args.cache_dir, progress=True, **prm_settings)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held_out = held_out_problems(args.eval_per_level)
    initial = evaluate_levels(
        AutoModelForCausalLM.from_pretrained(reasoner), AutoTokenizer.from_pretrained(reasoner), held_out
    )
    settings = {
        "reasoner": Path(reasoner).name,
        "reasoner_sha256": m0_sha,
        "prm": None if prm is None else Path(prm).name,
        "sft_learning_rate": SFT_LR,
        "dpo_learning_rate": DPO_LR,
        **{
            k: getattr(args, k)
            for k in (
                "num_iterations",
                "problems_per_iteration",
                "sampling_budget",
                "eval_per_level",
                "reward",
            )
        },
    }
    check_work_dir(work, settings)
    runs = plan(args)
    records = {}
    pending = []
    for run in runs:
        path = work / "runs" / f"{key(run)}.json"
        if path.exists():
            records[key(run)] = json.loads(path.read_text())
        else:
            pending.append(run)
    if args.jobs is None:
        args.jobs = 1 if args.quick else min(4, torch.get_num_threads())
    jobs = max(1, min(args.jobs, len(pending)))
    threads = max(1, torch.get_num_threads() // jobs)
    print(
        f"{len(runs)} runs, {len(runs) - len(pending)} read back; {len(pending)} to do in {jobs} process(es) of "
        f"{threads} torch thread(s)",
        flush=True,
    )
    context = dict(
        args=args,
        reasoner=str(reasoner),
        prm=None if prm is None else str(prm),
        initial=initial,
        work=str(work),
        jobs=jobs,
    )
    for done, (k, record) in enumerate(
        in_workers(execute, pending, at_a_time=jobs, threads=threads, **context), 1
    ):
        records[k] = record
        print(
            f"[{done}/{len(pending)}] {k}: final accuracy {record['iterations'][-1]['held_out']['all']:.3f} "
            f"(M_0 {initial['all']:.3f}), {record['wall_seconds']} s",
            flush=True,
        )

    levels = [lv for lv in LEVELS if lv in initial]
    summary = summarise(records, runs, levels)
    report_path = Path(args.report)
    plots = {}
    for objective, _, _ in tracks(args):
        curves = {
            m: summary[(objective, m, 3)]["curve"] for m in MAIN_METHODS if (objective, m, 3) in summary
        }
        image = report_path.parent / plot_path(args, objective)
        image.parent.mkdir(parents=True, exist_ok=True)
        if plot_methods(curves, image, title=f"{objective}: held-out accuracy, mean and seed range"):
            plots[objective] = plot_path(args, objective)
    done = [records[key(r)] for r in runs if key(r) in records]
    meta = {
        "commit": git_commit(),
        "command": portable_command(["hsstar", "bench", *sys.argv[1:]]),
        "machine": f"{machine()}, {platform.system()} {platform.release()}",
        "jobs": _values(done, "jobs"),
        "threads_per_run": _values(done, "torch_threads"),
        "m0_build": m0_build,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": ", ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in load),
        "total_minutes": (time.monotonic() - start) / 60,
        "num_runs": len(runs),
        "run_minutes": sum(r["wall_seconds"] for r in done) / 60,
        "span_minutes": _span_minutes(done),
        "reasoner": f"{preset} ({Path(reasoner).name})",
        "reward": "the learned PRM (Math-Shepherd layout)" if prm else "the exact step checker (oracle)",
        "initial": initial,
        "results": portable_path(args.results, "--results"),
        "plots": plots,
    }
    record = {"meta": meta, "args": vars(args), "records": records}
    publish(render, record, results=args.results, output=str(report_path), marks=markers(args.section))
    print(f"report: {report_path}\nresults: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
