"""The records every phase reads and writes: a problem, a sample, and a problem's statistics after a round.

One key name throughout: a problem is ``problem_id`` everywhere, a sample ``sample_id``. A sample carries its
completion, its verdict and its reward, so no phase re-joins samples with their scores. Each record turns into a
JSON row (``to_row``) and back (``from_row``), which is what the phase store writes.

This module imports only the standard library and the pure core.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .difficulty import Difficulty

__all__ = ["PlanRow", "Problem", "Sample", "sample_id"]


def sample_id(problem_id: str, slot: int) -> str:
    """The id of sample ``slot`` of a problem: unique within an iteration."""
    return f"{problem_id}/{slot}"


@dataclass(frozen=True)
class Problem:
    """One problem of an iteration."""

    problem_id: str
    prompt: Any
    """As in the dataset: a string, or chat messages."""
    prompt_text: str
    """The prompt rendered for generation (chat template applied for messages)."""
    answer: str
    columns: dict = field(default_factory=dict)
    """The dataset's other columns, passed to reward functions under their own names."""

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)

    def completion(self, text: str) -> Any:
        """A completion in the dataset's format: text, or an assistant message for chat prompts."""
        return [{"role": "assistant", "content": text}] if self.conversational else text

    def to_row(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> Problem:
        return cls(
            row["problem_id"], row["prompt"], row["prompt_text"], row["answer"], row.get("columns") or {}
        )


@dataclass(frozen=True)
class Sample:
    """One completion of a problem, with its verdict and, once scored, its reward S(r)."""

    sample_id: str
    problem_id: str
    slot: int
    """The sample's index among its problem's samples of the iteration (rounds continue the count)."""
    round: int
    completion: str
    num_tokens: int
    finish_reason: str
    correct: bool
    reward: float | None = None
    """S(r); ``None`` before scoring, or when the reward source cannot score it."""

    def to_row(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> Sample:
        return cls(**row)

    def scored(self, reward: float | None) -> Sample:
        return dataclasses.replace(self, reward=None if reward is None else float(reward))


@dataclass(frozen=True)
class PlanRow:
    """A problem after a round: its difficulty from all its samples so far and the samples it gets next."""

    problem_id: str
    difficulty: Difficulty
    next_samples: int
    fell_back: bool = False
    """True when the allocation found no eligible problem and spread the slice over all of them."""

    def to_row(self) -> dict:
        return {
            "problem_id": self.problem_id,
            **self.difficulty.to_dict(),
            "next_samples": self.next_samples,
            "fell_back": self.fell_back,
        }

    @classmethod
    def from_row(cls, row: dict) -> PlanRow:
        return cls(
            row["problem_id"], Difficulty.from_dict(row), int(row["next_samples"]), bool(row["fell_back"])
        )
