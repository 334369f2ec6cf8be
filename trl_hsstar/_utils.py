"""Small helpers shared by the model-facing modules (no torch import here)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put every submodule of a torch module in eval mode; restore each one's own training flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
