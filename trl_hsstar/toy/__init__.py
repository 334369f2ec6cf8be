"""The toy arithmetic world: problems, an exact step checker, a char tokenizer and tiny Llama models.

Everything is built locally (no downloads) so tests and the CPU demo run anywhere. The problem and
step-checker names are pure Python; ``build_char_tokenizer``, ``build_tiny_model`` and the other
torch/transformers names are imported lazily on first access, so ``import trl_hsstar.toy`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trl_hsstar.toy.problems import (
    STEP_SEPARATOR,
    ArithmeticProblem,
    first_error_step,
    generate_problems,
    is_rationale_correct,
    label_steps,
    problems_to_dataset_dict,
    split_steps,
)

if TYPE_CHECKING:  # pragma: no cover
    from trl_hsstar.toy.model import build_tiny_model, tiny_llama_config
    from trl_hsstar.toy.tokenizer import STEP_TOKEN, build_char_tokenizer

_LAZY = {
    "build_char_tokenizer": "trl_hsstar.toy.tokenizer",
    "STEP_TOKEN": "trl_hsstar.toy.tokenizer",
    "build_tiny_model": "trl_hsstar.toy.model",
    "tiny_llama_config": "trl_hsstar.toy.model",
}

__all__ = [
    "STEP_SEPARATOR",
    "STEP_TOKEN",
    "ArithmeticProblem",
    "build_char_tokenizer",
    "build_tiny_model",
    "first_error_step",
    "generate_problems",
    "is_rationale_correct",
    "label_steps",
    "problems_to_dataset_dict",
    "split_steps",
    "tiny_llama_config",
]


def __getattr__(name: str) -> Any:  # PEP 562: import torch/transformers only when needed
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
