"""Training-data selection: SFT rows and the release's DPO pairing, on hand-made cases."""

from __future__ import annotations

import random

import pytest

from trl_hsstar.difficulty import Level
from trl_hsstar.selection import ScoredSample, select_dpo_pairs, select_sft_rows


def s(pid: str, text: str, correct: bool, score: float | None) -> ScoredSample:
    return ScoredSample(
        problem_id=pid, prompt=f"Q: {pid}\nA: ", completion=text, correct=correct, score=score
    )


LEVELS = {"p1": Level.BOUNDARY, "p2": Level.EASY, "p3": "hard", "p4": "boundary"}
SAMPLES = [
    s("p1", "a", True, 0.9),
    s("p1", "x", False, 0.1),
    s("p1", "b", True, 0.2),
    s("p2", "e", True, 0.99),  # easy: never trained on
    s("p1", "c", True, 0.5),
    s("p1", "y", False, 0.7),
    s("p3", "h", False, 0.0),  # hard: never trained on
    s("p1", "c", True, 0.5),  # exact duplicate of "c"
    s("p4", "u", True, None),  # unscored: ranks after scored ones
    s("p4", "v", True, 0.3),
]


def test_sft_rows_rank_dedupe_and_filter_levels():
    rows = select_sft_rows(SAMPLES, LEVELS)
    assert [(r["problem_id"], r["completion"], r["rank"]) for r in rows] == [
        ("p1", "a", 0),
        ("p1", "c", 1),
        ("p1", "b", 2),
        ("p4", "v", 0),
        ("p4", "u", 1),
    ]
    assert rows[0]["prompt"] == "Q: p1\nA: " and rows[0]["score"] == 0.9


def test_sft_rows_cap_per_problem_keeps_the_best():
    rows = select_sft_rows(SAMPLES, LEVELS, max_rows_per_problem=2)
    assert [r["completion"] for r in rows] == ["a", "c", "v", "u"]


def test_sft_rows_without_levels_is_plain_rft():
    rows = select_sft_rows(SAMPLES, None)
    assert {r["problem_id"] for r in rows} == {"p1", "p2", "p4"}  # p3 has no correct response


def test_sft_rows_other_levels_and_missing_problems():
    assert [r["completion"] for r in select_sft_rows(SAMPLES, LEVELS, train_levels=["easy"])] == ["e"]
    assert select_sft_rows(SAMPLES, {"p9": Level.BOUNDARY}) == []  # unknown problems are not eligible


@pytest.mark.parametrize("cap", [0, -1, 1.5, True])
def test_sft_bad_cap(cap):
    with pytest.raises(ValueError, match="max_rows_per_problem"):
        select_sft_rows(SAMPLES, LEVELS, max_rows_per_problem=cap)


def test_dpo_pairs_worked_by_hand():
    """p1 has correct a(0.9), b(0.2), c(0.5), c(0.5) and incorrect x(0.1), y(0.7).

    By hand, following the release:
      chosen sorted by score desc   = [a, c, c, b]   (the two c tie and keep their order)
      rejected sorted by score desc = [y, x]
      K = min(4, 2) = 2 -> chosen [a, c], rejected [y, x]; b and the second c are dropped.
      Each list is shuffled and zipped: 2 pairs using exactly {a, c} and {y, x}.
    p2 (easy), p3 (hard) are not boundary; p4 is boundary but has no incorrect response -> no pair.
    """
    pairs = select_dpo_pairs(SAMPLES, LEVELS, seed=1234)
    assert len(pairs) == 2
    assert {p["problem_id"] for p in pairs} == {"p1"}
    assert sorted(p["chosen"] for p in pairs) == ["a", "c"]
    assert sorted(p["rejected"] for p in pairs) == ["x", "y"]
    assert all(p["prompt"] == "Q: p1\nA: " for p in pairs)
    score = {"a": 0.9, "c": 0.5, "x": 0.1, "y": 0.7}
    assert all(
        p["chosen_score"] == score[p["chosen"]] and p["rejected_score"] == score[p["rejected"]] for p in pairs
    )


def test_dpo_random_stream_matches_the_release_procedure():
    """One seeded stream: shuffle chosen, shuffle rejected (per problem, in order), then all pairs."""
    samples = [s("q1", f"c{i}", True, 1 - i / 10) for i in range(5)] + [
        s("q1", f"w{i}", False, 0.5) for i in range(4)
    ]
    samples += [s("q2", f"C{i}", True, 0.5) for i in range(3)] + [
        s("q2", f"W{i}", False, 1 - i / 10) for i in range(3)
    ]
    pairs = select_dpo_pairs(samples, None, seed=99)

    rng = random.Random(99)
    expected = []
    for chosen, rejected in (
        (["c0", "c1", "c2", "c3"], ["w0", "w1", "w2", "w3"]),  # K = 4: c4 (lowest score) dropped
        (["C0", "C1", "C2"], ["W0", "W1", "W2"]),  # K = 3
    ):
        rng.shuffle(chosen)
        rng.shuffle(rejected)
        expected += list(zip(chosen, rejected))
    rng.shuffle(expected)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == expected


def test_dpo_is_seeded():
    a = select_dpo_pairs(SAMPLES * 3, None, seed=1)
    assert a == select_dpo_pairs(SAMPLES * 3, None, seed=1)
    assert any(select_dpo_pairs(SAMPLES * 3, None, seed=k) != a for k in range(2, 10))


def test_dpo_cap():
    samples = [s("q", f"c{i}", True, 0.5) for i in range(5)] + [s("q", f"w{i}", False, 0.5) for i in range(5)]
    assert len(select_dpo_pairs(samples, None)) == 5
    assert len(select_dpo_pairs(samples, None, max_pairs_per_problem=2)) == 2


def test_conversational_completions_pass_through():
    msgs = [{"role": "assistant", "content": "1+1=2\n\nThe answer is \\boxed{2}."}]
    rows = select_sft_rows(
        [ScoredSample("p", [{"role": "user", "content": "1+1"}], msgs, True, 0.9)] * 2, None
    )
    assert len(rows) == 1 and rows[0]["completion"] == msgs
