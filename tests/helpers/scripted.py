"""A scripted sampler for the golden-record test: the same completions on every CPU, no model involved.

Each toy problem has a fixed skill p in {0, 1/4, 1/2, 3/4, 1} (from a hash of its expression). Sample ``i`` of a
request seeded with ``seed`` draws from its own stream, keyed like :func:`trl_hsstar.sampling.request_seed`: with
probability p a correct rationale (one of the problem's many run paths; one in five of them has a wrong middle
step but the right answer, so S(r) ranks them), otherwise a rationale whose boxed answer is off by one. It mirrors
the :class:`~trl_hsstar.sampling.Sampler` API exactly, so the loop cannot tell it from a model.
"""

from __future__ import annotations

import random
import re
import time
import zlib

from trl_hsstar.sampling import Completion, Sampler, validate_request
from trl_hsstar.toy import ArithmeticProblem
from trl_hsstar.toy.oracle import expression_from_prompt

SKILLS = (0.0, 0.25, 0.5, 0.75, 1.0)


class ScriptedSampler(Sampler):
    name = "scripted"

    def generate(self, prompts, num_samples, params):
        validate_request(prompts, num_samples, params)
        if params.seed is None:
            raise ValueError("the scripted sampler needs a seeded request")
        start = time.monotonic()
        out = []
        for i, (prompt, n) in enumerate(zip(prompts, num_samples)):
            expression = expression_from_prompt(prompt)
            problem = ArithmeticProblem.from_expression(expression)
            skill = SKILLS[zlib.crc32(expression.encode()) % len(SKILLS)]
            texts = []
            for j in range(n):
                rng = random.Random(zlib.crc32(f"{params.seed}:{i}:{expression}".encode()) + j)
                text = problem.rationale(rng)
                if rng.random() < skill:
                    if rng.random() < 0.2 and text.count("\n\n") >= 2:  # a wrong step, the right answer
                        first, rest = text.split("\n\n", 1)
                        first = re.sub(r"=(-?\d+)$", lambda m: f"={int(m.group(1)) + 10}", first)
                        text = first + "\n\n" + rest
                else:
                    text = re.sub(r"\\boxed\{(-?\d+)\}", lambda m: f"\\boxed{{{int(m.group(1)) + 1}}}", text)
                texts.append(text)
            out.append([Completion(t, len(t), "stop") for t in texts])
        self._record(out, time.monotonic() - start)
        return out
