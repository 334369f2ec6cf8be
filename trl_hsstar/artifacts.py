"""Per-iteration artifacts and the resume cursor.

Each iteration writes its phases to ``output_dir/iteration-<t>/``::

    problems.jsonl          the iteration's problems (id, prompt, rendered prompt text, answer)
    presamples.jsonl        pre-samples: one row per (problem, slot) with completion, tokens, finish reason, correct
    presample_scores.jsonl  S(r) per pre-sample
    levels.jsonl            per problem: level, phi_a, phi_r, re-samples allocated
    resamples.jsonl         re-samples (slots n_p ... n_p + r - 1)
    resample_scores.jsonl   S(r) per re-sample
    train_rows.jsonl        SFT rows or DPO pairs
    stats.json              the iteration's metrics
    model/                  the checkpoint after training (weights, or the adapter for PEFT)
    DONE                    written last: the iteration is complete

Every file is written to a temporary name and renamed into place, so a file that exists is complete and a
killed run never leaves a half-written file that reads as done. Sampling and scoring phases also save their
progress in chunks, ``.<phase>.chunks/chunk-<first unit>.jsonl`` (each written the same way), merged into the
phase's file when the phase ends; a rerun computes only the chunks that are missing. A rerun with the same ``output_dir`` skips
each phase whose file exists. JSON Lines files load with ``datasets.load_dataset("json", data_files=...)``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["IterationArtifacts", "RunManifest", "atomic_write_text"]

PROBLEMS = "problems.jsonl"
PRESAMPLES = "presamples.jsonl"
PRESAMPLE_SCORES = "presample_scores.jsonl"
LEVELS = "levels.jsonl"
RESAMPLES = "resamples.jsonl"
RESAMPLE_SCORES = "resample_scores.jsonl"
TRAIN_ROWS = "train_rows.jsonl"
STATS = "stats.json"
MODEL = "model"
DONE = "DONE"

PHASES = (
    PROBLEMS,
    PRESAMPLES,
    PRESAMPLE_SCORES,
    LEVELS,
    RESAMPLES,
    RESAMPLE_SCORES,
    TRAIN_ROWS,
    STATS,
    MODEL,
    DONE,
)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class IterationArtifacts:
    """The files of one iteration, ``<output_dir>/iteration-<t>/``."""

    def __init__(self, output_dir: str | os.PathLike, iteration: int):
        self.iteration = iteration
        self.dir = Path(output_dir) / f"iteration-{iteration}"

    def path(self, name: str) -> Path:
        return self.dir / name

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    @property
    def done(self) -> bool:
        return self.has(DONE)

    @property
    def model_dir(self) -> Path:
        return self.path(MODEL)

    def write_jsonl(self, name: str, rows: Iterable[dict]) -> None:
        atomic_write_text(self.path(name), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def read_jsonl(self, name: str) -> list[dict]:
        with open(self.path(name), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.path(name), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def read_json(self, name: str) -> Any:
        with open(self.path(name), encoding="utf-8") as f:
            return json.load(f)

    def publish_dir(self, tmp_dir: str | os.PathLike, name: str) -> None:
        """Move a fully written directory into place under ``name`` (replacing a stale one)."""
        target = self.path(name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp_dir, target)

    def tmp_dir(self, name: str, create: bool = True) -> Path:
        """The temporary directory to write ``name`` into before :meth:`publish_dir` (the same path in every
        process); with ``create``, emptied and created."""
        tmp = self.path(f".{name}.partial")
        if create:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        return tmp

    def remove_partial_files(self) -> list[Path]:
        """Delete what a killed writer left half-written (``.<name>.tmp-<pid>`` files); return their paths.

        Such files never count as complete (:meth:`has` looks at the final names only); this only tidies up. Call
        it from the one process that writes, before it writes.
        """
        if not self.dir.is_dir():
            return []
        stale = [p for p in self.dir.glob(".*.tmp-*") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def mark_done(self) -> None:
        atomic_write_text(self.path(DONE), "")

    def completed_phases(self) -> list[str]:
        return [name for name in PHASES if self.has(name)]


class RunManifest:
    """``output_dir/hsstar_run.json``: the settings a run started with, checked on resume.

    Resuming with different settings would mix data generated under two configurations into one run, so the
    settings that shape the data (budget, pre-samples, estimator, thresholds, allocation, seed, problems) must
    match; anything else (logging, batch sizes) may change between attempts.
    """

    FILE = "hsstar_run.json"

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / self.FILE

    def check_or_write(self, settings: dict[str, Any]) -> None:
        settings = json.loads(json.dumps(settings))  # normalise tuples and numbers as JSON would
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                previous = json.load(f)
            changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
            if changed:
                detail = ", ".join(f"`{k}`: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
                raise ValueError(
                    f"`output_dir` ({self.path.parent}) holds a run started with other settings ({detail}). "
                    "Resuming would mix data from two configurations: restore those settings to resume, or pass a "
                    "new `output_dir` to start afresh (the existing run is left untouched)."
                )
            return
        atomic_write_text(self.path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
