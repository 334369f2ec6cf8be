"""Reward-guided difficulty estimation (HS-STaR, section 3.2 of arXiv 2505.19866).

Pure Python: this module imports nothing from torch, transformers or trl.

For each problem the pre-sampling phase gives a few responses. Each response has

* ``correct``: whether its final answer matches the reference (the verifier's verdict), and
* ``score``: S(r), the response's aggregated process reward (by default the MIN step reward
  of a process reward model, a probability in [0, 1]), or ``None`` where the reward source
  had nothing to say about that response.

From these, ``phi_a`` is the mean correctness and ``phi_r`` the mean score, and the paper's rule
(exactly as ``scripts/classify_diff.py`` of the authors' release applies it) sorts the problem:

* **easy** ("inlier") if ``phi_a == 1`` and ``phi_r > tau_h``;
* **hard** ("outlier") if ``phi_a == 0`` and ``phi_r < tau_l``;
* **boundary** otherwise.

So a problem that is always answered correctly but whose rationales the reward model distrusts
(``phi_r <= tau_h``) stays a boundary problem: the answers may be right for the wrong reasons.

Two ablations from the paper are offered: ``estimator="accuracy"`` (easy iff ``phi_a == 1``, hard
iff ``phi_a == 0``) and ``estimator="reward"`` (easy iff ``phi_r > tau_h``, hard iff
``phi_r < tau_l``).

Missing evidence
----------------
A problem is only called easy or hard on positive evidence; without it, it stays **boundary**
(it keeps receiving budget and its data can be trained on, so nothing is thrown away on a guess):

* a score of ``None`` is left out of ``phi_r`` (the mean is over the responses that have a score);
* if no response has a score, ``phi_r`` is ``None`` and every test on ``phi_r`` fails, so under
  ``"hsstar"`` and ``"reward"`` the problem is boundary;
* a problem with no responses at all (``num_presamples=0``) has ``phi_a = None`` and is boundary
  under every estimator, which makes HS-STaR with no pre-sampling spread its budget like uniform
  sampling.

NaN scores are not "missing": they are rejected with a ``ValueError``, because they almost
always mean a broken reward source.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "CALIBRATION_QUANTILE",
    "ESTIMATORS",
    "PUBLISHED_THRESHOLDS",
    "Difficulty",
    "Level",
    "calibrate_thresholds",
    "count_levels",
    "estimate_difficulty",
    "lookup_thresholds",
    "validate_levels",
    "validate_thresholds",
]


class Level(str, Enum):
    """Difficulty level of a problem relative to the current policy."""

    EASY = "easy"
    BOUNDARY = "boundary"
    HARD = "hard"

    def __str__(self) -> str:
        return self.value


ESTIMATORS = ("hsstar", "accuracy", "reward")
"""Difficulty estimators: the paper's rule, and its accuracy-only and reward-only ablations."""

PUBLISHED_THRESHOLDS: dict[str, tuple[float, float]] = {
    "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-7B": (0.15, 0.65),
    "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B": (0.25, 0.50),
    "Qwen/Qwen2.5-Math-PRM-7B": (0.55, 0.99),
}
"""(tau_l, tau_h) released by the authors per process reward model, tuned for a Qwen2.5-7B policy
with min-aggregated step rewards. No other pairs are published: for another PRM (or another
policy) choose thresholds on a held-out pre-sample, e.g. around the PRM's score quantiles on
always-wrong and always-right problems."""


def lookup_thresholds(reward_model_name: str | None) -> tuple[float, float] | None:
    """The published (tau_l, tau_h) for a process reward model, or ``None`` if none is published.

    Matches the Hub id (``"Qwen/Qwen2.5-Math-PRM-7B"``), the bare model name
    (``"Qwen2.5-Math-PRM-7B"``) or a local directory whose last component is that name
    (``"/models/Qwen2.5-Math-PRM-7B/"``), case-insensitively.
    """
    if not reward_model_name:
        return None
    name = str(reward_model_name).strip().rstrip("/\\").replace("\\", "/").lower()
    for hub_id, pair in PUBLISHED_THRESHOLDS.items():
        base = hub_id.split("/")[-1].lower()
        if name == hub_id.lower() or name == base or name.endswith("/" + base):
            return pair
    return None


def validate_thresholds(
    thresholds: Sequence[float] | None, *, name: str = "reward_thresholds"
) -> tuple[float, float]:
    """Check a (tau_l, tau_h) pair and return it as floats; raise ``ValueError`` naming ``name``."""
    if thresholds is None:
        raise ValueError(
            f"`{name}` is required for reward-guided difficulty estimation: pass (tau_l, tau_h), e.g. "
            f"(0.25, 0.5), or use a reward model with published thresholds ({', '.join(PUBLISHED_THRESHOLDS)})."
        )
    try:
        tau_l, tau_h = (float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a pair of numbers (tau_l, tau_h), got {thresholds!r}.") from None
    if not (0.0 <= tau_l <= 1.0 and 0.0 <= tau_h <= 1.0):
        raise ValueError(f"`{name}` must lie in [0, 1] (step rewards are probabilities), got {thresholds!r}.")
    if not tau_l < tau_h:
        raise ValueError(f"`{name}` must satisfy tau_l < tau_h, got tau_l={tau_l}, tau_h={tau_h}: swap them.")
    return tau_l, tau_h


def validate_levels(
    levels: Iterable[Level | str], *, name: str, allow_empty: bool = True
) -> frozenset[Level]:
    """Check a list of level names and return them as levels; raise ``ValueError`` naming ``name``."""
    values, names = list(levels), [lv.value for lv in Level]
    if any(v not in names for v in values) or (not values and not allow_empty):  # a Level equals its value
        kind = "a list" if allow_empty else "a non-empty list"
        raise ValueError(f"`{name}` must be {kind} of levels among {names}, got {values!r}.")
    return frozenset(Level(v) for v in values)


@dataclass(frozen=True)
class Difficulty:
    """What pre-sampling revealed about one problem."""

    level: Level
    phi_a: float | None
    """Mean answer correctness over the responses; ``None`` if there were none."""
    phi_r: float | None
    """Mean response score S(r) over the responses that have one; ``None`` if none has."""
    num_samples: int
    num_correct: int
    num_scored: int

    def to_dict(self) -> dict:
        return {
            "level": self.level.value,
            "phi_a": self.phi_a,
            "phi_r": self.phi_r,
            "num_samples": self.num_samples,
            "num_correct": self.num_correct,
            "num_scored": self.num_scored,
        }

    @classmethod
    def from_dict(cls, row: dict) -> Difficulty:
        return cls(
            level=Level(row["level"]),
            phi_a=row["phi_a"],
            phi_r=row["phi_r"],
            num_samples=int(row["num_samples"]),
            num_correct=int(row["num_correct"]),
            num_scored=int(row["num_scored"]),
        )


def _as_bool(value: object, index: int) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"`correct[{index}]` must be a bool, got {value!r}.")


def _as_score(value: object, index: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`scores[{index}]` must be a number or None, got {value!r}.")
    score = float(value)
    if math.isnan(score):
        raise ValueError(
            f"`scores[{index}]` is NaN: the reward source returned NaN. Return None for a response it "
            "cannot score, or fix the reward source."
        )
    return score


def estimate_difficulty(
    correct: Sequence[bool],
    scores: Sequence[float | None] | None = None,
    *,
    estimator: str = "hsstar",
    thresholds: Sequence[float] | None = None,
) -> Difficulty:
    """Estimate one problem's difficulty from its pre-samples.

    Args:
        correct: per-response answer correctness.
        scores: per-response S(r) (already aggregated, e.g. min step reward), ``None`` for a response
            without a score. May be omitted for ``estimator="accuracy"``.
        estimator: ``"hsstar"`` (accuracy and reward), ``"accuracy"`` or ``"reward"``.
        thresholds: (tau_l, tau_h) with 0 <= tau_l < tau_h <= 1; required unless
            ``estimator="accuracy"``.

    Returns:
        A :class:`Difficulty` with the level and the statistics behind it.

    Example:
        >>> estimate_difficulty([True, True, True], [0.9, 0.8, 0.7], thresholds=(0.25, 0.5)).level
        <Level.EASY: 'easy'>
        >>> estimate_difficulty([True, True, True], [0.9, 0.1, 0.2], thresholds=(0.25, 0.5)).level
        <Level.BOUNDARY: 'boundary'>
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"`difficulty_estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
    tau_l = tau_h = None
    if estimator != "accuracy":
        tau_l, tau_h = validate_thresholds(thresholds)
    oks = [_as_bool(c, i) for i, c in enumerate(correct)]
    if scores is None:
        vals: list[float | None] = [None] * len(oks)
    else:
        if len(scores) != len(oks):
            raise ValueError(
                f"`scores` has {len(scores)} entries but `correct` has {len(oks)}: give one score per response."
            )
        vals = [_as_score(s, i) for i, s in enumerate(scores)]

    n = len(oks)
    num_correct = sum(oks)
    scored = [s for s in vals if s is not None]
    phi_a = num_correct / n if n else None
    phi_r = sum(scored) / len(scored) if scored else None

    level = Level.BOUNDARY
    if phi_a is not None:  # no responses: no evidence, boundary
        acc_easy, acc_hard = phi_a == 1.0, phi_a == 0.0
        has_reward = phi_r is not None and tau_l is not None
        rew_easy = has_reward and phi_r > tau_h
        rew_hard = has_reward and phi_r < tau_l
        if estimator == "hsstar":
            easy, hard = acc_easy and rew_easy, acc_hard and rew_hard
        elif estimator == "accuracy":
            easy, hard = acc_easy, acc_hard
        else:
            easy, hard = rew_easy, rew_hard
        if easy:
            level = Level.EASY
        elif hard:
            level = Level.HARD
    return Difficulty(
        level=level,
        phi_a=phi_a,
        phi_r=phi_r,
        num_samples=n,
        num_correct=num_correct,
        num_scored=len(scored),
    )


def count_levels(difficulties: Iterable[Difficulty | Level]) -> dict[str, int]:
    """Count problems per level: ``{"easy": e, "boundary": b, "hard": h}`` (all keys always present)."""
    counts = {level.value: 0 for level in Level}
    for d in difficulties:
        level = d.level if isinstance(d, Difficulty) else Level(d)
        counts[level.value] += 1
    return counts


CALIBRATION_QUANTILE = 0.25
"""The share of always-right (always-wrong) problems whose rationales are trusted least (most) and stay boundary."""


def _quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (position q * (n - 1))."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    low = int(pos)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (pos - low)


def calibrate_thresholds(
    difficulties: Iterable[Difficulty], *, quantile: float = CALIBRATION_QUANTILE
) -> tuple[float, float]:
    """(tau_l, tau_h) for any reward model and policy, from pre-sampling statistics.

    tau_h sits just below (1e-6) the ``quantile``-quantile of phi_r over the problems answered right every time,
    tau_l just above the ``1 - quantile``-quantile over those answered wrong every time: under the paper's strict
    tests the other ``1 - quantile`` of each group (ties at the cut included, as when a reward model saturates at
    1) is called easy (hard); the share the reward model trusts least (most) stays boundary. A group with no
    scored problem leaves its threshold at the end of the scale (1 or 0). Raises ``ValueError`` when the two
    cross: the scores do not separate the groups.

    Example:
        >>> d = lambda a, r: Difficulty(Level.BOUNDARY, a, r, 3, round(3 * a), 3)
        >>> calibrate_thresholds([d(1, 0.9), d(1, 0.6), d(1, 0.8), d(1, 0.7), d(1, 1.0), d(0, 0.1), d(0, 0.3), d(0, 0.2)])
        (0.250001, 0.699999)
    """
    if not 0.0 <= quantile < 0.5:
        raise ValueError(f"`quantile` must lie in [0, 0.5), got {quantile!r}.")
    ds = list(difficulties)
    right = [d.phi_r for d in ds if d.phi_a == 1.0 and d.phi_r is not None]
    wrong = [d.phi_r for d in ds if d.phi_a == 0.0 and d.phi_r is not None]
    tau_h = _quantile(right, quantile) - 1e-6 if right else 1.0
    tau_l = _quantile(wrong, 1.0 - quantile) + 1e-6 if wrong else 0.0
    tau_l, tau_h = round(min(max(tau_l, 0.0), 1.0), 6), round(min(max(tau_h, 0.0), 1.0), 6)
    if not tau_l < tau_h:
        raise ValueError(
            f"calibrated thresholds cross (tau_l={tau_l} >= tau_h={tau_h}): the reward scores of problems answered "
            f"wrong every time ({len(wrong)}) are not below those answered right every time ({len(right)}), so the "
            "reward model does not separate them for this policy. Use `difficulty_estimator='accuracy'`."
        )
    return tau_l, tau_h
