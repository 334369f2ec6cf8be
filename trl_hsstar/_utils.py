"""Small helpers shared by the model-facing modules (no torch import here)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["eval_mode", "quiet_progress_bars"]


@contextmanager
def quiet_progress_bars(datasets_too: bool = False) -> Iterator[None]:
    """No transformers progress bars ("Loading weights", "Writing model shards") inside the block, for the loop's
    own saves and loads; with ``datasets_too``, none of datasets' either (``disable_tqdm``). Restored after."""
    from transformers.utils import logging as hf_logging

    restore = []
    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        restore.append(hf_logging.enable_progress_bar)
    if datasets_too:
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            restore.append(datasets.enable_progress_bars)
    try:
        yield
    finally:
        for undo in restore:
            undo()


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
