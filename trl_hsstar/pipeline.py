"""One HS-STaR iteration's data generation: presample, score, estimate, allocate, resample, score, select.

Data flows one way::

    problems -> pre-samples -> scores -> levels -> allocation -> re-samples -> scores -> training rows

Each arrow leaves a file in ``output_dir/iteration-<t>/`` (see :mod:`trl_hsstar.artifacts`); a phase whose
file exists is read back instead of recomputed, which is what makes a killed run resumable without losing or
repeating samples. The pipeline knows nothing of trainers: it is handed a sampler, a verifier, a scoring
function and its settings, and returns training rows plus the iteration's statistics.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import artifacts as A
from .budget import allocate, presamples_for
from .difficulty import Difficulty, Level, count_levels, estimate_difficulty
from .sampling import Sampler, SamplingParams
from .selection import ScoredSample, select_dpo_pairs, select_sft_rows

logger = logging.getLogger(__name__)

__all__ = ["IterationResult", "PipelineEvents", "PipelineSettings", "Problem", "run_iteration"]

ScoreFn = Callable[..., list]
"""``score_fn(prompts, completions, **columns) -> list[float | None]`` (TRL reward-function convention)."""


@dataclass(frozen=True)
class Problem:
    """One problem of an iteration."""

    id: str
    prompt: Any
    """As in the dataset: a string, or chat messages."""
    prompt_text: str
    """The prompt rendered for generation (chat template applied for messages)."""
    answer: str
    columns: dict = field(default_factory=dict)
    """The dataset's other columns, passed to reward functions."""

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)

    def to_row(self) -> dict:
        return {
            "problem_id": self.id,
            "prompt": self.prompt,
            "prompt_text": self.prompt_text,
            "answer": self.answer,
            "columns": self.columns,
        }

    @classmethod
    def from_row(cls, row: dict) -> Problem:
        return cls(
            row["problem_id"], row["prompt"], row["prompt_text"], row["answer"], row.get("columns") or {}
        )


@dataclass(frozen=True)
class PipelineSettings:
    budget: int = 8
    num_presamples: int = 3
    allocation: str = "hsstar"
    difficulty_estimator: str = "hsstar"
    reward_thresholds: tuple[float, float] | None = None
    train_levels: tuple[str, ...] = ("boundary",)
    resample_levels: tuple[str, ...] = ("boundary",)
    max_rows_per_problem: int | None = 4
    objective: str = "sft"  # "sft" | "dpo"
    seed: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)


class PipelineEvents:
    """Hooks the trainer implements (all optional): observe, filter or stop."""

    def levels_estimated(self, difficulties: dict[str, Difficulty], resamples: dict[str, int]) -> None:
        pass

    def rows_selected(self, rows: list[dict]) -> list[dict]:
        return rows


@dataclass
class IterationResult:
    rows: list[dict]
    stats: dict[str, Any]
    difficulties: dict[str, Difficulty]
    resamples: dict[str, int]


def _completion_for(problem: Problem, text: str) -> Any:
    """A completion in the dataset's format: text, or an assistant message for chat prompts."""
    return [{"role": "assistant", "content": text}] if problem.conversational else text


def _verify_all(
    verifier: Callable[[str, str], bool], completions: list[str], references: list[str]
) -> list[bool]:
    batch = getattr(verifier, "verify_batch", None)
    if batch is not None:
        return [bool(x) for x in batch(completions, references)]
    return [bool(verifier(c, r)) for c, r in zip(completions, references)]


def _sample(
    problems: Sequence[Problem],
    counts: Sequence[int],
    first_slot: Sequence[int],
    *,
    phase: str,
    sampler: Sampler,
    params: SamplingParams,
    verifier: Callable[[str, str], bool],
) -> list[dict]:
    """Generate ``counts[i]`` samples for problem i, numbered from slot ``first_slot[i]``, and verify them."""
    wanted = [(p, c, s) for p, c, s in zip(problems, counts, first_slot) if c > 0]
    if not wanted:
        return []
    outputs = sampler.generate([p.prompt_text for p, _, _ in wanted], [c for _, c, _ in wanted], params)
    rows = []
    for (problem, count, start), completions in zip(wanted, outputs):
        if len(completions) != count:
            raise RuntimeError(
                f"sampler {getattr(sampler, 'name', type(sampler).__name__)!r} returned {len(completions)} "
                f"completions for problem {problem.id!r} instead of {count}"
            )
        for j, c in enumerate(completions):
            slot = start + j
            rows.append(
                {
                    "sample_id": f"{problem.id}/{slot}",
                    "problem_id": problem.id,
                    "slot": slot,
                    "phase": phase,
                    "completion": c.text,
                    "num_tokens": c.num_tokens,
                    "finish_reason": c.finish_reason,
                }
            )
    by_id = {p.id: p for p in problems}
    verdicts = _verify_all(
        verifier, [r["completion"] for r in rows], [by_id[r["problem_id"]].answer for r in rows]
    )
    for row, ok in zip(rows, verdicts):
        row["correct"] = ok
    return rows


def _score(samples: list[dict], problems: dict[str, Problem], score_fn: ScoreFn | None) -> list[dict]:
    """S(r) per sample: ``[{"sample_id", "score"}]`` (``None`` everywhere without a reward source)."""
    if score_fn is None or not samples:
        return [{"sample_id": s["sample_id"], "score": None} for s in samples]
    ps = [problems[s["problem_id"]] for s in samples]
    columns: dict[str, list] = {}
    for key in sorted({k for p in ps for k in p.columns}):
        columns[key] = [p.columns.get(key) for p in ps]
    columns.setdefault("answer", [p.answer for p in ps])
    scores = score_fn(
        [p.prompt for p in ps], [_completion_for(p, s["completion"]) for p, s in zip(ps, samples)], **columns
    )
    return [
        {"sample_id": s["sample_id"], "score": None if v is None else float(v)}
        for s, v in zip(samples, scores)
    ]


def _phase(
    store: A.IterationArtifacts, name: str, compute: Callable[[], list[dict]]
) -> tuple[list[dict], bool]:
    """Read a phase's file if it is complete, else compute and write it. Returns (rows, was_computed)."""
    if store.has(name):
        return store.read_jsonl(name), False
    rows = compute()
    store.write_jsonl(name, rows)
    return rows, True


def run_iteration(
    problems: Sequence[Problem],
    *,
    store: A.IterationArtifacts,
    sampler: Sampler,
    verifier: Callable[[str, str], bool],
    score_fn: ScoreFn | None,
    settings: PipelineSettings,
    events: PipelineEvents | None = None,
) -> IterationResult:
    """Generate one iteration's training data, resuming from whatever phases ``store`` already holds."""
    events = events or PipelineEvents()
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    computed: list[str] = []

    def timed(name: str, compute: Callable[[], list[dict]]) -> list[dict]:
        start = time.monotonic()
        rows, was_computed = _phase(store, name, compute)
        if was_computed:
            computed.append(name)
            timings[name] = time.monotonic() - start
        return rows

    # problems: the problem list is fixed once written, so a resume uses exactly the same problems
    problem_rows = timed(A.PROBLEMS, lambda: [p.to_row() for p in problems])
    problems = [Problem.from_row(r) for r in problem_rows]
    by_id = {p.id: p for p in problems}
    n = len(problems)

    # 1. pre-sampling
    n_p = presamples_for(settings.allocation, settings.budget, settings.num_presamples)
    gen_stats_before = sampler.stats
    presamples = timed(
        A.PRESAMPLES,
        lambda: _sample(
            problems,
            [n_p] * n,
            [0] * n,
            phase="pre",
            sampler=sampler,
            params=settings.sampling,
            verifier=verifier,
        ),
    )
    pre_scores = timed(A.PRESAMPLE_SCORES, lambda: _score(presamples, by_id, score_fn))

    # 2. difficulty estimation and 3. allocation
    def estimate() -> list[dict]:
        score_of = {s["sample_id"]: s["score"] for s in pre_scores}
        per_problem: dict[str, list[dict]] = {p.id: [] for p in problems}
        for s in presamples:
            per_problem[s["problem_id"]].append(s)
        difficulties = [
            estimate_difficulty(
                [s["correct"] for s in per_problem[p.id]],
                [score_of[s["sample_id"]] for s in per_problem[p.id]],
                estimator=settings.difficulty_estimator,
                thresholds=settings.reward_thresholds,
            )
            for p in problems
        ]
        plan = allocate(
            difficulties,
            strategy=settings.allocation,
            budget=settings.budget,
            num_presamples=n_p,
            seed=settings.seed,
            target_levels=settings.resample_levels,
        )
        if plan.fell_back:
            logger.warning(
                "No problem was eligible for re-sampling under allocation=%r (e.g. no boundary problem): the "
                "remaining budget is spread evenly over all %d problems.",
                settings.allocation,
                n,
            )
        return [
            {"problem_id": p.id, "resamples": r, "fell_back": plan.fell_back, **d.to_dict()}
            for p, d, r in zip(problems, difficulties, plan.resamples)
        ]

    level_rows = timed(A.LEVELS, estimate)
    difficulties = {r["problem_id"]: Difficulty.from_dict(r) for r in level_rows}
    resamples = {r["problem_id"]: int(r["resamples"]) for r in level_rows}
    events.levels_estimated(difficulties, resamples)

    # 4. re-sampling
    more = timed(
        A.RESAMPLES,
        lambda: _sample(
            problems,
            [resamples[p.id] for p in problems],
            [n_p] * n,
            phase="re",
            sampler=sampler,
            params=settings.sampling,
            verifier=verifier,
        ),
    )
    re_scores = timed(A.RESAMPLE_SCORES, lambda: _score(more, by_id, score_fn))
    gen_stats_after = sampler.stats

    # 5. selection
    def select() -> list[dict]:
        score_of = {s["sample_id"]: s["score"] for s in pre_scores + re_scores}
        pooled = [
            ScoredSample(
                problem_id=s["problem_id"],
                prompt=by_id[s["problem_id"]].prompt,
                completion=_completion_for(by_id[s["problem_id"]], s["completion"]),
                correct=bool(s["correct"]),
                score=score_of[s["sample_id"]],
                sample_id=s["sample_id"],
            )
            for s in presamples + more
        ]
        levels = {pid: d.level for pid, d in difficulties.items()}
        if settings.objective == "dpo":
            rows = select_dpo_pairs(
                pooled,
                levels,
                train_levels=settings.train_levels,
                seed=settings.seed,
                max_pairs_per_problem=settings.max_rows_per_problem,
            )
        else:
            rows = select_sft_rows(
                pooled,
                levels,
                train_levels=settings.train_levels,
                max_rows_per_problem=settings.max_rows_per_problem,
            )
        return events.rows_selected(rows)

    rows = timed(A.TRAIN_ROWS, select)

    stats = _stats(
        problems=problems,
        samples=presamples + more,
        scores=pre_scores + re_scores,
        difficulties=difficulties,
        resamples=resamples,
        rows=rows,
        settings=settings,
        n_p=n_p,
        fell_back=bool(level_rows and level_rows[0]["fell_back"]),
        generation=(gen_stats_before, gen_stats_after),
    )
    stats["phases_computed"] = computed
    stats["phase_seconds"] = {k: round(v, 3) for k, v in timings.items()}
    stats["data_seconds"] = round(time.monotonic() - t0, 3)
    return IterationResult(rows=rows, stats=stats, difficulties=difficulties, resamples=resamples)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _stats(
    *, problems, samples, scores, difficulties, resamples, rows, settings, n_p, fell_back, generation
) -> dict:
    n = len(problems)
    level_of = {pid: d.level.value for pid, d in difficulties.items()}
    pre = [s for s in samples if s["phase"] == "pre"]
    spent_per_level = Counter(level_of[s["problem_id"]] for s in samples)
    resampled_per_level = Counter()
    for pid, r in resamples.items():
        resampled_per_level[level_of[pid]] += r
    score_of = {s["sample_id"]: s["score"] for s in scores}
    if settings.objective == "dpo":
        kept_scores = [r["chosen_score"] for r in rows if r.get("chosen_score") is not None]
    else:
        kept_scores = [r["score"] for r in rows if r.get("score") is not None]
    all_scores = [v for v in score_of.values() if v is not None]
    before, after = generation
    gen_seconds = after.generation_seconds - before.generation_seconds
    return {
        "num_problems": n,
        "levels": count_levels(difficulties.values()),
        "presample_accuracy": _mean([float(s["correct"]) for s in pre]),
        "sample_accuracy": _mean([float(s["correct"]) for s in samples]),
        "budget_planned": settings.budget * n,
        "budget_spent": len(samples),
        "presamples_spent": len(pre),
        "resamples_spent": len(samples) - len(pre),
        "num_presamples": n_p,
        "samples_per_level": {lv.value: spent_per_level.get(lv.value, 0) for lv in Level},
        "resamples_per_level": {lv.value: resampled_per_level.get(lv.value, 0) for lv in Level},
        "allocation_fell_back": fell_back,
        "rows": len(rows),
        "problems_with_rows": len({r["problem_id"] for r in rows}),
        "mean_score_kept": _mean(kept_scores),
        "mean_score_all": _mean(all_scores),
        "finish_reasons": dict(Counter(s["finish_reason"] for s in samples)),
        "completion_tokens": sum(int(s["num_tokens"]) for s in samples),
        "generated_this_run": after.num_generated - before.num_generated,
        "tokens_per_second": (after.num_completion_tokens - before.num_completion_tokens) / gen_seconds
        if gen_seconds > 0
        else None,
    }
