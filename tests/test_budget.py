"""Budget allocation: exact totals for every strategy, property-tested, plus hand cases."""

from __future__ import annotations

from collections import Counter
from itertools import product

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_hsstar.budget import STRATEGIES, allocate, knapsack_value, presamples_for
from trl_hsstar.difficulty import Difficulty, Level


def diff(level: str, phi_a: float | None = None, n: int = 3) -> Difficulty:
    if phi_a is None:
        phi_a = {"easy": 1.0, "hard": 0.0, "boundary": 0.5}[level]
    return Difficulty(Level(level), phi_a, None, n, round(phi_a * n), 0)


# A problem: its level and its pre-sample accuracy, drawn consistently with each other.
problem = st.one_of(
    st.just(diff("easy", 1.0)),
    st.just(diff("hard", 0.0)),
    st.sampled_from([0.0, 1 / 3, 2 / 3, 1.0]).map(lambda a: diff("boundary", a)),  # the PRM can veto
)
budgets = st.tuples(st.integers(1, 16), st.integers(0, 16)).filter(lambda t: t[1] <= t[0])


def eligible_for(strategy: str, problems: list[Difficulty], filled: list[bool]) -> list[bool]:
    if strategy == "hsstar_adaptive":
        open_boundary = [d.level is Level.BOUNDARY and not f for d, f in zip(problems, filled)]
        return open_boundary if any(open_boundary) or all(filled) else [not f for f in filled]
    return [
        {
            "hsstar": d.level is Level.BOUNDARY,
            "uniform": True,
            "prop2diff": d.phi_a is None or d.phi_a < 1.0,
            "band": d.phi_a is not None and 0.0 < d.phi_a < 1.0,
            "knapsack": d.phi_a is not None and 0.0 < d.phi_a < 1.0,
        }[strategy]
        for d in problems
    ]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(problem, st.booleans()), max_size=40),
    st.sampled_from(STRATEGIES),
    budgets,
    st.integers(0, 2**32 - 1),
)
def test_invariants_of_every_strategy(problems_filled, strategy, budget_np, seed):
    problems = [p for p, _ in problems_filled]
    filled = [f for _, f in problems_filled]
    budget, n_p = budget_np
    n_p = presamples_for(strategy, budget, n_p)
    alloc = allocate(problems, strategy=strategy, budget=budget, num_presamples=n_p, seed=seed, filled=filled)

    # total spent == B x N exactly
    assert alloc.total == budget * len(problems)
    assert sum(alloc.per_problem()) == budget * len(problems)
    # no negative counts, one count per problem
    assert len(alloc.resamples) == len(problems)
    assert all(r >= 0 for r in alloc.resamples)
    # only eligible problems receive budget (unless none is eligible: then all share it evenly)
    eligible = eligible_for(strategy, problems, filled)
    assert alloc.eligible == eligible
    if any(eligible):
        assert not alloc.fell_back
        assert all(r == 0 for r, ok in zip(alloc.resamples, eligible) if not ok)
    elif alloc.resamples:
        remaining = (budget - n_p) * len(problems)
        assert alloc.fell_back == (remaining > 0)
        assert max(alloc.resamples) - min(alloc.resamples) <= 1
    # even strategies: eligible problems differ by at most one
    if strategy in ("hsstar", "uniform", "band", "hsstar_adaptive") and any(eligible):
        got = [r for r, ok in zip(alloc.resamples, eligible) if ok]
        assert max(got) - min(got) <= 1
    # same seed, same result
    again = allocate(problems, strategy=strategy, budget=budget, num_presamples=n_p, seed=seed, filled=filled)
    assert again == alloc


def test_uniform_spends_everything_in_presampling():
    assert presamples_for("uniform", 8, 3) == 8
    assert presamples_for("hsstar", 8, 3) == 3
    alloc = allocate([diff("easy"), diff("hard")], strategy="uniform", budget=8, num_presamples=8)
    assert alloc.resamples == [0, 0]
    assert alloc.per_problem() == [8, 8]


def test_uniform_with_fewer_presamples_still_gives_everyone_budget():
    alloc = allocate(
        [diff("easy"), diff("hard"), diff("boundary")], strategy="uniform", budget=8, num_presamples=3
    )
    assert alloc.per_problem() == [8, 8, 8]


def test_hsstar_hand_case_divisible():
    # N = 5, B = 8, n_p = 3: remaining 25 over 1 boundary problem... and over 5 when all boundary
    problems = [diff("easy"), diff("boundary"), diff("hard"), diff("hard"), diff("easy")]
    alloc = allocate(problems, budget=8, num_presamples=3)
    assert alloc.resamples == [0, 25, 0, 0, 0]
    assert alloc.per_problem() == [3, 28, 3, 3, 3]


def test_hsstar_remainder_goes_to_a_seeded_subset():
    # remaining = 5 * 4 = 20 over 3 boundary problems: 6 each, 2 of them get one more
    problems = [diff("boundary"), diff("easy"), diff("boundary"), diff("boundary")]
    alloc = allocate(problems, budget=8, num_presamples=3, seed=7)
    got = [alloc.resamples[i] for i in (0, 2, 3)]
    assert sorted(got) == [6, 7, 7]
    assert alloc.resamples[1] == 0
    # the subset depends on the seed: over many seeds every boundary problem is sometimes the one left out
    left_out = Counter(
        [0, 2, 3][
            [allocate(problems, budget=8, num_presamples=3, seed=s).resamples[i] for i in (0, 2, 3)].index(6)
        ]
        for s in range(60)
    )
    assert set(left_out) == {0, 2, 3}


def test_no_boundary_problem_falls_back_to_uniform():
    problems = [diff("easy"), diff("hard"), diff("hard")]
    alloc = allocate(problems, budget=8, num_presamples=3)
    assert alloc.fell_back
    assert alloc.resamples == [5, 5, 5]
    assert alloc.total == 24


def test_utility_study_targets():
    problems = [diff("easy"), diff("boundary"), diff("hard")]
    for target, index in (("easy", 0), ("boundary", 1), ("hard", 2)):
        alloc = allocate(problems, budget=8, num_presamples=3, target_levels=[target])
        assert alloc.resamples[index] == 15
        assert sum(alloc.resamples) == 15


def test_prop2diff_is_proportional_to_fail_rate():
    # fail rates 0, 1/3, 2/3, 1 -> weights 0:1:2:3 of remaining 5 * 4 = 20 -> quotas 0, 3.33, 6.67, 10
    problems = [diff("easy", 1.0), diff("boundary", 2 / 3), diff("boundary", 1 / 3), diff("hard", 0.0)]
    alloc = allocate(problems, strategy="prop2diff", budget=8, num_presamples=3)
    assert alloc.resamples == [0, 3, 7, 10]


def test_prop2diff_everything_solved_falls_back():
    alloc = allocate([diff("easy", 1.0)] * 4, strategy="prop2diff", budget=8, num_presamples=3)
    assert alloc.fell_back and alloc.resamples == [5, 5, 5, 5]


def test_band_keeps_mixed_accuracy_only():
    problems = [diff("easy", 1.0), diff("boundary", 1.0), diff("boundary", 1 / 3), diff("hard", 0.0)]
    alloc = allocate(problems, strategy="band", budget=8, num_presamples=3)
    assert alloc.resamples == [0, 0, 20, 0]
    alloc = allocate(problems, strategy="band", budget=8, num_presamples=3, band=(0.5, 1.01))
    assert alloc.resamples == [10, 10, 0, 0]


def test_no_presamples_means_everything_is_boundary_and_spread():
    # n_p = 0: no evidence, every problem is boundary (difficulty module), budget spread evenly
    problems = [Difficulty(Level.BOUNDARY, None, None, 0, 0, 0)] * 3
    alloc = allocate(problems, budget=8, num_presamples=0)
    assert alloc.resamples == [8, 8, 8]
    assert allocate(problems, strategy="prop2diff", budget=8, num_presamples=0).resamples == [8, 8, 8]


def test_empty_problem_list():
    alloc = allocate([], budget=8, num_presamples=3)
    assert alloc.resamples == [] and alloc.total == 0 and not alloc.fell_back


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "greedy"}, "allocation"),
        ({"budget": 0}, "sampling_budget"),
        ({"num_presamples": -1}, "num_presamples"),
        ({"budget": 2, "num_presamples": 3}, "exceeds `sampling_budget`"),
        ({"target_levels": ["medium"]}, "target_levels"),
        ({"strategy": "band", "band": (0.8, 0.2)}, "band"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate([diff("boundary")], **kwargs)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_slice_of_the_remainder_is_handed_out_exactly(strategy):
    """``remaining``: one round's slice, for the rounds loop; every strategy spends exactly that much."""
    levels = ["easy", "boundary", "hard", "boundary", "boundary"]
    ds = [
        Difficulty(Level(lv), 0.5 if lv == "boundary" else float(lv == "easy"), None, 3, 0, 0)
        for lv in levels
    ]
    for remaining in (0, 1, 7, 25):
        plan = allocate(ds, strategy=strategy, budget=8, num_presamples=3, remaining=remaining)
        assert sum(plan.resamples) == remaining
    whole = allocate(ds, strategy=strategy, budget=8, num_presamples=3, seed=4)
    assert allocate(ds, strategy=strategy, budget=8, num_presamples=3, seed=4, remaining=25) == whole
    with pytest.raises(ValueError, match="`remaining` must be an integer between 0 and"):
        allocate(ds, strategy=strategy, budget=8, num_presamples=3, remaining=26)


def test_knapsack_value_by_hand():
    """Knapsack RL's value: P(some right and some wrong in n) * p(1-p)^2; no value under two samples."""
    assert knapsack_value(0.5, 3) == pytest.approx((1 - 0.125 - 0.125) * 0.5 * 0.25)
    assert knapsack_value(1 / 3, 2) == pytest.approx((1 - 1 / 9 - 4 / 9) * (1 / 3) * (4 / 9))
    assert knapsack_value(0.0, 8) == knapsack_value(1.0, 8) == 0.0
    assert knapsack_value(0.5, 1) == knapsack_value(0.5, 0) == 0.0


@pytest.mark.parametrize("n_p", [1, 2, 3])
@pytest.mark.parametrize("rates", [(1 / 3, 2 / 3), (0.2, 0.5, 0.9), (0.1, 0.1, 0.6, 1.0)])
def test_knapsack_greedy_is_the_optimum(rates, n_p):
    """The greedy split reaches the best total value over every split of R (checked exhaustively)."""
    ds = [diff("boundary", p) for p in rates]
    remaining = 2 * len(rates) + 1
    alloc = allocate(ds, strategy="knapsack", budget=n_p + 3, num_presamples=n_p, remaining=remaining)
    assert sum(alloc.resamples) == remaining

    def value(split):
        return sum(knapsack_value(p, n_p + r) for p, r in zip(rates, split))

    best = max(
        value(split) for split in product(range(remaining + 1), repeat=len(rates)) if sum(split) == remaining
    )
    assert value(alloc.resamples) == pytest.approx(best)
    assert all(r == 0 for r, p in zip(alloc.resamples, rates) if p in (0.0, 1.0))


def test_knapsack_favours_the_harder_of_two_boundary_problems():
    """p(1-p)^2 peaks at p = 1/3: of pass rates 1/3 and 2/3, the first is worth more samples."""
    alloc = allocate(
        [diff("boundary", 1 / 3), diff("boundary", 2 / 3)], strategy="knapsack", budget=8, num_presamples=3
    )
    assert alloc.resamples[0] > alloc.resamples[1] and sum(alloc.resamples) == 10


def test_adaptive_skips_filled_problems_then_widens():
    ds = [diff("easy"), diff("boundary"), diff("boundary"), diff("hard")]
    kw = dict(strategy="hsstar_adaptive", budget=8, num_presamples=3)
    assert allocate(ds, filled=[False, True, False, False], **kw).resamples == [0, 0, 20, 0]
    # every boundary problem is full: whoever may still yield rows gets the slice
    assert allocate(ds, filled=[False, True, True, False], **kw).resamples == [10, 0, 0, 10]
    everyone = allocate(ds, filled=[True] * 4, **kw)
    assert everyone.fell_back and everyone.resamples == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="`filled` has 2 entries for 4 problems"):
        allocate(ds, filled=[True, False], **kw)


# -- online: draw_prompts, the prompts of one GRPO generation round


def test_draw_prompts_presamples_first_then_favours_the_boundary():
    import random

    from trl_hsstar.budget import draw_prompts

    E, B, H = Level.EASY, Level.BOUNDARY, Level.HARD
    # prompts never rolled out come first, whatever the weights
    assert sorted(draw_prompts([B, None, E, None, H], 2, random.Random(0))) == [1, 3]
    # then a boundary prompt (weight 1) against easy and hard ones (weight reprobe_rate)
    levels = [E] * 10 + [B] * 10 + [H] * 10
    counts = Counter()
    for r in range(500):
        chunk = draw_prompts(levels, 8, random.Random(r), reprobe_rate=0.1)
        assert len(chunk) == len(set(chunk)) == 8  # distinct: one group each, the round's budget exact
        counts.update(levels[i] for i in chunk)
    assert counts[B] > 3 * (counts[E] + counts[H]) / 2
    assert counts[E] > 0 and counts[H] > 0  # re-probed, so a prompt can change level
    # reprobe_rate 0: easy and hard only to fill a round the boundary cannot
    assert all(levels[i] == B for i in draw_prompts(levels, 8, random.Random(1), reprobe_rate=0.0))
    assert sum(levels[i] == B for i in draw_prompts(levels, 12, random.Random(1), reprobe_rate=0.0)) == 10
    # without presample an unseen prompt weighs as a boundary one, no more
    unseen = [None] * 10 + [B] * 10
    picked = Counter()
    for r in range(500):
        picked.update(unseen[i] is None for i in draw_prompts(unseen, 5, random.Random(r), presample=False))
    assert 0.4 < picked[True] / (picked[True] + picked[False]) < 0.6
    # the same generator state, the same round (every process draws the same)
    assert draw_prompts(levels, 8, random.Random(7)) == draw_prompts(levels, 8, random.Random(7))


def test_draw_prompts_bad_values():
    import random

    from trl_hsstar.budget import draw_prompts

    with pytest.raises(ValueError, match="needs 4 distinct prompts but the dataset has 3"):
        draw_prompts([None] * 3, 4, random.Random(0))
    with pytest.raises(ValueError, match="reprobe_rate"):
        draw_prompts([None] * 3, 2, random.Random(0), reprobe_rate=-0.1)
    with pytest.raises(ValueError, match="`k`"):
        draw_prompts([None] * 3, 0, random.Random(0))
