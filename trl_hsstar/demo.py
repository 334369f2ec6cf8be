"""``hsstar demo``: watch HS-STaR work on the embedded world beside the uniform baseline, on a CPU, with no downloads.

1. M_0: the world's tiny reasoner, shipped with the package (the same weights on every CPU; nothing is
   trained before the loop); its greedy accuracy per level, measured when it was built, is printed.
2. The PRM: a token-classification model trained on M_0's own samples, labelled step by step by the step
   checker, also shipped; its held-out step accuracy is printed.
3. HS-STaR iterations from M_0 (pre-sample, estimate difficulty, re-sample the boundary, train), then uniform
   sampling (STaR / RFT) from the same M_0 on the same problems at the same budget, each scored on held-out
   problems of every level after each iteration.
4. A per-iteration table per method, the two side by side, ``results.json``, ``summary.md`` and the plots
   (``accuracy.png``: the methods side by side; ``<method>/levels.png`` and ``<method>/accuracy.png``) in the
   output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

__all__ = ["add_arguments", "fresh_output_dir", "run_demo"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .toy.world import HELD_OUT_PER_LEVEL

    parser.add_argument("--output-dir", default="runs/demo", help="where results, plots and checkpoints go")
    parser.add_argument("--num-iterations", type=int, default=3)
    parser.add_argument("--problems-per-iteration", type=int, default=128)
    parser.add_argument("--sampling-budget", type=int, default=8, help="B: samples per problem on average")
    parser.add_argument("--num-presamples", type=int, default=3, help="n_p: pre-samples per problem")
    parser.add_argument(
        "--reward", choices=["prm", "oracle"], default="prm", help="the learned PRM or the exact step checker"
    )
    parser.add_argument("--objective", choices=["sft", "dpo"], default="sft")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["hsstar", "uniform"],
        choices=[
            "hsstar",
            "hsstar_adaptive",
            "uniform",
            "prop2diff",
            "band",
            "knapsack",
            "hsstar-easy",
            "hsstar-boundary",
            "hsstar-hard",
        ],
        help="the budget allocations to run side by side, each from M_0 on the same problems at the same budget "
        "(hsstar-easy/hard: the utility study)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="default: 1e-4 for SFT, 1.5e-5 for DPO (the rates at which every method gained on the world)",
    )
    parser.add_argument(
        "--eval-per-level", type=int, default=HELD_OUT_PER_LEVEL, help="held-out problems per level"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where models not shipped with the package are built (default: ~/.cache/trl_hsstar)",
    )
    parser.add_argument(
        "--reasoner",
        choices=["m0", "tiny"],
        default="m0",
        help="m0: the world's M_0; tiny: the tests' smaller reasoner, for smoke tests (both shipped)",
    )


def fresh_output_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``... when it already holds a run (an earlier run is never overwritten)."""
    candidate, n = path, 1
    while (candidate / "hsstar_run.json").exists() or (candidate / "results.json").exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    if candidate != path:
        print(f"{path} holds an earlier run: this one goes to {candidate}")
    return candidate


def run_demo(args: argparse.Namespace) -> dict:
    import torch

    from .toy.experiment import WorldRun, held_out_problems, run_world, world_problems
    from .toy.report import comparison_table, plot_comparison, plot_run, run_markdown_table
    from .toy.world import HELD_OUT_PER_LEVEL, toy_prm_path, toy_reasoner_path

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    methods = list(dict.fromkeys(args.methods))
    runs = {  # validates methods, objective and reward before anything is built
        method: WorldRun(
            method=method,
            objective=args.objective,
            seed=args.seed,
            num_iterations=args.num_iterations,
            problems_per_iteration=args.problems_per_iteration,
            sampling_budget=args.sampling_budget,
            num_presamples=args.num_presamples,
            reward=args.reward,
            learning_rate=args.learning_rate,
        )
        for method in methods
    }
    output_dir = fresh_output_dir(Path(args.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    print(f"torch threads: {torch.get_num_threads()}")

    print("\n[1/3] M_0: the world's reasoner, shipped with the package")
    reasoner = toy_reasoner_path(args.cache_dir, preset=args.reasoner, progress=True)
    phases = {"m0": time.monotonic() - start}
    print(f"      {reasoner}")
    m0_table = None
    if (reasoner / "levels.json").exists():
        m0_table = json.loads((reasoner / "levels.json").read_text())
        print("      greedy accuracy per level: " + ", ".join(f"{k} {v:.2f}" for k, v in m0_table.items()))
    prm = None
    if args.reward == "prm":
        print("\n[2/3] the PRM: trained on M_0's own samples, labelled by the step checker (shipped)")
        small = {"problems_per_level": 8, "samples_per_problem": 2, "num_train_epochs": 1}
        prm = toy_prm_path(
            reasoner, args.cache_dir, progress=True, **(small if args.reasoner == "tiny" else {})
        )
        metrics = json.loads((prm / "prm_metrics.json").read_text())
        print(
            f"      {prm}\n      held-out step accuracy {metrics['eval_step_accuracy']:.3f} "
            f"(always answering the majority label: {metrics['majority_accuracy']:.3f})"
        )
    else:
        print("\n[2/3] the reward: the exact step checker (oracle)")
    phases["prm"] = time.monotonic() - start - phases["m0"]

    held_out = held_out_problems(args.eval_per_level)
    problems = world_problems(
        args.num_iterations * args.problems_per_iteration, seed=args.seed, exclude=held_out
    )
    # levels.json holds M_0's greedy accuracy on these very problems
    initial = m0_table if args.eval_per_level == HELD_OUT_PER_LEVEL else None
    results, tables = {}, {}
    for n, (method, run) in enumerate(runs.items(), 1):
        print(
            f"\n[3/3] {method} ({n} of {len(runs)}, {args.objective}): {args.num_iterations} iterations of "
            f"{args.problems_per_iteration} fresh problems, budget {args.sampling_budget} per problem; held-out: "
            f"{len(held_out)} problems"
        )
        began = time.monotonic()
        results[method] = run_world(
            run,
            reasoner_dir=reasoner,
            prm_dir=prm,
            output_dir=output_dir / method,
            held_out=held_out,
            problems=problems,
            initial_eval=initial,
            progress=True,
        )
        initial = results[method]["initial"]  # every method starts from the same M_0 row
        phases[method] = time.monotonic() - began
        tables[method] = run_markdown_table(results[method])
        plot_run(results[method], output_dir / method)
    total = round(time.monotonic() - start, 1)
    result = {
        "methods": results,
        "total_seconds": total,
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
        "torch_threads": torch.get_num_threads(),
    }
    (output_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot = plot_comparison(results, output_dir / "accuracy.png")
    timing = ", ".join(f"{k} {v} s" for k, v in result["phase_seconds"].items())
    summary = (
        "# HS-STaR demo\n\n"
        + "".join(f"## {method}\n\n{table}\n\n" for method, table in tables.items())
        + "## Side by side (same M_0, same problems, same budget)\n\n"
        + comparison_table(results)
        + "\n\nOne seed cannot separate methods whose difference is a point or two: the seed-to-seed spread on this "
        'world is of that size. The pre-registered study of many seeds is in docs/benchmarks.md ("The '
        'pre-registered study").\n\n'
        + f"Total time {total} s ({timing}; {result['torch_threads']} torch threads).\n"
    )
    (output_dir / "summary.md").write_text(summary)
    print("\n" + summary)
    if plot is not None:
        print(f"plot: {plot}")
    print(f"results: {output_dir / 'results.json'}")
    return result
