"""trl-hsstar: HS-STaR (hierarchical sampling for self-taught reasoners) on TRL.

Names are imported lazily, so ``import trl_hsstar.difficulty`` (or ``budget``, ``selection``) stays
free of torch, transformers and trl.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

_LAZY = {
    # the pure core
    "Level": "difficulty",
    "Difficulty": "difficulty",
    "PUBLISHED_THRESHOLDS": "difficulty",
    "estimate_difficulty": "difficulty",
    "lookup_thresholds": "difficulty",
    "Allocation": "budget",
    "allocate": "budget",
    "presamples_for": "budget",
    "ScoredSample": "selection",
    "select_sft_rows": "selection",
    "select_dpo_pairs": "selection",
    # the trainers
    "HSStarConfig": "config",
    "HSStarDPOConfig": "config",
    "HSStarTrainer": "trainer",
    "HSStarDPOTrainer": "trainer",
    "HSStarGRPOConfig": "grpo",
    "HSStarGRPOTrainer": "grpo",
    "HSStarCallback": "callbacks",
    # answer checking
    "MathVerifier": "verify",
    "extract_answer": "verify",
    "verify_answer": "verify",
    "answer_reward": "rewards",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .budget import Allocation, allocate, presamples_for
    from .callbacks import HSStarCallback
    from .config import HSStarConfig, HSStarDPOConfig
    from .difficulty import PUBLISHED_THRESHOLDS, Difficulty, Level, estimate_difficulty, lookup_thresholds
    from .grpo import HSStarGRPOConfig, HSStarGRPOTrainer
    from .rewards import answer_reward
    from .selection import ScoredSample, select_dpo_pairs, select_sft_rows
    from .trainer import HSStarDPOTrainer, HSStarTrainer
    from .verify import MathVerifier, extract_answer, verify_answer


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trl_hsstar' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
