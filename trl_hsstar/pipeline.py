"""One HS-STaR iteration's data generation: presample, score, estimate, allocate, resample, score, select.

Data flows one way::

    problems -> pre-samples -> scores -> levels -> allocation -> re-samples -> scores -> training rows

Each arrow leaves a file in ``output_dir/iteration-<t>/`` (see :mod:`trl_hsstar.artifacts`); a phase whose
file exists is read back instead of recomputed, which is what makes a killed run resumable without losing or
repeating samples. The pipeline knows nothing of trainers: it is handed a sampler, a verifier, a scoring
function and its settings, and returns training rows plus the iteration's statistics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from . import artifacts as A
from .budget import allocate, presamples_for
from .difficulty import Difficulty, Level, count_levels, estimate_difficulty
from .distributed import Collective
from .sampling import Sampler, SamplingParams, SamplingStats
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
    chunk_size: int = 512
    """Samples generated (or scored) per checkpointed chunk of a phase."""
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
    if not completions:
        return []
    batch = getattr(verifier, "verify_batch", None)
    if batch is not None:
        return [bool(x) for x in batch(completions, references)]
    return [bool(verifier(c, r)) for c, r in zip(completions, references)]


def _sample(
    units: Sequence[tuple[Problem, int]],
    *,
    phase: str,
    sampler: Sampler,
    params: SamplingParams,
    verifier: Callable[[str, str], bool],
    always_call: bool = False,
) -> list[dict]:
    """Generate and verify one sample per ``(problem, slot)`` unit; units of a problem are consecutive slots.

    With ``always_call`` the sampler is called even for no units (every process must call it together when
    generation is collective, e.g. under DeepSpeed ZeRO-3).
    """
    requests: list[list] = []  # [problem, first slot, count], one per run of consecutive slots of a problem
    for problem, slot in units:
        last = requests[-1] if requests else None
        if last is not None and last[0].id == problem.id and last[1] + last[2] == slot:
            last[2] += 1
        else:
            requests.append([problem, slot, 1])
    if not requests and not always_call:
        return []
    outputs = sampler.generate([p.prompt_text for p, _, _ in requests], [c for _, _, c in requests], params)
    if len(outputs) != len(requests):
        raise RuntimeError(
            f"sampler {getattr(sampler, 'name', type(sampler).__name__)!r} returned {len(outputs)} lists of "
            f"completions for {len(requests)} prompts"
        )
    rows = []
    for (problem, start, count), completions in zip(requests, outputs):
        if len(completions) != count:
            raise RuntimeError(
                f"sampler {getattr(sampler, 'name', type(sampler).__name__)!r} returned {len(completions)} "
                f"completions for problem {problem.id!r} instead of {count}"
            )
        for j, c in enumerate(completions):
            slot = start + j
            rows.append(
                {
                    "sample_id": sample_id(problem.id, slot),
                    "problem_id": problem.id,
                    "slot": slot,
                    "phase": phase,
                    "completion": c.text,
                    "num_tokens": c.num_tokens,
                    "finish_reason": c.finish_reason,
                }
            )
    by_id = {p.id: p for p, _, _ in requests}
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


def sample_id(problem_id: str, slot: int) -> str:
    """The id of sample ``slot`` of a problem: unique within an iteration."""
    return f"{problem_id}/{slot}"


class _Run:
    """One call of :func:`run_iteration`: its store, process group, timings and chunk accounting."""

    def __init__(self, store: A.IterationArtifacts, coll: Collective, chunk_size: int, progress: bool):
        self.store, self.coll, self.chunk_size, self.progress = store, coll, chunk_size, progress
        self.computed: list[str] = []
        self.timings: dict[str, float] = {}
        self.units: dict[str, dict[str, int]] = {}

    def main_phase(
        self, name: str, compute: Callable[[], list[dict]], share: bool = True
    ) -> list[dict] | None:
        """A phase computed by the main process alone: read its file if complete, else compute and write it.
        With ``share``, every process gets the rows (broadcast); otherwise the other processes get ``None``."""
        start = time.monotonic()
        rows = None
        if self.coll.is_main:
            if self.store.has(name):
                rows = self.store.read_jsonl(name)
            else:
                rows = compute()
                self.store.write_jsonl(name, rows)
                self.computed.append(name)
                self.timings[name] = time.monotonic() - start
        return self.coll.broadcast(rows) if share else rows

    def chunked_phase(
        self,
        name: str,
        units: list,
        key: Callable[[Any], str],
        compute: Callable[[list, int | None], list[dict]],
        *,
        desc: str,
    ) -> list[dict] | None:
        """A phase over ``units`` (one output row per unit, with ``sample_id == key(unit)``), shared by all processes
        and checkpointed in chunks.

        The main process lists the chunks still to do (``<phase>.chunks/chunk-<first unit>.jsonl`` files already
        written are complete: each is renamed into place whole) and broadcasts the plan; in each round every
        process computes one chunk (or calls ``compute([], None)`` if none is left for it), the main process
        gathers the rows and writes each chunk's file. Once every chunk is written, the main process merges them,
        checks that each unit has exactly one row, writes the phase file and removes the chunks. Returns the rows in
        unit order on the main process, ``None`` on the others.
        """
        store, coll = self.store, self.coll
        chunk_dir = store.path(f".{name}.chunks")
        plan = None
        if coll.is_main:
            if store.has(name):
                plan = {"done": True}
            else:
                done = _read_chunks(chunk_dir)
                keys = [key(u) for u in units]
                position = {k: i for i, k in enumerate(keys)}
                unknown = [k for k in done if k not in position]
                if unknown:
                    raise RuntimeError(
                        f"{chunk_dir} holds rows for {len(unknown)} unit(s) this phase does not have (e.g. "
                        f"{unknown[0]!r}): the run's settings changed since they were written. Remove that directory "
                        "to redo the phase."
                    )
                pending = [i for i, k in enumerate(keys) if k not in done]
                chunks = [pending[j : j + self.chunk_size] for j in range(0, len(pending), self.chunk_size)]
                plan = {"done": False, "chunks": chunks, "reused": len(done)}
        plan = coll.broadcast(plan)
        if plan["done"]:
            if chunk_dir.exists() and coll.is_main:
                shutil.rmtree(chunk_dir, ignore_errors=True)  # a kill after the merge and before the clean-up
            return store.read_jsonl(name) if coll.is_main else None

        start = time.monotonic()
        chunks, p = plan["chunks"], coll.num_processes
        total = sum(len(c) for c in chunks)
        bar = tqdm(
            total=len(units),
            initial=len(units) - total,
            desc=desc,
            unit="sample",
            disable=not (self.progress and coll.is_main),
            leave=False,
        )
        with bar:
            for r in range(math.ceil(len(chunks) / p)):
                mine = (
                    chunks[r * p + coll.process_index] if r * p + coll.process_index < len(chunks) else None
                )
                rows = compute([units[i] for i in mine], mine[0]) if mine else compute([], None)
                gathered = coll.gather([(mine, rows)] if mine else [])
                if coll.is_main:
                    for indices, chunk_rows in gathered:
                        wanted = [key(units[i]) for i in indices]
                        got = [row["sample_id"] for row in chunk_rows]
                        if sorted(got) != sorted(wanted):
                            raise RuntimeError(
                                f"phase {name!r}: a chunk returned rows for {len(got)} unit(s) instead of its "
                                f"{len(wanted)} (first wanted {wanted[0]!r})"
                            )
                        A.atomic_write_text(
                            chunk_dir / f"chunk-{indices[0]:08d}.jsonl",
                            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in chunk_rows),
                        )
                        bar.update(len(indices))
        rows = None
        if coll.is_main:
            done = _read_chunks(chunk_dir)
            missing = [key(u) for u in units if key(u) not in done]
            if missing or len(done) != len(units):
                raise RuntimeError(
                    f"phase {name!r}: {len(missing)} unit(s) have no row after every chunk ran (e.g. "
                    f"{missing[:1]}); rerun to compute them."
                )
            rows = [done[key(u)] for u in units]
            store.write_jsonl(name, rows)
            shutil.rmtree(chunk_dir, ignore_errors=True)
            self.computed.append(name)
            self.timings[name] = time.monotonic() - start
            self.units[name] = {"computed": total, "reused": plan["reused"]}
        coll.barrier()
        return rows


def _read_chunks(chunk_dir) -> dict[str, dict]:
    """Rows of the complete chunk files in ``chunk_dir``, by sample id (a unit in two chunks is an error)."""
    rows: dict[str, dict] = {}
    if not chunk_dir.is_dir():
        return rows
    for path in sorted(chunk_dir.glob("chunk-*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if row["sample_id"] in rows:
                    raise RuntimeError(
                        f"{path} repeats sample {row['sample_id']!r} of another chunk: remove {chunk_dir} to redo "
                        "the phase."
                    )
                rows[row["sample_id"]] = row
    return rows


def run_iteration(
    problems: Sequence[Problem],
    *,
    store: A.IterationArtifacts,
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
    shared out in chunks of ``settings.chunk_size`` samples; the problems, levels, allocation and statistics
    are decided by the main process and broadcast; only the main process writes files. ``result.rows`` (the
    training rows) is filled on the main process only; every process gets the same ``stats``, ``difficulties``
    and ``resamples``.
    """
    events = events or PipelineEvents()
    coll = collective or Collective()
    run = _Run(store, coll, settings.chunk_size, progress)
    t0 = time.monotonic()
    if coll.is_main:
        for path in store.remove_partial_files():
            logger.info("Removed %s, left half-written by a killed run", path)

    # problems: the problem list is fixed once written, so a resume uses exactly the same problems
    problem_rows = run.main_phase(A.PROBLEMS, lambda: [p.to_row() for p in problems])
    problems = [Problem.from_row(r) for r in problem_rows]
    by_id = {p.id: p for p in problems}
    n = len(problems)
    distributed = coll.num_processes > 1
    gen_before = sampler.stats

    def seeded(params: SamplingParams, phase: str, first: int | None) -> SamplingParams:
        # One seed per chunk, from the phase and the chunk's first unit: a resumed or re-sharded run draws what an
        # uninterrupted one draws, and no two chunks share a random stream.
        if params.seed is None or first is None:
            return params
        return dataclasses.replace(params, seed=zlib.crc32(f"{params.seed}:{phase}:{first}".encode()))

    def sample_phase(name: str, units: list[tuple[Problem, int]], phase: str, desc: str) -> list[dict] | None:
        def compute(chunk: list, first: int | None) -> list[dict]:
            return _sample(
                chunk,
                phase=phase,
                sampler=sampler,
                params=seeded(settings.sampling, phase, first),
                verifier=verifier,
                always_call=distributed,
            )

        return run.chunked_phase(name, units, lambda u: sample_id(u[0].id, u[1]), compute, desc=desc)

    def score_phase(name: str, samples: list[dict] | None, samples_name: str, desc: str) -> list[dict] | None:
        if (
            samples is None
        ):  # the other processes read the samples file, complete since the sampling phase ended
            samples = [] if store.has(name) else store.read_jsonl(samples_name)
        return run.chunked_phase(
            name,
            samples,
            lambda s: s["sample_id"],
            lambda chunk, _: _score(chunk, by_id, score_fn),
            desc=desc,
        )

    # 1. pre-sampling
    n_p = presamples_for(settings.allocation, settings.budget, settings.num_presamples)
    pre_units = [(p, slot) for p in problems for slot in range(n_p)]
    presamples = sample_phase(A.PRESAMPLES, pre_units, "pre", f"pre-sampling (iteration {store.iteration})")
    pre_scores = score_phase(
        A.PRESAMPLE_SCORES, presamples, A.PRESAMPLES, f"scoring pre-samples (iteration {store.iteration})"
    )

    # 2. difficulty estimation and 3. allocation, on the main process, broadcast
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

    level_rows = run.main_phase(A.LEVELS, estimate)
    difficulties = {r["problem_id"]: Difficulty.from_dict(r) for r in level_rows}
    resamples = {r["problem_id"]: int(r["resamples"]) for r in level_rows}
    events.levels_estimated(difficulties, resamples)

    # 4. re-sampling
    re_units = [(p, n_p + j) for p in problems for j in range(resamples[p.id])]
    more = sample_phase(A.RESAMPLES, re_units, "re", f"re-sampling (iteration {store.iteration})")
    re_scores = score_phase(
        A.RESAMPLE_SCORES, more, A.RESAMPLES, f"scoring re-samples (iteration {store.iteration})"
    )
    gen_stats = coll.gather([_delta(gen_before, sampler.stats)])

    # 5. selection and statistics, on the main process
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

    rows = run.main_phase(A.TRAIN_ROWS, select, share=False)

    stats = None
    if coll.is_main:
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
            generation=gen_stats,
        )
        stats["num_processes"] = coll.num_processes
        stats["phases_computed"] = run.computed
        stats["phase_seconds"] = {k: round(v, 3) for k, v in run.timings.items()}
        stats["units"] = run.units
        stats["data_seconds"] = round(time.monotonic() - t0, 3)
    stats = coll.broadcast(stats)
    return IterationResult(rows=rows or [], stats=stats, difficulties=difficulties, resamples=resamples)


def _delta(before: SamplingStats, after: SamplingStats) -> tuple[int, int, float]:
    return (
        after.num_generated - before.num_generated,
        after.num_completion_tokens - before.num_completion_tokens,
        after.generation_seconds - before.generation_seconds,
    )


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
    generated = sum(g[0] for g in generation)
    gen_tokens = sum(g[1] for g in generation)
    gen_seconds = max((g[2] for g in generation), default=0.0)  # the processes generate side by side
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
        "empty_completions": sum(1 for s in samples if not s["completion"].strip()),
        "scores_missing": sum(1 for v in score_of.values() if v is None),
        "completion_tokens": sum(int(s["num_tokens"]) for s in samples),
        "generated_this_run": generated,
        "generated_per_process": [g[0] for g in generation],
        "tokens_per_second": gen_tokens / gen_seconds if gen_seconds > 0 else None,
    }
