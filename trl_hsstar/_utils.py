"""Small helpers shared by the model-facing modules (no torch import here)."""

from __future__ import annotations

import os
import select
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "accelerator_available",
    "eval_mode",
    "model_name",
    "publish_dir",
    "quiet_progress_bars",
    "read_line",
    "short_model_name",
]


def read_line(fd: int, timeout: float | None) -> bytes:
    """One line (with its newline) from a child process's pipe, for the JSON-lines protocols of the verifier's
    workers and the vLLM engine. Raises ``TimeoutError`` after ``timeout`` seconds (``None``: no bound) and
    ``EOFError`` if the child closed the pipe (it died)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            raise TimeoutError
        chunk = os.read(fd, 1 << 16)  # one request, one reply: nothing of a next line can follow
        if not chunk:
            raise EOFError
        line += chunk
    return line


def accelerator_available() -> bool:
    """Whether torch sees a GPU or another accelerator (XPU, NPU, MLU, MUSA); torch is imported on first call."""
    import torch

    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu", "mlu", "musa"):
        backend = getattr(torch, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False


def publish_dir(tmp: str | os.PathLike, target: str | os.PathLike, *, keep_existing: bool = False) -> None:
    """Move a fully written directory into place with one rename, so that a directory that exists is complete. One
    already there is replaced, or, with ``keep_existing`` (another process built the same thing), kept."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        if keep_existing:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first


def model_name(obj) -> str | None:
    """A model's id or path: the string itself, or ``config.name_or_path`` of a model instance."""
    if isinstance(obj, str):
        return obj
    config = getattr(obj, "config", None)
    return getattr(config, "name_or_path", None) or None


def short_model_name(obj, default: str) -> str:
    """The last part of a model's id or path (``Qwen/Qwen2.5-Math-PRM-7B`` -> ``Qwen2.5-Math-PRM-7B``), or ``default``."""
    return (model_name(obj) or "").rstrip("/").split("/")[-1] or default


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
