"""Runs of the HS-STaR loop on the embedded world, measured on held-out problems per level.

What ``hsstar demo`` and ``hsstar bench`` share: M_0 and the learned PRM from :mod:`trl_hsstar.toy.world`, a
pool of fresh problems drawn evenly from the world's levels (the held-out problems excluded), one
:class:`~trl_hsstar.trainer.HSStarTrainer` (or ``HSStarDPOTrainer``) run per method, and a callback that scores
the model greedily on the held-out problems after every iteration.

The methods (all at the same total budget, ``sampling_budget`` samples per problem on average):

``hsstar``     the release: 3 pre-samples, the rest to boundary problems, train on boundary problems.
``uniform``    STaR / RFT: all ``sampling_budget`` samples up front, train on every problem with a correct one.
``prop2diff``  DART-Math: the rest in proportion to the fail rate, train on every problem.
``band``       the pass-rate band (DAPO / open-r1): the rest to problems solved sometimes, train on every problem.
``knapsack``   Knapsack RL (Li et al. 2025): the rest by marginal value of a mixed group, train on every problem.
``hsstar_adaptive``  the rest over 4 rounds, each to the boundary problems that lack their quota of rows.
``hsstar-easy``, ``hsstar-hard``  the utility study: the rest (and the training) on easy or on hard problems only.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import artifacts
from ..callbacks import HSStarCallback
from .problems import ArithmeticProblem, label_steps
from .world import (
    DPO_LEARNING_RATE,
    LEVELS,
    SFT_LEARNING_RATE,
    evaluate_levels,
    held_out_problems,
    level_of,
    level_problems,
)

__all__ = [
    "DPO_LEARNING_RATE",
    "METHODS",
    "SFT_LEARNING_RATE",
    "HeldOutEval",
    "WorldRun",
    "held_out_problems",
    "run_world",
    "world_problems",
]

ALL_LEVELS = ["easy", "boundary", "hard"]
METHODS: dict[str, dict[str, Any]] = {
    "hsstar": {"allocation": "hsstar", "train_levels": ["boundary"]},
    "uniform": {"allocation": "uniform", "train_levels": ALL_LEVELS},
    "prop2diff": {"allocation": "prop2diff", "train_levels": ALL_LEVELS},
    "band": {"allocation": "band", "train_levels": ALL_LEVELS},
    "knapsack": {"allocation": "knapsack", "train_levels": ALL_LEVELS},
    "hsstar_adaptive": {"allocation": "hsstar_adaptive", "resample_rounds": 4, "train_levels": ["boundary"]},
    "hsstar-easy": {"allocation": "hsstar", "resample_levels": ["easy"], "train_levels": ["easy"]},
    "hsstar-boundary": {
        "allocation": "hsstar",
        "resample_levels": ["boundary"],
        "train_levels": ["boundary"],
    },
    "hsstar-hard": {"allocation": "hsstar", "resample_levels": ["hard"], "train_levels": ["hard"]},
}


@dataclass
class WorldRun:
    """One run on the world. The defaults are the demo's."""

    method: str = "hsstar"
    objective: str = "sft"
    seed: int = 0
    num_iterations: int = 3
    problems_per_iteration: int = 256
    sampling_budget: int = 8
    num_presamples: int = 3
    reward: str = "prm"  # "prm" (the learned PRM) or "oracle" (the step checker)
    reward_thresholds: tuple[float, float] = (0.25, 0.5)
    learning_rate: float | None = None  # None: SFT_LEARNING_RATE or DPO_LEARNING_RATE
    per_device_train_batch_size: int = 16
    max_rows_per_problem: int = 4
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {sorted(METHODS)}, got {self.method!r}.")
        if self.objective not in ("sft", "dpo"):
            raise ValueError(f"`objective` must be 'sft' or 'dpo', got {self.objective!r}.")
        if self.reward not in ("prm", "oracle"):
            raise ValueError(f"`reward` must be 'prm' or 'oracle', got {self.reward!r}.")


def world_problems(
    n: int, *, seed: int, exclude: Sequence[ArithmeticProblem] = ()
) -> list[ArithmeticProblem]:
    """``n`` training problems drawn evenly from the levels (held-out ones excluded), shuffled with ``seed``."""
    per_level = -(-n // len(LEVELS))
    pool = level_problems(LEVELS, per_level, seed=seed, exclude=exclude)
    random.Random(seed).shuffle(pool)
    return pool[:n]


class HeldOutEval(HSStarCallback):
    """Scores the model greedily on held-out problems after every iteration (``self.history``)."""

    def __init__(self, problems: Sequence[ArithmeticProblem], *, batch_size: int = 128):
        self.problems = list(problems)
        self.batch_size = batch_size
        self.history: list[dict[str, float]] = []

    def on_iteration_end(
        self, args, state, control, iteration=None, model=None, processing_class=None, **kwargs
    ):
        table = evaluate_levels(model, processing_class, self.problems, batch_size=self.batch_size)
        self.history.append(table)


def _per_world_level(iteration_dir: Path) -> dict[str, Any]:
    """Level counts and samples spent per world level (``"6x1"``...), from the iteration's artifacts."""
    levels: dict[str, Counter] = {}
    spent: Counter = Counter()
    store = artifacts.IterationArtifacts(iteration_dir.parent, int(iteration_dir.name.split("-")[-1]))
    for r in range(store.rounds()):
        for row in store.read_jsonl(artifacts.samples_file(r)):
            spent[level_of(ArithmeticProblem.from_expression(row["problem_id"]))] += 1
    # rows (DPO: chosen answers) whose every step the step checker accepts: the rest reach the right answer
    # through a wrong step, which the reward model was meant to rank last
    rows_file = iteration_dir / "train_rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    clean = sum(all(label_steps(r["problem_id"], r.get("completion", r.get("chosen")))) for r in rows)
    per_problem = Counter(Counter(r["problem_id"] for r in rows).values())  # rows a problem gave -> problems
    for row in store.read_jsonl(artifacts.plan_file(store.rounds() - 1)):
        world = level_of(ArithmeticProblem.from_expression(row["problem_id"]))
        levels.setdefault(world, Counter())[row["level"]] += 1
    return {
        "levels_by_world_level": {w: dict(c) for w, c in sorted(levels.items())},
        "samples_by_world_level": dict(sorted(spent.items())),
        "clean_row_share": clean / len(rows) if rows else None,
        "problems_by_row_count": {str(n): per_problem[n] for n in sorted(per_problem)},
    }


def run_world(
    run: WorldRun,
    *,
    reasoner_dir: str | Path,
    prm_dir: str | Path | None,
    output_dir: str | Path,
    held_out: Sequence[ArithmeticProblem],
    problems: Sequence[ArithmeticProblem],
    initial_eval: dict[str, float] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the loop for ``run`` from M_0 and return its per-iteration record (held-out accuracy per level,
    level counts, budget, rows, useful rows per 1,000 samples, samples on easy and hard problems, wall time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..config import HSStarConfig, HSStarDPOConfig
    from ..trainer import HSStarDPOTrainer, HSStarTrainer

    output_dir = Path(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(reasoner_dir)
    model = AutoModelForCausalLM.from_pretrained(reasoner_dir)
    if initial_eval is None:
        initial_eval = evaluate_levels(model, tokenizer, held_out)
    method = METHODS[run.method]
    config_cls, trainer_cls = (
        (HSStarConfig, HSStarTrainer) if run.objective == "sft" else (HSStarDPOConfig, HSStarDPOTrainer)
    )
    lr = run.learning_rate
    if lr is None:
        lr = SFT_LEARNING_RATE if run.objective == "sft" else DPO_LEARNING_RATE
    longest = max(len(p.rationale()) for p in problems)
    args = config_cls(
        output_dir=str(output_dir),
        num_iterations=run.num_iterations,
        problems_per_iteration=run.problems_per_iteration,
        sampling_budget=run.sampling_budget,
        num_presamples=run.num_presamples,
        reward_thresholds=list(run.reward_thresholds),
        max_completion_length=longest + 16,
        generation_batch_size=128,
        max_rows_per_problem=run.max_rows_per_problem,
        learning_rate=lr,
        per_device_train_batch_size=run.per_device_train_batch_size,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        seed=run.seed,
        **{k: v for k, v in method.items() if k != "allocation"},
        allocation=method["allocation"],
        **run.extra,
    )
    if run.reward == "prm":
        reward_funcs = str(prm_dir)
    else:
        from .oracle import OracleStepReward

        reward_funcs = OracleStepReward()
    dataset = [p.to_row() for p in problems]
    from datasets import Dataset

    evaluator = HeldOutEval(held_out)
    start = time.monotonic()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(dataset),
        processing_class=tokenizer,
        reward_funcs=reward_funcs,
        callbacks=[evaluator],
    )
    trainer.train()
    wall = time.monotonic() - start
    iterations = []
    for stats, table in zip(trainer.iteration_stats, evaluator.history):
        t = stats["iteration"]
        per_level = stats["samples_per_level"]
        iterations.append(
            {
                "iteration": t,
                "held_out": table,
                "levels": stats["levels"],
                "budget_planned": stats["budget_planned"],
                "budget_spent": stats["budget_spent"],
                "rows": stats["rows"],
                "useful_rows_per_1000": 1000 * stats["rows"] / max(1, stats["budget_spent"]),
                "samples_on_easy": per_level.get("easy", 0),
                "samples_on_boundary": per_level.get("boundary", 0),
                "samples_on_hard": per_level.get("hard", 0),
                "presample_accuracy": stats["presample_accuracy"],
                "train_loss": stats.get("train_loss"),
                "train_steps": stats.get("train_steps"),
                "problems_with_rows": stats.get("problems_with_rows"),
                **_per_world_level(output_dir / f"iteration-{t}"),
            }
        )
    return {
        "run": asdict(run),
        "initial": initial_eval,
        "iterations": iterations,
        "wall_seconds": round(wall, 1),
    }
