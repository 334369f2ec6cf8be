"""The step checker as a reward source: an oracle process reward model for the toy world.

``OracleStepReward()(prompts, completions)`` returns, per completion, the aggregation (min by default) of the
exact step labels of :func:`~trl_hsstar.toy.problems.label_steps` read as probabilities 1.0 / 0.0. It follows
TRL's reward-function convention, so it plugs in wherever a learned PRM does; use it for ablations and tests.
"""

from __future__ import annotations

import re

from ..rewards import aggregate_step_rewards
from .problems import label_steps

__all__ = ["OracleStepReward", "expression_from_prompt"]

_EXPRESSION = re.compile(r"Q:\s*([0-9+\-\s]+?)\s*\n")


def expression_from_prompt(prompt) -> str | None:
    """The arithmetic expression in a toy prompt (``"Q: 12+7\\nA: "``), or in the last user message."""
    if isinstance(prompt, list):
        prompt = "".join(m.get("content", "") for m in prompt if m.get("role") != "assistant")
    m = _EXPRESSION.search(prompt) if isinstance(prompt, str) else None
    return m.group(1).replace(" ", "") if m else None


class OracleStepReward:
    """Exact step labels of the toy world, aggregated (``"min"``, ``"prod"`` or ``"last"``)."""

    def __init__(self, aggregation: str = "min"):
        aggregate_step_rewards([1.0], aggregation)  # raises on an unknown name
        self.aggregation = aggregation
        self.__name__ = self.name = "oracle_step_reward"

    def step_rewards(self, prompts, completions) -> list[list[float]]:
        out = []
        for prompt, completion in zip(prompts, completions):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            expression = expression_from_prompt(prompt)
            out.append([float(x) for x in label_steps(expression, text)] if expression else [])
        return out

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        return [aggregate_step_rewards(s, self.aggregation) for s in self.step_rewards(prompts, completions)]
