"""Toy arithmetic problems, their rationales, and an exact step checker.

This module is pure Python (stdlib only): importing it never pulls in torch, transformers or tokenizers.

A problem is a chain of integer additions/subtractions, e.g. ``12+7+35``: a sum of signed terms
(``5-3+2`` is ``5 + (-3) + 2``). A rationale combines two of the terms it still holds per step, one step per
blank-line-separated paragraph, and ends with the final answer in ``\\boxed{}``. Terms may be combined in any
order and grouping, so a problem of k terms has many fully correct rationales; the reference works left to
right, and :meth:`ArithmeticProblem.rationale` draws another path at random when given a ``random.Random``::

    12+7=19                 35+12=47

    19+35=54                47+7=54

    The answer is \\boxed{54}.   The answer is \\boxed{54}.

``label_steps`` checks every step of any completion against the terms still open at that point. It gives the
exact per-step correctness labels that a process reward model (PRM) is trained to predict.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from ..checks import check_int

STEP_SEPARATOR = "\n\n"
"""Separates the steps of a rationale (a blank line)."""

VALID_OPS = "+-"

_EXPRESSION_RE = re.compile(r"\s*(\d+)\s*((?:[+-]\s*\d+\s*)+)")
_OPERAND_RE = re.compile(r"([+-])\s*(\d+)")
_STEP_RE = re.compile(r"(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)")
_ANSWER_RE = re.compile(r"The\s+answer\s+is\s*\\boxed\s*\{\s*(-?\d+)\s*\}\s*\.?")


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


@dataclass(frozen=True)
class ArithmeticProblem:
    """``operands[0] ops[0] operands[1] ops[1] ...``, evaluated left to right.

    Operands are non-negative integers and every op is ``"+"`` or ``"-"`` (so the expression string
    parses back unambiguously); intermediate values and the answer may be negative.
    """

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        # Accept lists for convenience but store tuples so the dataclass stays hashable.
        object.__setattr__(self, "operands", tuple(self.operands))
        object.__setattr__(self, "ops", tuple(self.ops))
        if len(self.operands) < 2:
            raise ValueError(f"operands: need at least 2 operands, got {len(self.operands)}")
        for x in self.operands:
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ValueError(f"operands: every operand must be a non-negative int, got {x!r}")
        if len(self.ops) != len(self.operands) - 1:
            raise ValueError(
                f"ops: need len(ops) == len(operands) - 1 == {len(self.operands) - 1}, got {len(self.ops)}"
            )
        for op in self.ops:
            if op not in ("+", "-"):
                raise ValueError(f"ops: every op must be '+' or '-', got {op!r}")

    @classmethod
    def from_expression(cls, expression: str) -> ArithmeticProblem:
        """Parse ``"12+7-35"`` (whitespace tolerated) back into a problem."""
        if not isinstance(expression, str):
            raise ValueError(f"expression must be a str, got {type(expression).__name__}")
        m = _EXPRESSION_RE.fullmatch(expression)
        if m is None:
            raise ValueError(
                f"cannot parse {expression!r} as an arithmetic expression like '12+7-35' "
                "(non-negative integers joined by '+' or '-')"
            )
        pairs = _OPERAND_RE.findall(m.group(2))
        operands = (int(m.group(1)), *(int(b) for _, b in pairs))
        return cls(operands=operands, ops=tuple(op for op, _ in pairs))

    @property
    def expression(self) -> str:
        """The problem as a compact string, e.g. ``"12+7+35"``."""
        parts = [str(self.operands[0])]
        for op, b in zip(self.ops, self.operands[1:], strict=True):
            parts.append(f"{op}{b}")
        return "".join(parts)

    @property
    def id(self) -> str:
        """A readable id, unique by content (it is the expression)."""
        return self.expression

    @property
    def prompt(self) -> str:
        return f"Q: {self.expression}\nA: "

    @property
    def answer(self) -> int:
        value = self.operands[0]
        for op, b in zip(self.ops, self.operands[1:], strict=True):
            value = _apply(value, op, b)
        return value

    @property
    def num_operands(self) -> int:
        return len(self.operands)

    @property
    def digits(self) -> int:
        """The largest number of digits among the operands."""
        return max(len(str(x)) for x in self.operands)

    def reference_steps(self) -> list[tuple[int, str, int, int]]:
        """``(running value, op, operand, result)`` for every arithmetic step."""
        steps = []
        value = self.operands[0]
        for op, b in zip(self.ops, self.operands[1:], strict=True):
            result = _apply(value, op, b)
            steps.append((value, op, b, result))
            value = result
        return steps

    def steps(self) -> list[str]:
        """The arithmetic steps as text, e.g. ``["12+7=19", "19+35=54"]``."""
        return [f"{a}{op}{b}={r}" for a, op, b, r in self.reference_steps()]

    @property
    def terms(self) -> tuple[int, ...]:
        """The signed terms whose sum is the answer: ``5-3+2`` -> ``(5, -3, 2)``."""
        return (self.operands[0], *(b if op == "+" else -b for op, b in zip(self.ops, self.operands[1:])))

    def rationale(self, rng: random.Random | None = None) -> str:
        """A fully correct solution: steps, then ``The answer is \\boxed{N}.``, joined by blank lines.

        Without ``rng`` the reference, left to right. With it, one of the problem's ``2**(k-1)`` run paths, drawn
        at random: start at any term and grow a running total over a contiguous run of terms, one neighbour per
        step, to the left or to the right (``3+5+1``: ``5+1=6``, ``6+3=9``). The step checker accepts every path
        (any order, any grouping); M_0 is taught these because a run is easy for a small model to keep track of.
        """
        if rng is None:
            steps = self.steps()
        else:
            terms = self.terms
            lo = hi = rng.randrange(len(terms))
            value, steps = terms[lo], []
            while lo > 0 or hi < len(terms) - 1:
                if lo > 0 and (hi == len(terms) - 1 or rng.random() < 0.5):
                    lo -= 1
                    t = terms[lo]
                else:
                    hi += 1
                    t = terms[hi]
                steps.append(f"{value}+{t}={value + t}" if t >= 0 else f"{value}-{-t}={value + t}")
                value += t
        return STEP_SEPARATOR.join([*steps, f"The answer is \\boxed{{{self.answer}}}."])

    def to_row(self) -> dict[str, object]:
        """One dataset row: ``id``, ``prompt``, ``answer`` (a str), ``solution``, ``num_operands``, ``digits``."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "answer": str(self.answer),
            "solution": self.rationale(),
            "num_operands": self.num_operands,
            "digits": self.digits,
        }


# ----------------------------------------------------------------------------------------------------
# Problem generation


def _as_range(value: int | Sequence[int], name: str, minimum: int) -> tuple[int, int]:
    """Normalise an int or an inclusive ``(low, high)`` pair, checking ``minimum <= low <= high``."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        low, high = value
    else:
        raise ValueError(f"{name} must be an int or an inclusive (low, high) pair of ints, got {value!r}")
    if low > high:
        raise ValueError(f"{name}: low must be <= high, got {value!r}")
    if low < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return low, high


def _digit_range(d: int) -> range:
    """All operands with exactly ``d`` digits (1 digit includes 0)."""
    return range(10) if d == 1 else range(10 ** (d - 1), 10**d)


class _Cell:
    """All problems with ``k`` operands of ``d`` digits: sampled by rejection, or from an explicit
    pool once more than half of the cell is blocked (excluded or already used), so generation always
    terminates in time proportional to the number of problems drawn."""

    def __init__(self, k: int, d: int, ops: str, excluded: set[str]):
        self.k, self.d, self.ops = k, d, ops
        self.values = _digit_range(d)
        self.size = len(self.values) ** k * len(ops) ** (k - 1)
        self.blocked = set(excluded)  # ids in this cell that may not be drawn
        self.pool: list[ArithmeticProblem] | None = None

    @property
    def available(self) -> int:
        return self.size - len(self.blocked)

    def draw(self, rng: random.Random, unique: bool) -> ArithmeticProblem:
        if self.pool is None and 2 * len(self.blocked) > self.size:
            self.pool = [p for p in self._enumerate() if p.id not in self.blocked]
        if self.pool is not None:
            i = rng.randrange(len(self.pool))
            problem = self.pool[i]
            if unique:  # swap-remove
                self.pool[i] = self.pool[-1]
                self.pool.pop()
        else:
            while True:  # expected < 2 tries since at most half of the cell is blocked
                problem = ArithmeticProblem(
                    operands=tuple(rng.choice(self.values) for _ in range(self.k)),
                    ops=tuple(rng.choice(self.ops) for _ in range(self.k - 1)),
                )
                if problem.id not in self.blocked:
                    break
        if unique:
            self.blocked.add(problem.id)
        return problem

    def _enumerate(self) -> Iterable[ArithmeticProblem]:
        for operands in itertools.product(self.values, repeat=self.k):
            for ops in itertools.product(self.ops, repeat=self.k - 1):
                yield ArithmeticProblem(operands=operands, ops=ops)


def generate_problems(
    n: int,
    *,
    operands: int | tuple[int, int] = (2, 4),
    digits: int | tuple[int, int] = 1,
    ops: str = "+",
    seed: int = 0,
    unique: bool = True,
    exclude: Iterable[str | ArithmeticProblem] = (),
) -> list[ArithmeticProblem]:
    """Sample ``n`` random problems, deterministically for a given set of arguments.

    Args:
        n: number of problems.
        operands: number of operands per problem, an int or an inclusive ``(low, high)`` range sampled
            uniformly per problem (>= 2).
        digits: digits of every operand of a problem, an int or an inclusive range sampled uniformly per
            problem (>= 1). 1 digit means 0..9, ``d >= 2`` means ``10**(d-1)..10**d - 1``.
        ops: allowed operators, chosen uniformly per position (a non-empty subset of ``"+-"``).
        seed: seed of the ``random.Random`` used.
        unique: drop duplicate expressions.
        exclude: ids (expressions) or problems that must not be generated, e.g. the held-out problems.

    Raises:
        ValueError: on invalid arguments, or when fewer than ``n`` distinct problems exist (``unique``).
    """
    check_int(n, "n", minimum=0)
    k_low, k_high = _as_range(operands, "operands", 2)
    d_low, d_high = _as_range(digits, "digits", 1)
    if not isinstance(ops, str) or not ops or not set(ops) <= set(VALID_OPS):
        raise ValueError(f"ops must be a non-empty string of operators from {VALID_OPS!r}, got {ops!r}")
    ops = "".join(dict.fromkeys(ops))  # de-duplicate, keep order

    if isinstance(exclude, str):
        raise ValueError("exclude must be an iterable of problem ids, not a single str")
    excluded = {p.id if isinstance(p, ArithmeticProblem) else p for p in exclude}
    cell_excluded: dict[tuple[int, int], set[str]] = {}
    for pid in excluded:  # sort each excluded id into the cell it belongs to (if any)
        try:
            p = ArithmeticProblem.from_expression(pid)
        except ValueError:
            continue
        if p.expression != pid or not set(p.ops) <= set(ops) or not k_low <= p.num_operands <= k_high:
            continue
        lengths = {len(str(x)) for x in p.operands}
        if len(lengths) == 1 and d_low <= (d := lengths.pop()) <= d_high:
            cell_excluded.setdefault((p.num_operands, d), set()).add(pid)

    cells = [
        _Cell(k, d, ops, cell_excluded.get((k, d), set()))
        for k in range(k_low, k_high + 1)
        for d in range(d_low, d_high + 1)
    ]
    total = sum(c.size for c in cells)
    available = sum(c.available for c in cells)
    if n > 0 and (available == 0 or (unique and available < n)):
        note = f" ({total - available} of them excluded)" if available < total else ""
        raise ValueError(
            f"cannot generate n={n} unique problems: only {available} distinct problems are available with "
            f"operands={operands!r}, digits={digits!r}, ops={ops!r}{note}. "
            "Increase `digits` or `operands`, allow more `ops`, lower `n`, or pass unique=False."
        )

    rng = random.Random(seed)
    live = [c for c in cells if c.available > 0]
    problems = []
    for _ in range(n):
        cell = rng.choice(live)
        problems.append(cell.draw(rng, unique))
        if unique and cell.available == 0:
            live.remove(cell)
    return problems


def problems_to_dataset_dict(problems: Iterable[ArithmeticProblem]) -> dict[str, list]:
    """Columnar form of ``to_row()``, ready for ``datasets.Dataset.from_dict``."""
    columns: dict[str, list] = {
        k: [] for k in ("id", "prompt", "answer", "solution", "num_operands", "digits")
    }
    for p in problems:
        for key, value in p.to_row().items():
            columns[key].append(value)
    return columns


# ----------------------------------------------------------------------------------------------------
# Step checker


def split_steps(completion: str) -> list[str]:
    """Split a completion on blank lines into stripped, non-empty steps (``[]`` for a non-str)."""
    if not isinstance(completion, str):
        return []
    return [s for s in (part.strip() for part in completion.split(STEP_SEPARATOR)) if s]


_MAX_DIGITS = 40
"""Longer numbers never occur in a step of the world's problems: they are wrong without ``int()`` (linear time)."""


@lru_cache(maxsize=4096)
def _reference(expression: str) -> tuple[tuple[int, ...], int]:
    p = ArithmeticProblem.from_expression(expression)
    return p.terms, p.answer


def _walk(expression: str, completion: str) -> tuple[list[bool], bool]:
    """The labels of ``label_steps`` and whether the completion is a fully correct rationale."""
    terms, answer = _reference(expression)
    open_terms = Counter(terms)  # the multiset of values a step may still combine
    left = len(terms)
    labels: list[bool] = []
    answered = solved = False
    for step in split_steps(completion):
        if answered:  # nothing may follow the answer
            labels.append(False)
            continue
        m = _ANSWER_RE.fullmatch(step)
        if m is not None:
            answered = True
            solved = left == 1 and len(m.group(1)) <= _MAX_DIGITS and int(m.group(1)) == answer
            labels.append(solved)
            continue
        m = _STEP_RE.fullmatch(step)
        if m is None or max(len(g) for g in m.groups()) > _MAX_DIGITS:
            labels.append(False)
            continue
        a, b, r = int(m.group(1)), int(m.group(3)), int(m.group(4))
        b = b if m.group(2) == "+" else -b
        if open_terms[a] >= 1 + (a == b) and open_terms[b] >= 1:
            # two open terms combined: the step is right iff its result is; the true sum stays open either way,
            # so an error carried forward is wrong and a step back on the true value is right again
            open_terms[a] -= 1
            open_terms[b] -= 1
            open_terms[a + b] += 1
            left -= 1
            labels.append(a + b == r)
        else:
            labels.append(False)
    return labels, solved and all(labels)


def label_steps(problem: ArithmeticProblem | str, completion: str) -> list[bool]:
    """One correctness label per step of ``split_steps(completion)``.

    A step ``a OP b = r`` is True iff ``a`` and ``b`` (read as the signed term ``-b`` after ``-``) are terms still
    open (operands of the problem, or true results of earlier steps, each used once) and ``r`` is their sum.
    Combining two open terms leaves their true sum open even when ``r`` is wrong, so an error carried forward
    makes later steps False while a step back on the true value is True again. ``The answer is \\boxed{N}``
    (optional period) is True iff exactly one term is left and N is the answer; anything after it, and anything
    that does not parse, is False. Every order and grouping of the terms is accepted. Never raises on a bad
    completion; runs in linear time.
    """
    expression = problem.expression if isinstance(problem, ArithmeticProblem) else problem
    return _walk(expression, completion)[0]


def is_rationale_correct(problem: ArithmeticProblem | str, completion: str) -> bool:
    """True iff every step is correct and the completion ends on the correct answer step."""
    expression = problem.expression if isinstance(problem, ArithmeticProblem) else problem
    return isinstance(completion, str) and _walk(expression, completion)[1]


def first_error_step(problem: ArithmeticProblem | str, completion: str) -> int | None:
    """Index of the first False step, or None when no step is wrong (the completion may be incomplete)."""
    for i, ok in enumerate(label_steps(problem, completion)):
        if not ok:
            return i
    return None
