"""One HS-STaR iteration's data, as a straight line of sampling rounds over typed records.

::

    problems -> round 0: sample, verify, score -> plan (levels from all samples so far, allocation of the next
             slice of the budget) -> round 1: sample, verify, score -> ... -> training rows

Round 0 pre-samples every problem. Each later round re-estimates every problem's level from all of its samples so
far and hands out the next slice of the budget through the pure core (:func:`~trl_hsstar.budget.allocate`). The
release's method is two rounds: pre-sampling, then one re-sampling round that gets the whole remainder
(``resample_rounds=1``); the adaptive rule and the uniform, prop2diff, band and knapsack baselines are other
allocation rules on the same loop.
A problem trains under the level of the last plan, the one that decided its last samples.

Each phase leaves a file through the phase store (:class:`~trl_hsstar.artifacts.PhaseStore`); a phase whose
file exists is read back instead of recomputed, and sampling and scoring are checkpointed in chunks, so a killed
run resumes inside any round without losing or repeating a sample. The pipeline knows nothing of trainers: it
is handed a sampler, a verifier, a scoring function and its settings, and returns the training rows plus the
iteration's statistics.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import artifacts
from .budget import allocate, presamples_for
from .difficulty import Difficulty, Level, calibrate_thresholds, count_levels, estimate_difficulty
from .distributed import Collective
from .records import PlanRow, Problem, Sample, sample_id
from .sampling import Sampler, SamplingParams, SamplingStats
from .selection import ScoredSample, group_by_problem, quota_filled, select_dpo_pairs, select_sft_rows

logger = logging.getLogger(__name__)

__all__ = ["IterationResult", "PipelineEvents", "PipelineSettings", "Problem", "run_iteration"]

ScoreFn = Callable[..., list]
"""``score_fn(prompts, completions, **columns) -> list[float | None]`` (TRL reward-function convention)."""


def _default(name: str) -> Any:
    """The config's default of field ``name``: the defaults live once, in the config."""
    from .config import HSStarArguments

    spec = HSStarArguments.__dataclass_fields__[name]
    return spec.default if spec.default is not dataclasses.MISSING else tuple(spec.default_factory())


@dataclass(frozen=True)
class PipelineSettings:
    """What :func:`run_iteration` needs of the config (:meth:`from_config`); the defaults are the config's."""

    budget: int = _default("sampling_budget")
    num_presamples: int = _default("num_presamples")
    allocation: str = _default("allocation")
    difficulty_estimator: str = _default("difficulty_estimator")
    reward_thresholds: tuple[float, float] | None = None
    train_levels: tuple[str, ...] = _default("train_levels")
    resample_levels: tuple[str, ...] = _default("resample_levels")
    max_rows_per_problem: int | None = _default("max_rows_per_problem")
    objective: str = "sft"  # "sft" | "dpo": the trainer's, not a config field
    seed: int = 0
    chunk_size: int = _default("sampling_chunk_size")
    """Samples generated (or scored) per checkpointed chunk of a phase."""
    resample_rounds: int = 1  # the config's None resolves to it (4 under hsstar_adaptive)
    """Rounds after pre-sampling; the remainder of the budget is split evenly between them (the release: 1)."""
    min_row_score: float | None = _default("min_row_score")
    """SFT: keep only correct rationales with S(r) at or above it (None: all correct ones, the release)."""
    calibrate_thresholds: bool = _default("calibrate_thresholds")
    """Take (tau_l, tau_h) from round 0's statistics (:func:`~trl_hsstar.difficulty.calibrate_thresholds`)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @classmethod
    def from_config(cls, args, iteration: int, objective: str, reward_thresholds) -> PipelineSettings:
        """Iteration ``iteration``'s settings from an :class:`~trl_hsstar.HSStarConfig` (or the DPO one)."""
        return cls(
            budget=args.sampling_budget,
            num_presamples=args.num_presamples,
            allocation=args.allocation,
            difficulty_estimator=args.difficulty_estimator,
            reward_thresholds=reward_thresholds,
            train_levels=tuple(args.train_levels),
            resample_levels=tuple(args.resample_levels),
            max_rows_per_problem=args.max_rows_per_problem,
            objective=objective,
            seed=args.seed + iteration,
            chunk_size=args.sampling_chunk_size,
            resample_rounds=args.resample_rounds,
            min_row_score=args.min_row_score,
            calibrate_thresholds=args.calibrate_thresholds,
            sampling=args.sampling_params(seed=args.seed + 1000 * (iteration + 1)),
        )


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
    """The levels of the last plan, by problem id."""
    resamples: dict[str, int]
    """Samples after pre-sampling, by problem id."""


def _verify_all(
    verifier: Callable[[str, str], bool], completions: list[str], references: list[str]
) -> list[bool]:
    if not completions:
        return []
    batch = getattr(verifier, "verify_batch", None)
    if batch is not None:
        return [bool(x) for x in batch(completions, references)]
    return [bool(verifier(c, r)) for c, r in zip(completions, references)]


def _sample(
    units: Sequence[tuple[Problem, int]],
    *,
    round_: int,
    sampler: Sampler,
    params: SamplingParams,
    verifier: Callable[[str, str], bool],
    always_call: bool = False,
) -> list[Sample]:
    """Generate and verify one sample per ``(problem, slot)`` unit; units of a problem are consecutive slots.

    With ``always_call`` the sampler is called even for no units (every process must call it together when
    generation is collective, e.g. under DeepSpeed ZeRO-3).
    """
    requests: list[list] = []  # [problem, first slot, count], one per run of consecutive slots of a problem
    for problem, slot in units:
        last = requests[-1] if requests else None
        if last is not None and last[0].problem_id == problem.problem_id and last[1] + last[2] == slot:
            last[2] += 1
        else:
            requests.append([problem, slot, 1])
    if not requests and not always_call:
        return []
    name = getattr(sampler, "name", type(sampler).__name__)
    outputs = sampler.generate([p.prompt_text for p, _, _ in requests], [c for _, _, c in requests], params)
    if len(outputs) != len(requests):
        raise RuntimeError(
            f"sampler {name!r} returned {len(outputs)} lists of completions for {len(requests)} prompts"
        )
    for (problem, _, count), completions in zip(requests, outputs):
        if len(completions) != count:
            raise RuntimeError(
                f"sampler {name!r} returned {len(completions)} completions for problem {problem.problem_id!r} "
                f"instead of {count}"
            )
    flat = [(p, start + j, c) for (p, start, _), cs in zip(requests, outputs) for j, c in enumerate(cs)]
    verdicts = _verify_all(verifier, [c.text for _, _, c in flat], [p.answer for p, _, _ in flat])
    return [
        Sample(
            sample_id(p.problem_id, slot),
            p.problem_id,
            slot,
            round_,
            c.text,
            c.num_tokens,
            c.finish_reason,
            ok,
        )
        for (p, slot, c), ok in zip(flat, verdicts)
    ]


def _score(samples: list[Sample], problems: dict[str, Problem], score_fn: ScoreFn | None) -> list[Sample]:
    """The samples with their reward S(r) (``None`` everywhere without a reward source)."""
    if score_fn is None or not samples:
        return list(samples)
    ps = [problems[s.problem_id] for s in samples]
    columns: dict[str, list] = {}
    for key in sorted({k for p in ps for k in p.columns}):
        columns[key] = [p.columns.get(key) for p in ps]
    rewards = score_fn(
        [p.prompt for p in ps], [p.completion(s.completion) for p, s in zip(ps, samples)], **columns
    )
    return [s.scored(v) for s, v in zip(samples, rewards)]


def _round_label(round_: int) -> str:
    # "pre" and "re" seed the release's two rounds as before the rounds loop, so their draws are unchanged
    return "pre" if round_ == 0 else "re" if round_ == 1 else f"re{round_}"


def _seeded(params: SamplingParams, round_: int, first: int | None) -> SamplingParams:
    """One seed per chunk, from the round and the chunk's first unit: a resumed or re-sharded run draws what an
    uninterrupted one draws, and no two chunks share a random stream."""
    if params.seed is None or first is None:
        return params
    return dataclasses.replace(
        params, seed=zlib.crc32(f"{params.seed}:{_round_label(round_)}:{first}".encode())
    )


def _by_problem(problems: list[Problem], samples: list[Sample]) -> dict[str, list[Sample]]:
    return group_by_problem(samples, [p.problem_id for p in problems])


def _for_selection(samples: list[Sample], problems: dict[str, Problem]) -> list[ScoredSample]:
    """The samples as the selection reads them: the prompt and completion as the trainer will see them."""
    return [
        ScoredSample(
            problem_id=s.problem_id,
            prompt=problems[s.problem_id].prompt,
            completion=problems[s.problem_id].completion(s.completion),
            correct=s.correct,
            score=s.reward,
            sample_id=s.sample_id,
        )
        for s in samples
    ]


def _thresholds(
    problems: list[Problem], samples: list[Sample], settings: PipelineSettings
) -> tuple[str, tuple[float, float] | None, str | None]:
    """The estimator and (tau_l, tau_h) the plans use, and why calibration failed (None when it did not).

    With ``calibrate_thresholds`` the thresholds come from round 0 alone, so every round (and a resume) uses the
    same pair; when the rewards do not separate the problems, the estimator falls back to answer accuracy."""
    if not settings.calibrate_thresholds or settings.difficulty_estimator == "accuracy":
        return settings.difficulty_estimator, settings.reward_thresholds, None
    groups = _by_problem(problems, [s for s in samples if s.round == 0])
    stats = [
        estimate_difficulty([s.correct for s in g], [s.reward for s in g], estimator="accuracy")
        for g in groups.values()
    ]
    try:
        return settings.difficulty_estimator, calibrate_thresholds(stats), None
    except ValueError as error:
        return "accuracy", None, str(error)


def _plan(
    problems: list[Problem],
    samples: list[Sample],
    remaining: int,
    round_: int,
    settings: PipelineSettings,
    n_p: int,
) -> list[PlanRow]:
    """Re-estimate every problem from all its samples so far and hand out ``remaining`` samples for ``round_``."""
    by_problem = _by_problem(problems, samples)
    estimator, thresholds, _ = _thresholds(problems, samples, settings)
    difficulties = [
        estimate_difficulty(
            [s.correct for s in by_problem[p.problem_id]],
            [s.reward for s in by_problem[p.problem_id]],
            estimator=estimator,
            thresholds=thresholds,
        )
        for p in problems
    ]
    filled = None
    if settings.allocation == "hsstar_adaptive":  # a problem with its quota of rows needs no more samples
        by_id = {p.problem_id: p for p in problems}
        filled = [
            quota_filled(
                _for_selection(by_problem[p.problem_id], by_id),
                objective=settings.objective,
                cap=settings.max_rows_per_problem,
                min_score=settings.min_row_score,
            )
            for p in problems
        ]
    seed = settings.seed if round_ == 1 else zlib.crc32(f"{settings.seed}:plan:{round_}".encode())
    plan = allocate(
        difficulties,
        strategy=settings.allocation,
        budget=settings.budget,
        num_presamples=n_p,
        seed=seed,
        target_levels=settings.resample_levels,
        remaining=remaining,
        filled=filled,
    )
    if plan.fell_back:
        logger.warning(
            "No problem was eligible for re-sampling in round %d under allocation=%r (e.g. no boundary problem): "
            "its %d samples are spread evenly over all %d problems.",
            round_,
            settings.allocation,
            remaining,
            len(problems),
        )
    return [
        PlanRow(p.problem_id, d, r, plan.fell_back) for p, d, r in zip(problems, difficulties, plan.resamples)
    ]


def run_iteration(
    problems: Sequence[Problem],
    *,
    store: artifacts.IterationArtifacts,
    sampler: Sampler,
    verifier: Callable[[str, str], bool],
    score_fn: ScoreFn | None,
    settings: PipelineSettings,
    events: PipelineEvents | None = None,
    collective: Collective | None = None,
    progress: bool = False,
) -> IterationResult:
    """Generate one iteration's training data, resuming from whatever phases ``store`` already holds.

    Every process of ``collective`` calls it with the same problems and settings. Sampling and scoring are
    shared out in chunks of ``settings.chunk_size`` samples; the problems, plans and statistics are decided by
    the main process and broadcast; only the main process writes files. ``result.rows`` (the training rows) is
    filled on the main process only; every process gets the same ``stats``, ``difficulties`` and ``resamples``.
    """
    events = events or PipelineEvents()
    coll = collective or Collective()
    phase_store = artifacts.PhaseStore(store, coll, settings.chunk_size, progress)
    t0 = time.monotonic()
    if coll.is_main:
        for path in store.remove_partial_files():
            logger.info("Removed %s, left half-written by a killed run", path)

    # The problems: fixed once written, so a resume uses exactly the same ones.
    problems = [
        Problem.from_row(r)
        for r in phase_store.on_main(artifacts.PROBLEMS, lambda: [p.to_row() for p in problems])
    ]
    by_id = {p.problem_id: p for p in problems}
    distributed = coll.num_processes > 1
    gen_before = sampler.stats
    n_p = presamples_for(settings.allocation, settings.budget, settings.num_presamples)
    remaining = (settings.budget - n_p) * len(problems)

    def sample_round(r: int, units: list[tuple[Problem, int]]) -> list[Sample] | None:
        """Round ``r``: sample and verify (checkpointed), then score (checkpointed); main process only."""

        def generate(chunk: list, first: int | None) -> list[dict]:
            params = _seeded(settings.sampling, r, first)
            found = _sample(
                chunk, round_=r, sampler=sampler, params=params, verifier=verifier, always_call=distributed
            )
            return [s.to_row() for s in found]

        what = "pre-sampling" if r == 0 else f"re-sampling round {r}"
        rows = phase_store.chunked(
            artifacts.samples_file(r),
            units,
            lambda u: sample_id(u[0].problem_id, u[1]),
            generate,
            desc=f"{what} (iteration {store.iteration})",
        )
        if rows is None:  # the other processes read the samples, complete since the sampling phase ended
            rows = [] if store.has(artifacts.scored_file(r)) else store.read_jsonl(artifacts.samples_file(r))
        found = [Sample.from_row(row) for row in rows]
        scored = phase_store.chunked(
            artifacts.scored_file(r),
            found,
            lambda s: s.sample_id,
            lambda chunk, _: [s.to_row() for s in _score(chunk, by_id, score_fn)],
            desc=f"scoring {what} (iteration {store.iteration})",
        )
        return None if scored is None else [Sample.from_row(row) for row in scored]

    # Round 0 pre-samples every problem; each later round takes its slice of the remainder after a new plan.
    samples: list[Sample] = []  # on the main process
    slots = {p.problem_id: 0 for p in problems}
    counts = {p.problem_id: n_p for p in problems}
    plan: list[PlanRow] = []
    for r in range(settings.resample_rounds + 1):
        if r > 0:
            slice_ = remaining // (settings.resample_rounds - r + 1)
            rows = phase_store.on_main(
                artifacts.plan_file(r),
                lambda r=r, slice_=slice_, so_far=samples: [
                    s.to_row() for s in _plan(problems, so_far, slice_, r, settings, n_p)
                ],
            )
            plan = [PlanRow.from_row(row) for row in rows]
            counts = {s.problem_id: s.next_samples for s in plan}
            remaining -= sum(counts.values())
            events.levels_estimated({s.problem_id: s.difficulty for s in plan}, counts)
        units = [(p, slots[p.problem_id] + j) for p in problems for j in range(counts[p.problem_id])]
        found = sample_round(r, units)
        samples += found or []
        for pid, c in counts.items():
            slots[pid] += c
    gen_stats = coll.gather([_delta(gen_before, sampler.stats)])
    difficulties = {s.problem_id: s.difficulty for s in plan}
    resamples = {pid: n - n_p for pid, n in slots.items()}

    # The training rows, from the problems at the levels of the last plan, on the main process.
    rows = phase_store.on_main(
        artifacts.TRAIN_ROWS,
        lambda: events.rows_selected(_select(samples, by_id, difficulties, settings, settings.min_row_score)),
        share=False,
    )

    stats = None
    if coll.is_main:
        stats = _stats(
            verifier=verifier,
            problems=problems,
            samples=samples,
            difficulties=difficulties,
            resamples=resamples,
            rows=rows,
            settings=settings,
            n_p=n_p,
            fell_back=any(s.fell_back for s in plan),
            generation=gen_stats,
        )
        estimator, thresholds, calibration_error = _thresholds(problems, samples, settings)
        stats["difficulty_estimator"] = estimator
        stats["reward_thresholds"] = list(thresholds) if thresholds else None
        if settings.calibrate_thresholds:
            stats["calibration_error"] = calibration_error
            if calibration_error:
                logger.warning("%s Falling back to answer accuracy for this iteration.", calibration_error)
        if (
            settings.objective == "sft" and settings.min_row_score is not None
        ):  # what the score filter took out
            stats["rows_dropped_by_score"] = len(_select(samples, by_id, difficulties, settings, None)) - len(
                _select(samples, by_id, difficulties, settings, settings.min_row_score)
            )
        stats["num_processes"] = coll.num_processes
        stats["phases_computed"] = phase_store.computed
        stats["phase_seconds"] = {k: round(v, 3) for k, v in phase_store.timings.items()}
        stats["units"] = phase_store.units
        stats["data_seconds"] = round(time.monotonic() - t0, 3)
    stats = coll.broadcast(stats)
    return IterationResult(rows=rows or [], stats=stats, difficulties=difficulties, resamples=resamples)


def _select(
    samples: list[Sample],
    problems: dict[str, Problem],
    difficulties: dict[str, Difficulty],
    settings,
    min_score: float | None,
) -> list[dict]:
    """SFT rows or DPO pairs from all samples of the problems whose level is in ``settings.train_levels``."""
    pooled = _for_selection(samples, problems)
    levels = {pid: d.level for pid, d in difficulties.items()}
    if settings.objective == "dpo":
        return select_dpo_pairs(
            pooled,
            levels,
            train_levels=settings.train_levels,
            seed=settings.seed,
            max_pairs_per_problem=settings.max_rows_per_problem,
        )
    return select_sft_rows(
        pooled,
        levels,
        train_levels=settings.train_levels,
        max_rows_per_problem=settings.max_rows_per_problem,
        min_score=min_score,
    )


def _delta(before: SamplingStats, after: SamplingStats) -> tuple[int, int, float]:
    return (
        after.num_generated - before.num_generated,
        after.num_completion_tokens - before.num_completion_tokens,
        after.generation_seconds - before.generation_seconds,
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _no_answer_warnings(
    samples: list[Sample], verifier, settings: PipelineSettings
) -> tuple[int | None, int, list[str]]:
    """How many completions hold no answer the verifier can read, and what to say when most are like that (or cut
    at the length limit): a run whose every sample counts as wrong must not pass in silence."""
    extract = getattr(verifier, "extract", None)  # a custom verifier without one: not counted
    no_answer = None if extract is None else sum(1 for s in samples if extract(s.completion) is None)
    truncated = sum(1 for s in samples if s.finish_reason == "length")
    warnings = []
    if no_answer is not None and samples and no_answer > len(samples) / 2:
        warnings.append(
            f"{no_answer} of {len(samples)} completions ({no_answer / len(samples):.0%}) hold no answer the verifier "
            "can read (no \\boxed{...} or '#### n'), so they count as wrong and their problems look hard. Fixes: ask "
            "for the final answer in \\boxed{} (a system prompt: `system_prompt` in a recipe), set "
            "`last_number_fallback=True` (a completion's last number is its answer), or pass a `verifier` that reads "
            "your model's answers."
        )
    if samples and truncated > len(samples) / 2:
        warnings.append(
            f"{truncated} of {len(samples)} completions ({truncated / len(samples):.0%}) were cut at "
            f"`max_completion_length`={settings.sampling.max_new_tokens} tokens before they ended: raise it."
        )
    for warning in warnings:
        logger.warning(warning)
    return no_answer, truncated, warnings


def _stats(
    *, verifier, problems, samples, difficulties, resamples, rows, settings, n_p, fell_back, generation
) -> dict:
    n = len(problems)
    no_answer, truncated, warnings = _no_answer_warnings(samples, verifier, settings)
    level_of = {pid: d.level.value for pid, d in difficulties.items()}
    pre = [s for s in samples if s.round == 0]
    spent_per_level = Counter(level_of[s.problem_id] for s in samples)
    resampled_per_level = Counter()
    for pid, r in resamples.items():
        resampled_per_level[level_of[pid]] += r
    if settings.objective == "dpo":
        kept = [r["chosen_score"] for r in rows if r.get("chosen_score") is not None]
    else:
        kept = [r["score"] for r in rows if r.get("score") is not None]
    rewards = [s.reward for s in samples if s.reward is not None]
    generated = sum(g[0] for g in generation)
    gen_tokens = sum(g[1] for g in generation)
    gen_seconds = max((g[2] for g in generation), default=0.0)  # the processes generate side by side
    return {
        "num_problems": n,
        "levels": count_levels(difficulties.values()),
        "presample_accuracy": _mean([float(s.correct) for s in pre]),
        "sample_accuracy": _mean([float(s.correct) for s in samples]),
        "budget_planned": settings.budget * n,
        "budget_spent": len(samples),
        "presamples_spent": len(pre),
        "resamples_spent": len(samples) - len(pre),
        "samples_per_round": [
            sum(1 for s in samples if s.round == r) for r in range(settings.resample_rounds + 1)
        ],
        "num_presamples": n_p,
        "samples_per_level": {lv.value: spent_per_level.get(lv.value, 0) for lv in Level},
        "resamples_per_level": {lv.value: resampled_per_level.get(lv.value, 0) for lv in Level},
        "allocation_fell_back": fell_back,
        "rows": len(rows),
        "problems_with_rows": len({r["problem_id"] for r in rows}),
        "mean_score_kept": _mean(kept),
        "mean_score_all": _mean(rewards),
        "finish_reasons": dict(Counter(s.finish_reason for s in samples)),
        "empty_completions": sum(1 for s in samples if not s.completion.strip()),
        "no_answer": no_answer,
        "truncated": truncated,
        "warnings": warnings,
        "scores_missing": len(samples) - len(rewards),
        "completion_tokens": sum(int(s.num_tokens) for s in samples),
        "generated_this_run": generated,
        "generated_per_process": [g[0] for g in generation],
        "tokens_per_second": gen_tokens / gen_seconds if gen_seconds > 0 else None,
    }
