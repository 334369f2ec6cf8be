"""The paper's difficulty rule (classify_diff.py of the release), its ablations and edge cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trl_hsstar.difficulty import (
    PUBLISHED_THRESHOLDS,
    Difficulty,
    Level,
    calibrate_thresholds,
    count_levels,
    estimate_difficulty,
    lookup_thresholds,
    validate_thresholds,
)

TAU = (0.25, 0.50)  # the released pair for Skywork-o1-Open-PRM-Qwen-2.5-1.5B


def level(correct, scores, estimator="hsstar", thresholds=TAU):
    return estimate_difficulty(correct, scores, estimator=estimator, thresholds=thresholds).level


@pytest.mark.parametrize(
    ("correct", "scores", "expected"),
    [
        # always right, PRM confident -> easy
        ([True, True, True], [0.9, 0.8, 0.7], Level.EASY),
        # always right but PRM mean 0.4 <= tau_h: right for the wrong reasons -> boundary, not easy
        ([True, True, True], [0.9, 0.2, 0.1], Level.BOUNDARY),
        # phi_r exactly tau_h: the rule is strict (phi_r > tau_h) -> boundary
        ([True, True], [0.5, 0.5], Level.BOUNDARY),
        # never right, PRM sure it is bad -> hard
        ([False, False, False], [0.1, 0.2, 0.0], Level.HARD),
        # never right but PRM mean 0.3 >= tau_l: near misses -> boundary
        ([False, False, False], [0.1, 0.3, 0.5], Level.BOUNDARY),
        # phi_r exactly tau_l: strict (phi_r < tau_l) -> boundary
        ([False, False], [0.25, 0.25], Level.BOUNDARY),
        # mixed accuracy is boundary whatever the PRM says
        ([True, False, False], [0.99, 0.99, 0.99], Level.BOUNDARY),
        ([True, True, False], [0.0, 0.0, 0.0], Level.BOUNDARY),
    ],
)
def test_paper_rule_hand_cases(correct, scores, expected):
    assert level(correct, scores) is expected


def test_statistics_are_the_means():
    d = estimate_difficulty([True, False, True, True], [0.2, 0.4, 0.6, 0.8], thresholds=TAU)
    assert d.phi_a == pytest.approx(0.75)
    assert d.phi_r == pytest.approx(0.5)
    assert (d.num_samples, d.num_correct, d.num_scored) == (4, 3, 4)


def test_accuracy_only_ablation_ignores_scores_and_thresholds():
    assert level([True, True, True], [0.0, 0.0, 0.0], "accuracy", None) is Level.EASY
    assert level([False, False], None, "accuracy", None) is Level.HARD
    assert level([True, False], None, "accuracy", None) is Level.BOUNDARY


def test_reward_only_ablation_ignores_accuracy():
    assert level([False, False, False], [0.9, 0.8, 0.7], "reward") is Level.EASY
    assert level([True, True, True], [0.1, 0.1, 0.1], "reward") is Level.HARD
    assert level([True, False], [0.3, 0.4], "reward") is Level.BOUNDARY


def test_missing_scores_are_left_out_of_phi_r():
    d = estimate_difficulty([True, True, True], [0.9, None, 0.7], thresholds=TAU)
    assert d.phi_r == pytest.approx(0.8)
    assert d.num_scored == 2
    assert d.level is Level.EASY


@pytest.mark.parametrize("estimator", ["hsstar", "reward"])
def test_no_score_at_all_keeps_the_problem_in_play(estimator):
    for correct in ([True, True], [False, False]):
        d = estimate_difficulty(correct, [None, None], estimator=estimator, thresholds=TAU)
        assert d.phi_r is None
        assert d.level is Level.BOUNDARY


@pytest.mark.parametrize("estimator", ["hsstar", "accuracy", "reward"])
def test_no_samples_is_boundary(estimator):
    d = estimate_difficulty([], [], estimator=estimator, thresholds=TAU)
    assert d.phi_a is None and d.phi_r is None
    assert d.level is Level.BOUNDARY


def test_nan_score_is_rejected_with_its_position():
    with pytest.raises(ValueError, match=r"scores\[1\].*NaN"):
        estimate_difficulty([True, True], [0.5, math.nan], thresholds=TAU)


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="one score per response"):
        estimate_difficulty([True, True], [0.5], thresholds=TAU)
    with pytest.raises(ValueError, match=r"correct\[0\]"):
        estimate_difficulty(["yes"], [0.5], thresholds=TAU)
    with pytest.raises(ValueError, match="difficulty_estimator"):
        estimate_difficulty([True], [0.5], estimator="vibes", thresholds=TAU)
    with pytest.raises(ValueError, match=r"reward_thresholds.*required"):
        estimate_difficulty([True], [0.5])


@pytest.mark.parametrize("bad", [(0.5, 0.25), (0.5, 0.5), (-0.1, 0.5), (0.2, 1.5), ("a", "b"), (0.1,)])
def test_thresholds_must_be_ordered_and_in_unit_interval(bad):
    with pytest.raises(ValueError, match="reward_thresholds"):
        validate_thresholds(bad)


def test_published_thresholds_match_the_release():
    assert PUBLISHED_THRESHOLDS == {
        "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-7B": (0.15, 0.65),
        "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B": (0.25, 0.50),
        "Qwen/Qwen2.5-Math-PRM-7B": (0.55, 0.99),
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen/Qwen2.5-Math-PRM-7B", (0.55, 0.99)),
        ("qwen2.5-math-prm-7b", (0.55, 0.99)),
        ("/models/Skywork-o1-Open-PRM-Qwen-2.5-7B/", (0.15, 0.65)),
        ("Skywork-o1-Open-PRM-Qwen-2.5-1.5B", (0.25, 0.50)),
        ("Qwen/Qwen2.5-Math-PRM-72B", None),
        ("my-org/tiny-prm", None),
        (None, None),
    ],
)
def test_lookup_thresholds(name, expected):
    assert lookup_thresholds(name) == expected


def test_roundtrip_and_counts():
    d = estimate_difficulty([True, False], [0.5, None], thresholds=TAU)
    assert Difficulty.from_dict(d.to_dict()) == d
    assert count_levels([Level.EASY, "hard", d]) == {"easy": 1, "boundary": 1, "hard": 1}


@given(
    st.lists(st.tuples(st.booleans(), st.one_of(st.none(), st.floats(0, 1))), max_size=12),
    st.sampled_from(["hsstar", "accuracy", "reward"]),
)
def test_levels_follow_the_definitions(samples, estimator):
    correct = [c for c, _ in samples]
    scores = [s for _, s in samples]
    d = estimate_difficulty(correct, scores, estimator=estimator, thresholds=TAU)
    if d.level is Level.EASY:
        assert estimator == "reward" or d.phi_a == 1.0
        assert estimator == "accuracy" or d.phi_r > TAU[1]
    if d.level is Level.HARD:
        assert estimator == "reward" or d.phi_a == 0.0
        assert estimator == "accuracy" or d.phi_r < TAU[0]
    # the combined rule is stricter than each ablation: easy/hard under hsstar implies it under both
    if estimator == "hsstar" and d.level is not Level.BOUNDARY:
        assert level(correct, scores, "accuracy") is d.level
        assert level(correct, scores, "reward") is d.level


def _stat(phi_a: float, phi_r: float | None) -> Difficulty:
    return Difficulty(Level.BOUNDARY, phi_a, phi_r, 4, round(4 * phi_a), 0 if phi_r is None else 4)


def test_calibrated_thresholds_worked_by_hand():
    """Right every time: phi_r 0.6 0.7 0.8 0.9 1.0, lower quartile at position 0.25 * 4 = 1 -> 0.7, so tau_h =
    0.7 - 1e-6. Wrong every time: 0.1 0.2 0.3, upper quartile at position 0.75 * 2 = 1.5 -> 0.25, so tau_l =
    0.25 + 1e-6. Mixed and unscored problems do not count."""
    stats = [_stat(1, r) for r in (0.9, 0.6, 0.8, 0.7, 1.0)] + [_stat(0, r) for r in (0.1, 0.3, 0.2)]
    stats += [_stat(0.5, 0.0), _stat(1, None), _stat(0, None)]
    tau = calibrate_thresholds(stats)
    assert tau == (0.250001, 0.699999)
    # under the paper's rule: 4 of 5 always-right problems are easy (0.6 stays), 2 of 3 always-wrong are hard
    levels = [estimate_difficulty([s.phi_a == 1] * 4, [s.phi_r] * 4, thresholds=tau).level for s in stats[:8]]
    assert levels[:5].count(Level.EASY) == 4 and levels[1] is Level.BOUNDARY
    assert levels[5:] == [Level.HARD, Level.BOUNDARY, Level.HARD]


def test_calibration_with_a_saturated_reward_model_still_calls_problems_easy():
    """Min step rewards of 1.0 for most always-right problems: the ties at the cut are easy, not lost to '>'."""
    tau_l, tau_h = calibrate_thresholds([_stat(1, 1.0)] * 6 + [_stat(1, 0.4), _stat(0, 0.05)])
    assert (
        tau_h < 1.0
        and estimate_difficulty([True] * 3, [1.0] * 3, thresholds=(tau_l, tau_h)).level is Level.EASY
    )


def test_calibration_without_one_group_and_when_the_groups_cross():
    assert calibrate_thresholds([_stat(0, 0.2)]) == (0.200001, 1.0)  # nobody always right: nothing easy
    assert calibrate_thresholds([_stat(1, 0.8)]) == (0.0, 0.799999)
    with pytest.raises(ValueError, match="does not separate"):
        calibrate_thresholds([_stat(1, 0.3), _stat(0, 0.6)])
    with pytest.raises(ValueError, match="`quantile` must lie"):
        calibrate_thresholds([], quantile=0.5)
