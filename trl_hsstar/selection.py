"""Training-data selection: scored samples -> SFT rows or DPO pairs (HS-STaR section 3.4).

Pure Python: this module imports nothing from torch, transformers or trl.

Only problems whose level is in ``levels`` (by default the boundary problems) contribute, with
their pre-samples and re-samples pooled.

* :func:`select_sft_rows` (the default objective, STaR/RFT style): the correct responses, ranked by
  S(r) descending (unscored ones last, ties keep sampling order), exact duplicates removed, at most
  ``max_rows_per_problem`` per problem.
  With ``min_score`` (not in the release) a correct response also needs S(r) >= ``min_score``: a
  process reward model then cleans what the answer check lets through.
* :func:`select_dpo_pairs` (the authors' release, ``scripts/filter_ours_dpo.py``): per problem the
  correct responses (chosen) and the incorrect ones (rejected), each sorted by S(r) descending, both
  cut to K = min(#correct, #incorrect), each shuffled, zipped into K pairs; a problem without a
  correct or without an incorrect response gives none; finally all pairs are shuffled. One seeded
  random stream serves the whole call, in order of first appearance of each problem, as in the
  release (which seeds it with 1234).

Rows come out in TRL's prompt-completion / preference formats (``prompt`` + ``completion``, or
``prompt`` + ``chosen`` + ``rejected``) plus bookkeeping columns, so they feed ``SFTTrainer`` and
``DPOTrainer`` directly.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .checks import check_int
from .difficulty import Level, validate_levels

__all__ = ["ScoredSample", "group_by_problem", "quota_filled", "select_dpo_pairs", "select_sft_rows"]


@dataclass(frozen=True)
class ScoredSample:
    """One sampled response with its verdicts."""

    problem_id: str
    prompt: Any
    """The prompt as the trainer will see it (a string, or a list of chat messages)."""
    completion: Any
    """The response (a string, or a list of chat messages)."""
    correct: bool
    score: float | None = None
    """S(r): the aggregated process reward; ``None`` if the reward source gave none."""
    sample_id: str | None = None


def group_by_problem(samples: Iterable[Any], problem_ids: Iterable[str] = ()) -> dict[str, list[Any]]:
    """Group samples (anything with a ``problem_id``) by problem: ``problem_ids`` first (a problem without samples
    gets an empty list), then the others in order of first appearance; samples in input order."""
    groups: dict[str, list[Any]] = {pid: [] for pid in problem_ids}
    for s in samples:
        groups.setdefault(s.problem_id, []).append(s)
    return groups


def _by_score_desc(samples: Sequence[ScoredSample]) -> list[ScoredSample]:
    # Stable: equal scores keep their sampling order; unscored responses go last.
    return sorted(samples, key=lambda s: (s.score is None, -(s.score or 0.0)))


def _eligible(problem_id: str, levels: Mapping[str, Level | str] | None, wanted: frozenset[Level]) -> bool:
    if levels is None:
        return True
    level = levels.get(problem_id)
    return level is not None and Level(level) in wanted


def _dedupe_key(completion: Any) -> Any:
    return completion if isinstance(completion, str) else repr(completion)


def _sft_candidates(group: Sequence[ScoredSample], min_score: float | None) -> list[ScoredSample]:
    return [
        s
        for s in group
        if s.correct and (min_score is None or (s.score is not None and s.score >= min_score))
    ]


def quota_filled(
    group: Sequence[ScoredSample], *, objective: str, cap: int | None, min_score: float | None = None
) -> bool:
    """Whether one problem's samples already give ``cap`` training rows: distinct correct responses (SFT, with
    ``min_score`` as in :func:`select_sft_rows`) or pairs, min(#correct, #incorrect) (DPO). No cap: never."""
    if cap is None:
        return False
    if objective == "dpo":
        correct = sum(1 for s in group if s.correct)
        return min(correct, len(group) - correct) >= cap
    return len({_dedupe_key(s.completion) for s in _sft_candidates(group, min_score)}) >= cap


def select_sft_rows(
    samples: Iterable[ScoredSample],
    levels: Mapping[str, Level | str] | None = None,
    *,
    train_levels: Collection[Level | str] = (Level.BOUNDARY,),
    max_rows_per_problem: int | None = None,
    min_score: float | None = None,
) -> list[dict]:
    """Correct responses of the eligible problems as SFT rows.

    Args:
        samples: all scored samples of the iteration (pre-samples and re-samples).
        levels: ``problem_id -> level``; ``None`` makes every problem eligible (plain STaR/RFT).
            A problem missing from a given mapping is not eligible.
        train_levels: the levels whose problems give rows.
        max_rows_per_problem: cap per problem after ranking and de-duplication (``None``: no cap).
        min_score: keep only responses with S(r) >= ``min_score`` (an unscored one is dropped); ``None``: all.

    Returns:
        Rows ``{"prompt", "completion", "problem_id", "sample_id", "score", "rank"}``, problems in order of first
        appearance, each problem's rows best first.
    """
    check_int(max_rows_per_problem, "max_rows_per_problem", allow_none=True)
    wanted = validate_levels(train_levels, name="train_levels")
    rows: list[dict] = []
    for problem_id, group in group_by_problem(samples).items():
        if not _eligible(problem_id, levels, wanted):
            continue
        seen: set = set()
        kept = 0
        for s in _by_score_desc(_sft_candidates(group, min_score)):
            key = _dedupe_key(s.completion)
            if key in seen:
                continue
            seen.add(key)
            rows.append(
                {
                    "prompt": s.prompt,
                    "completion": s.completion,
                    "problem_id": problem_id,
                    "sample_id": s.sample_id,
                    "score": s.score,
                    "rank": kept,
                }
            )
            kept += 1
            if max_rows_per_problem is not None and kept >= max_rows_per_problem:
                break
    return rows


def select_dpo_pairs(
    samples: Iterable[ScoredSample],
    levels: Mapping[str, Level | str] | None = None,
    *,
    train_levels: Collection[Level | str] = (Level.BOUNDARY,),
    seed: int = 1234,
    max_pairs_per_problem: int | None = None,
) -> list[dict]:
    """Preference pairs built exactly as the authors' release builds them.

    Args:
        samples: all scored samples of the iteration (pre-samples and re-samples).
        levels: ``problem_id -> level``; ``None`` makes every problem eligible.
        train_levels: the levels whose problems give pairs.
        seed: seeds the single random stream (the release uses 1234).
        max_pairs_per_problem: optional extra cap on K (not in the release; ``None`` = release behaviour).

    Returns:
        Rows ``{"prompt", "chosen", "rejected", "problem_id", "chosen_id", "rejected_id", "chosen_score",
        "rejected_score"}``, shuffled.
    """
    check_int(max_pairs_per_problem, "max_pairs_per_problem", allow_none=True)
    wanted = validate_levels(train_levels, name="train_levels")
    rng = random.Random(seed)
    pairs: list[dict] = []
    for problem_id, group in group_by_problem(samples).items():
        if not _eligible(problem_id, levels, wanted):
            continue
        chosen = _by_score_desc([s for s in group if s.correct])
        rejected = _by_score_desc([s for s in group if not s.correct])
        if not chosen or not rejected:
            continue
        k = min(len(chosen), len(rejected))
        if max_pairs_per_problem is not None:
            k = min(k, max_pairs_per_problem)
        chosen, rejected = chosen[:k], rejected[:k]
        rng.shuffle(chosen)
        rng.shuffle(rejected)
        for c, r in zip(chosen, rejected):
            pairs.append(
                {
                    "prompt": c.prompt,
                    "chosen": c.completion,
                    "rejected": r.completion,
                    "problem_id": problem_id,
                    "chosen_id": c.sample_id,
                    "rejected_id": r.sample_id,
                    "chosen_score": c.score,
                    "rejected_score": r.score,
                }
            )
    rng.shuffle(pairs)
    return pairs
