"""A reward function for the kill-and-resume tests: the toy world's step checker, made slow, that counts its work.

Loaded by ``hsstar train`` as ``reward_funcs: [helpers.slow_reward:slow_oracle]`` (``tests/`` on ``PYTHONPATH``).
Each call sleeps ``HSSTAR_TEST_SCORE_DELAY`` seconds (so a kill can land in the middle of a scoring phase) and
appends the number of completions it scored to the file ``HSSTAR_TEST_SCORE_LOG``.
"""

from __future__ import annotations

import os
import time

from trl_hsstar.toy.oracle import OracleStepReward

_oracle = OracleStepReward()


def slow_oracle(prompts, completions, **columns):
    time.sleep(float(os.environ.get("HSSTAR_TEST_SCORE_DELAY", "0")))
    log = os.environ.get("HSSTAR_TEST_SCORE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{len(completions)}\n")
    return _oracle(prompts, completions, **columns)
