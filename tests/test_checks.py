"""The shared argument checks: the field's name in the message, bools and floats refused, None where allowed."""

from __future__ import annotations

import pytest

from trl_hsstar.checks import check_int


@pytest.mark.parametrize("value", [0, -1, True, 1.0, "3", None])
def test_a_positive_integer_is_required(value):
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer, got"):
        check_int(value, "batch_size")


def test_the_minimum_and_none_are_said_in_the_message():
    check_int(0, "num_presamples", minimum=0)
    check_int(None, "max_rows_per_problem", allow_none=True)
    with pytest.raises(ValueError, match=r"`num_presamples` must be a non-negative integer, got -1"):
        check_int(-1, "num_presamples", minimum=0)
    with pytest.raises(ValueError, match=r"`max_rows_per_problem` must be a positive integer or None, got 0"):
        check_int(0, "max_rows_per_problem", allow_none=True)
    with pytest.raises(ValueError, match=r"an integer >= 2"):
        check_int(1, "num_labels", minimum=2)
