"""The toy world's step checker as a reward source."""

from __future__ import annotations

import pytest

from trl_hsstar.toy import ArithmeticProblem
from trl_hsstar.toy.oracle import OracleStepReward, expression_from_prompt

P = ArithmeticProblem.from_expression("12+7+35")
GOOD = P.rationale()
BAD_FIRST = "12+7=18\n\n19+35=54\n\nThe answer is \\boxed{54}."  # labels [False, True, True]


def test_aggregations():
    prompts = [P.prompt] * 3
    completions = [GOOD, BAD_FIRST, ""]
    assert OracleStepReward()(prompts, completions) == [1.0, 0.0, None]
    assert OracleStepReward("last")(prompts, completions) == [1.0, 1.0, None]
    assert OracleStepReward("prod")(prompts, completions) == [1.0, 0.0, None]
    with pytest.raises(ValueError, match="reward_aggregation"):
        OracleStepReward("mean")


def test_chat_prompts_and_completions():
    prompt = [{"role": "user", "content": P.prompt}]
    completion = [{"role": "assistant", "content": BAD_FIRST}]
    assert OracleStepReward().step_rewards([prompt], [completion]) == [[0.0, 1.0, 1.0]]
    assert expression_from_prompt("no question here") is None
    assert OracleStepReward()(["no question here"], [GOOD]) == [None]
