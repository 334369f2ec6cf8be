"""Sampling-budget allocation: how many re-samples each problem gets (HS-STaR section 3.3).

Pure Python: this module imports nothing from torch, transformers or trl.

Every strategy spends exactly ``budget * N`` samples on N problems per iteration: first
``presamples_for(strategy, ...)`` samples on every problem, then the remainder

    R = (budget - num_presamples) * N

is split by :func:`allocate`. The strategies (the paper's method and the baselines it is compared
with at equal budget):

``"hsstar"``
    The authors' release: R goes to the problems whose level is in ``target_levels`` (by default
    only the boundary ones), split evenly: each gets ``R // E`` and a seeded random subset of
    ``R % E`` of them gets one more, so the total is exact. Setting ``target_levels`` to
    ``("easy",)`` or ``("hard",)`` gives the paper's utility study.
``"uniform"``
    STaR / RFT / ReST-EM: everything is spent in pre-sampling (``presamples_for`` returns
    ``budget``), so R is 0. If a caller still pre-samples fewer, R is split evenly over all
    problems, which gives the same per-problem count.
``"prop2diff"``
    DART-Math: R is split in proportion to the estimated fail rate ``1 - phi_a`` (largest-remainder
    rounding, ties broken by a seeded shuffle). A problem without pre-samples counts as fail rate 1.
``"band"``
    Pass-rate band / non-zero-variance filter (DAPO, open-r1): R is split evenly over the problems
    with ``band[0] < phi_a < band[1]`` (by default: solved sometimes, not always).
``"hsstar_adaptive"``
    Beyond the release: R is spent over several rounds (the caller hands out one slice per round with
    ``remaining``). Each round the slice goes evenly to the problems in ``target_levels`` that have not
    yet ``filled`` their quota of training rows; when none is left, to every problem without a full
    quota (more samples may move its level); only then to all.
``"knapsack"``
    Knapsack RL (Li et al. 2025, arXiv 2509.25849): a problem with pass rate p and N samples is worth
    ``(1 - p^N - (1 - p)^N) * p * (1 - p)^2`` (the chance of a mixed group times the information
    gain); R goes one sample at a time to the largest gain in value, p estimated by ``phi_a``
    (0.5 without pre-samples). Problems with ``phi_a`` of 0 or 1 are worth nothing and get nothing.

When no problem is eligible (no boundary problem, nothing in the band, or every fail rate is 0),
R is split evenly over **all** problems, i.e. the iteration falls back to uniform sampling and the
budget is still spent exactly; :attr:`Allocation.fell_back` records it so that callers can warn.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .checks import check_int
from .difficulty import Difficulty, Level, validate_levels

__all__ = ["ROLLOUT_ALLOCATIONS", "STRATEGIES", "Allocation", "allocate", "draw_prompts", "presamples_for"]

STRATEGIES = ("hsstar", "uniform", "prop2diff", "band", "hsstar_adaptive", "knapsack")
ROLLOUT_ALLOCATIONS = ("uniform", "hsstar", "dapo")
"""How the online trainer (``HSStarGRPOTrainer``) spends its rollouts: TRL's sampler, :func:`draw_prompts`, or
DAPO's dynamic sampling (zero-variance groups dropped, the batch refilled)."""


@dataclass(frozen=True)
class Allocation:
    """The outcome of :func:`allocate` for one iteration."""

    num_presamples: int
    """Pre-samples every problem received."""
    resamples: list[int]
    """Re-samples per problem, in the order of the input."""
    eligible: list[bool] = field(repr=False)
    """Which problems the strategy considered eligible for the remainder."""
    fell_back: bool = False
    """True when no problem was eligible and the remainder was spread over all problems."""

    @property
    def total(self) -> int:
        """Samples spent on the iteration: pre-samples plus re-samples."""
        return self.num_presamples * len(self.resamples) + sum(self.resamples)

    def per_problem(self) -> list[int]:
        """Total samples per problem (pre-samples + re-samples)."""
        return [self.num_presamples + r for r in self.resamples]


def _check_budget(budget: int, num_presamples: int) -> None:
    check_int(budget, "sampling_budget")
    check_int(num_presamples, "num_presamples", minimum=0)
    if num_presamples > budget:
        raise ValueError(
            f"`num_presamples` ({num_presamples}) exceeds `sampling_budget` ({budget}): pre-sampling cannot "
            "spend more than the whole budget. Lower `num_presamples` or raise `sampling_budget`."
        )


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"`allocation` must be one of {STRATEGIES}, got {strategy!r}.")


def presamples_for(strategy: str, budget: int, num_presamples: int) -> int:
    """Pre-samples per problem under ``strategy``: ``budget`` for ``"uniform"``, else ``num_presamples``."""
    _check_strategy(strategy)
    _check_budget(budget, num_presamples)
    return budget if strategy == "uniform" else num_presamples


def _spread_evenly(remaining: int, eligible: list[int], n: int, rng: random.Random) -> list[int]:
    """Split ``remaining`` over the indices in ``eligible``: R // E each, a seeded subset one more."""
    counts = [0] * n
    if remaining == 0 or not eligible:
        return counts
    base, extra = divmod(remaining, len(eligible))
    for i in eligible:
        counts[i] = base
    for i in rng.sample(eligible, extra):
        counts[i] += 1
    return counts


def _spread_proportionally(remaining: int, weights: list[float], rng: random.Random) -> list[int]:
    """Largest-remainder split of ``remaining`` in proportion to ``weights`` (sum > 0); exact total."""
    total_weight = sum(weights)
    quotas = [remaining * w / total_weight for w in weights]
    counts = [int(q) for q in quotas]
    leftover = remaining - sum(counts)
    order = list(range(len(weights)))
    rng.shuffle(order)  # seeded tie-breaking among equal fractional parts
    order.sort(key=lambda i: quotas[i] - counts[i], reverse=True)  # stable: keeps the shuffle among ties
    for i in order[:leftover]:
        counts[i] += 1
    return counts


def knapsack_value(p: float, n: int) -> float:
    """Knapsack RL's value of ``n`` samples on a problem of pass rate ``p``: P(mixed group) * p(1-p)^2."""
    if n < 2:
        return 0.0
    return (1.0 - p**n - (1.0 - p) ** n) * p * (1.0 - p) ** 2


def _spread_knapsack(remaining: int, rates: list[float], eligible: list[bool], start: int) -> list[int]:
    """Greedy by marginal value, one sample at a time: optimal, as the value is concave in n from n = 1 on (the
    first sample of a problem without pre-samples is valued at half of the first two)."""
    counts = [0] * len(rates)

    def gain(i: int) -> float:
        n = start + counts[i]
        step = 2 if n == 0 else 1
        return (knapsack_value(rates[i], n + step) - knapsack_value(rates[i], n)) / step

    heap = [(-gain(i), i) for i in range(len(rates)) if eligible[i]]  # ties: the lower index first
    heapq.heapify(heap)
    for _ in range(remaining):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-gain(i), i))
    return counts


def allocate(
    difficulties: Sequence[Difficulty],
    *,
    strategy: str = "hsstar",
    budget: int = 8,
    num_presamples: int = 3,
    seed: int = 0,
    target_levels: Sequence[Level | str] = (Level.BOUNDARY,),
    band: tuple[float, float] = (0.0, 1.0),
    remaining: int | None = None,
    filled: Sequence[bool] | None = None,
) -> Allocation:
    """Decide how many re-samples each problem gets.

    Args:
        difficulties: one :class:`~trl_hsstar.difficulty.Difficulty` per problem, from pre-sampling.
        strategy: one of ``"hsstar"``, ``"uniform"``, ``"prop2diff"``, ``"band"`` (see the module doc).
        budget: B, the average number of samples per problem for the whole iteration.
        num_presamples: samples each problem already received in pre-sampling (for ``"uniform"``
            this should be ``presamples_for("uniform", budget, n_p) == budget``).
        seed: seeds the choice of who gets the indivisible remainder.
        target_levels: for ``"hsstar"``, the levels that receive the remainder.
        band: for ``"band"``, the open interval of pre-sample accuracy that is eligible.
        remaining: the samples to hand out; by default the whole remainder ``(budget - num_presamples) * N``.
            A loop of several re-sampling rounds hands out one slice of it per round.
        filled: for ``"hsstar_adaptive"``, per problem, whether it already has its quota of training rows
            (such a problem gets nothing while another is eligible); ``None``: none has.

    Returns:
        An :class:`Allocation` whose re-samples add up to exactly ``remaining`` (so that by default ``total`` is
        exactly ``budget * len(difficulties)``).

    Example:
        >>> from trl_hsstar.difficulty import Difficulty, Level
        >>> d = lambda level: Difficulty(Level(level), None, None, 3, 0, 0)
        >>> allocate([d("easy"), d("boundary"), d("boundary"), d("hard")], budget=8, num_presamples=3).resamples
        [0, 10, 10, 0]
    """
    _check_strategy(strategy)
    _check_budget(budget, num_presamples)
    n = len(difficulties)
    if remaining is None:
        remaining = (budget - num_presamples) * n
    elif (
        isinstance(remaining, bool)
        or not isinstance(remaining, int)
        or not 0 <= remaining <= (budget - num_presamples) * n
    ):
        raise ValueError(
            f"`remaining` must be an integer between 0 and (budget - num_presamples) * N = "
            f"{(budget - num_presamples) * n}, got {remaining!r}."
        )
    rng = random.Random(seed)
    if filled is not None and len(filled) != n:
        raise ValueError(f"`filled` has {len(filled)} entries for {n} problems: give one per problem.")
    full = [bool(f) for f in filled] if filled is not None else [False] * n

    if strategy in ("hsstar", "hsstar_adaptive"):
        targets = validate_levels(target_levels, name="target_levels")
        eligible = [d.level in targets for d in difficulties]
        if strategy == "hsstar_adaptive":
            eligible = [ok and not f for ok, f in zip(eligible, full)]
            if not any(eligible) and not all(full):  # no open target left: whoever may still yield rows
                eligible = [not f for f in full]
    elif strategy == "knapsack":
        rates = [0.5 if d.phi_a is None else d.phi_a for d in difficulties]
        eligible = [0.0 < p < 1.0 for p in rates]
        if any(eligible) and remaining > 0:
            return Allocation(
                num_presamples, _spread_knapsack(remaining, rates, eligible, num_presamples), eligible
            )
    elif strategy == "uniform":
        eligible = [True] * n
    elif strategy == "band":
        low, high = band
        if not low < high:
            raise ValueError(f"`band` must satisfy low < high, got {band!r}.")
        eligible = [d.phi_a is not None and low < d.phi_a < high for d in difficulties]
    else:  # prop2diff
        fail_rates = [1.0 if d.phi_a is None else 1.0 - d.phi_a for d in difficulties]
        eligible = [f > 0 for f in fail_rates]
        if any(eligible) and remaining > 0:
            counts = _spread_proportionally(remaining, fail_rates, rng)
            return Allocation(num_presamples, counts, eligible, fell_back=False)

    indices = [i for i, ok in enumerate(eligible) if ok]
    fell_back = not indices and n > 0 and remaining > 0
    if fell_back:
        indices = list(range(n))
    counts = _spread_evenly(remaining, indices, n, rng)
    return Allocation(num_presamples, counts, eligible, fell_back=fell_back)


# -- online: the prompts of one GRPO generation round


def draw_prompts(
    levels: Sequence[Level | None],
    k: int,
    rng: random.Random,
    *,
    reprobe_rate: float = 0.1,
    presample: bool = True,
) -> list[int]:
    """The ``k`` distinct prompts of one generation round of online HS-STaR, each to get one group of rollouts.

    Every round generates the same number of rollouts (``k`` groups), so the budget is exact; what moves is who
    gets them. ``levels[i]`` is prompt i's level from its latest group, ``None`` if it was never rolled out. A
    boundary prompt is drawn with weight 1 and an easy or hard one with weight ``reprobe_rate`` (the chance to
    notice that it changed level). Under ``presample`` every prompt never rolled out comes first: the first pass
    over the data is the pre-sampling; otherwise such a prompt weighs as boundary. Weighted sampling without
    replacement (Efraimidis-Spirakis keys ``u ** (1 / w)``); a prompt of weight 0 is drawn only to fill a round.

    Example:
        >>> E, B = Level.EASY, Level.BOUNDARY
        >>> sorted(draw_prompts([E, B, None, B, E], 3, random.Random(0), reprobe_rate=0.0))
        [1, 2, 3]
    """
    check_int(k, "k")
    if k > len(levels):
        raise ValueError(
            f"a round needs {k} distinct prompts but the dataset has {len(levels)}: add prompts."
        )
    if not 0.0 <= reprobe_rate <= 1.0:
        raise ValueError(f"`reprobe_rate` must lie in [0, 1], got {reprobe_rate!r}.")

    def key(level: Level | None) -> float:
        u = rng.random()
        if level is None and presample:
            return 2.0 + u  # above every weighted key (they lie in [0, 1))
        weight = 1.0 if level in (None, Level.BOUNDARY) else reprobe_rate
        return u ** (1.0 / weight) if weight > 0 else u - 1.0  # weight 0: below every weighted key

    keys = [key(level) for level in levels]
    return sorted(heapq.nlargest(k, range(len(levels)), key=keys.__getitem__))
