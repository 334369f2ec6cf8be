"""Tests for the pure-Python toy arithmetic world: problems, generation and the step checker."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_hsstar.toy import (
    STEP_SEPARATOR,
    ArithmeticProblem,
    first_error_step,
    generate_problems,
    is_rationale_correct,
    label_steps,
    problems_to_dataset_dict,
    split_steps,
)

P = ArithmeticProblem.from_expression("12+7+35")
REF = "12+7=19\n\n19+35=54\n\nThe answer is \\boxed{54}."


# ---------------------------------------------------------------------------------------------------
# ArithmeticProblem


def test_reference_rationale_is_exact():
    assert P.operands == (12, 7, 35) and P.ops == ("+", "+")
    assert P.expression == P.id == "12+7+35"
    assert P.answer == 54
    assert P.steps() == ["12+7=19", "19+35=54"]
    assert P.rationale() == REF
    assert P.prompt == "Q: 12+7+35\nA: "
    assert P.num_operands == 3 and P.digits == 2


def test_subtraction_with_negative_intermediate():
    p = ArithmeticProblem((3, 5, 10), ("-", "+"))
    assert p.expression == "3-5+10"
    assert p.answer == 8
    assert p.steps() == ["3-5=-2", "-2+10=8"]
    assert p.rationale() == "3-5=-2\n\n-2+10=8\n\nThe answer is \\boxed{8}."
    assert all(label_steps(p, p.rationale()))
    q = ArithmeticProblem((1, 9), ("-",))
    assert q.rationale() == "1-9=-8\n\nThe answer is \\boxed{-8}."
    assert is_rationale_correct(q, q.rationale())


def test_to_row_and_dataset_dict():
    row = P.to_row()
    assert row == {
        "id": "12+7+35",
        "prompt": "Q: 12+7+35\nA: ",
        "answer": "54",
        "solution": REF,
        "num_operands": 3,
        "digits": 2,
    }
    problems = generate_problems(5, seed=3)
    columns = problems_to_dataset_dict(problems)
    assert set(columns) == set(row)
    assert columns["id"] == [p.id for p in problems]
    assert columns["answer"] == [str(p.answer) for p in problems]
    assert problems_to_dataset_dict([]) == {k: [] for k in row}


@pytest.mark.parametrize("expr", ["12+7-35", "0+0", "3-5+10-2", "100-999"])
def test_from_expression_round_trip(expr):
    p = ArithmeticProblem.from_expression(expr)
    assert p.expression == expr
    assert ArithmeticProblem.from_expression(p.expression) == p
    assert ArithmeticProblem.from_expression(" 12 + 7 - 35 ") == ArithmeticProblem((12, 7, 35), ("+", "-"))


@pytest.mark.parametrize("bad", ["", "12", "12+", "+12", "1*2", "a+b", "1+-2", "1++2", "1+2=3"])
def test_from_expression_rejects_garbage(bad):
    with pytest.raises(ValueError):
        ArithmeticProblem.from_expression(bad)


def test_problem_validation_names_the_field():
    with pytest.raises(ValueError, match="operands"):
        ArithmeticProblem((1,), ())
    with pytest.raises(ValueError, match="operands"):
        ArithmeticProblem((1, -2), ("+",))
    with pytest.raises(ValueError, match="ops"):
        ArithmeticProblem((1, 2), ("*",))
    with pytest.raises(ValueError, match="ops"):
        ArithmeticProblem((1, 2, 3), ("+",))


# ---------------------------------------------------------------------------------------------------
# generate_problems


def test_same_seed_same_problems_different_seed_different():
    kwargs = dict(operands=(2, 4), digits=(1, 2), ops="+-")
    a = generate_problems(50, seed=0, **kwargs)
    assert a == generate_problems(50, seed=0, **kwargs)
    assert a != generate_problems(50, seed=1, **kwargs)


def test_knobs_respected():
    problems = generate_problems(400, operands=(2, 3), digits=(1, 2), ops="-", seed=0)
    assert {p.num_operands for p in problems} == {2, 3}
    assert {p.digits for p in problems} == {1, 2}
    for p in problems:
        assert set(p.ops) == {"-"}
        # every operand of a problem has exactly the problem's digit count
        assert {len(str(x)) for x in p.operands} == {p.digits}
    assert 0 in {x for p in problems if p.digits == 1 for x in p.operands}  # 1 digit includes 0

    fixed = generate_problems(50, operands=4, digits=3, seed=0)
    assert all(p.num_operands == 4 and all(100 <= x <= 999 for x in p.operands) for p in fixed)
    both = generate_problems(200, operands=2, digits=2, ops="+-", seed=0)
    assert {op for p in both for op in p.ops} == {"+", "-"}


def test_unique_and_exclude():
    problems = generate_problems(100, operands=2, digits=1, seed=0)  # the whole space of 100
    assert len({p.id for p in problems}) == 100
    held_out = problems[:30]
    fresh = generate_problems(70, operands=2, digits=1, seed=1, exclude=[p.id for p in held_out])
    assert len({p.id for p in fresh}) == 70
    assert not {p.id for p in fresh} & {p.id for p in held_out}
    # problems objects are accepted in exclude too
    assert generate_problems(70, operands=2, digits=1, seed=1, exclude=held_out) == fresh
    # without unique, duplicates are expected in a space of 100 but exclude still holds
    many = generate_problems(300, operands=2, digits=1, unique=False, exclude=[p.id for p in held_out])
    assert len(many) == 300 and len({p.id for p in many}) < 300
    assert not {p.id for p in many} & {p.id for p in held_out}


def test_impossible_uniqueness_raises():
    with pytest.raises(ValueError, match=r"only 100 distinct.*digits"):
        generate_problems(500, operands=2, digits=1)
    with pytest.raises(ValueError, match=r"only 99 distinct.*1 of them excluded"):
        generate_problems(100, operands=2, digits=1, exclude=["3+4"])
    # "-" doubles the space: 2 ops choices * 100 operand pairs
    assert len(generate_problems(200, operands=2, digits=1, ops="+-")) == 200
    assert len(generate_problems(500, operands=2, digits=1, unique=False)) == 500
    assert generate_problems(0, operands=2, digits=1) == []


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(n=-1), "n"),
        (dict(n=1, operands=1), "operands"),
        (dict(n=1, operands=(3, 2)), "operands"),
        (dict(n=1, digits=0), "digits"),
        (dict(n=1, digits=(1, 2, 3)), "digits"),
        (dict(n=1, ops="*"), "ops"),
        (dict(n=1, ops=""), "ops"),
        (dict(n=1, exclude="1+2"), "exclude"),
    ],
)
def test_generate_validates_arguments(kwargs, name):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=name):
        generate_problems(n, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Step checker


def test_split_steps():
    assert split_steps(REF) == ["12+7=19", "19+35=54", "The answer is \\boxed{54}."]
    assert split_steps("\n\n  a \n\n\n\n b\n\n") == ["a", "b"]
    assert split_steps("") == [] and split_steps(None) == [] and split_steps(42) == []


def test_label_reference_all_true():
    assert label_steps(P, REF) == [True, True, True]
    assert label_steps("12+7+35", REF) == [True, True, True]
    assert is_rationale_correct(P, REF)
    assert first_error_step(P, REF) is None
    # whitespace, leading zeros and a missing final period are tolerated
    loose = " 12 + 7 = 19 \n\n19+35=054\n\nThe answer is\\boxed{ 54 }"
    assert label_steps(P, loose) == [True, True, True]


def test_wrong_result_is_carried_forward():
    completion = "12+7=20\n\n20+35=55\n\nThe answer is \\boxed{55}."
    assert label_steps(P, completion) == [False, False, False]
    assert first_error_step(P, completion) == 0
    assert not is_rationale_correct(P, completion)


def test_step_back_on_track_is_true_again():
    # right answer reached through a wrong step: the case an outcome-only check misses and a PRM must catch
    completion = "12+7=20\n\n19+35=54\n\nThe answer is \\boxed{54}."
    labels = label_steps(P, completion)
    assert labels == [False, True, True]
    assert labels[-1] and not all(labels)
    assert first_error_step(P, completion) == 0
    assert not is_rationale_correct(P, completion)


def test_wrong_operand_or_op_is_false():
    assert label_steps(P, "12+8=20") == [False]  # 8 is no term
    assert label_steps(P, "12-7=5") == [False]  # -7 is no term
    assert label_steps(P, "12+12=24") == [False]  # 12 is there once
    assert label_steps(P, "12+7=19\n\n12+35=47") == [True, False]  # 12 is used up


def test_every_order_and_grouping_is_a_correct_rationale():
    q = ArithmeticProblem.from_expression("3+5+1+2")
    paths = [
        "3+5=8\n\n8+1=9\n\n9+2=11",  # left to right
        "2+1=3\n\n3+5=8\n\n8+3=11",  # another order: the 3 made of 2+1, then the operand 3
        "3+5=8\n\n1+2=3\n\n8+3=11",  # pairs first
        "5+3=8\n\n2+8=10\n\n10+1=11",  # operands either side
    ]
    for path in paths:
        completion = path + "\n\nThe answer is \\boxed{11}."
        assert label_steps(q, completion) == [True] * 4, path
        assert is_rationale_correct(q, completion)
    # the right answer through a wrong step: an operand used twice, another skipped
    flawed = "3+5=8\n\n8+5=13\n\n13-2=11\n\nThe answer is \\boxed{11}."
    assert label_steps(q, flawed) == [True, False, False, False] and not is_rationale_correct(q, flawed)
    # stopping early with the right number is wrong: two terms are still open
    assert label_steps(q, "3+5=8\n\n1+2=3\n\nThe answer is \\boxed{11}.") == [True, True, False]
    s = ArithmeticProblem((5, 3, 2), ("-", "+"))  # terms 5, -3, 2
    assert label_steps(s, "-3+2=-1\n\n5-1=4\n\nThe answer is \\boxed{4}.") == [True] * 3
    assert label_steps(s, "3+2=5") == [False]  # +3 is no term


def test_random_rationales_are_correct_and_varied():
    rng = random.Random(0)
    q = ArithmeticProblem.from_expression("1+2+3+4+5")
    drawn = {q.rationale(rng) for _ in range(2000)}
    assert len(drawn) == 2**4  # every run path: a start, then a neighbour to the left or right per step
    assert "3+4=7\n\n7+2=9\n\n9+5=14\n\n14+1=15\n\nThe answer is \\boxed{15}." in drawn
    assert all(is_rationale_correct(q, r) for r in drawn)
    assert q.rationale(random.Random(3)) == q.rationale(random.Random(3))


def test_extra_missing_and_unparseable_steps():
    assert label_steps(P, REF + "\n\nThe answer is \\boxed{54}.") == [True, True, True, False]
    assert not is_rationale_correct(P, REF + "\n\nmore")
    truncated = "12+7=19\n\n19+35=54"
    assert label_steps(P, truncated) == [True, True]
    assert not is_rationale_correct(P, truncated)
    assert first_error_step(P, truncated) is None
    garbage = "12 plus 7 is 19\n\n19+35=54\n\nanswer: 54"
    assert label_steps(P, garbage) == [False, False, False]  # 19 never became a term
    assert label_steps(P, "12+7=19\n\n19+35=54\n\nThe answer is \\boxed{55}.") == [True, True, False]
    assert label_steps(P, "12+7=19\n\nThe answer is \\boxed{54}.") == [True, False]
    assert label_steps(P, "12+7=19 19+35=54") == [False]


def test_degenerate_inputs_never_raise():
    assert label_steps(P, "") == []
    assert label_steps(P, None) == []
    assert label_steps(P, b"12+7=19") == []
    assert not is_rationale_correct(P, None)
    assert first_error_step(P, "") is None
    for junk in ["\\boxed{", "=" * 50, "-", "--1+2=3", "1+1=2=2", "\x00\n\n\udcff"]:
        labels = label_steps(P, junk)
        assert len(labels) == len(split_steps(junk)) and not any(labels)


def test_megabyte_completions():
    # Linear-time regexes and string comparison of integers (no int() of a million digits).
    n = 1_000_000
    assert label_steps(P, "1" * n) == [False]
    assert label_steps(P, "12+" + "7" * n + "=" + "9" * n + "x") == [False]
    assert label_steps(P, "12+7=" + " " * n + "x") == [False]
    assert label_steps(P, "The answer is \\boxed{" + "5" * n) == [False]
    many = label_steps(P, STEP_SEPARATOR.join([*P.steps(), "The answer is \\boxed{54}."] * (n // 40)))
    assert len(many) == 3 * (n // 40)
    assert many[:3] == [True, True, True] and not any(many[3:])


@settings(max_examples=200, deadline=None)
@given(
    operands=st.lists(st.integers(0, 10**6), min_size=2, max_size=8),
    data=st.data(),
)
def test_property_reference_rationale_labels_all_true(operands, data):
    ops = data.draw(st.lists(st.sampled_from("+-"), min_size=len(operands) - 1, max_size=len(operands) - 1))
    p = ArithmeticProblem(tuple(operands), tuple(ops))
    assert ArithmeticProblem.from_expression(p.expression) == p
    rationale = p.rationale()
    assert len(split_steps(rationale)) == len(p.steps()) + 1
    assert label_steps(p, rationale) == [True] * (len(p.steps()) + 1)
    assert is_rationale_correct(p.expression, rationale)
    assert rationale.endswith(f"\\boxed{{{p.answer}}}.")
    drawn = p.rationale(random.Random(data.draw(st.integers(0, 2**32))))
    assert label_steps(p, drawn) == [True] * (len(p.steps()) + 1) and is_rationale_correct(p, drawn)


def test_problems_module_does_not_import_torch():
    code = (
        "import sys, trl_hsstar.toy.problems, trl_hsstar.toy; "
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
