"""The phase store: each iteration's files, written atomically, and the run manifest.

Each iteration writes its phases to ``output_dir/iteration-<t>/``, one straight line of rounds::

    problems.jsonl              the iteration's problems (Problem records)
    round-0.samples.jsonl       round 0 (pre-sampling): one Sample per (problem, slot), verdict included
    round-0.scored.jsonl        the same Samples with their reward S(r)
    round-1.plan.jsonl          per problem (PlanRow): level, phi_a, phi_r from all samples so far, and the
                                samples it gets in round 1
    round-1.samples.jsonl       round 1 (re-sampling), slots continuing each problem's count
    round-1.scored.jsonl
    ...                         a plan, samples and scored file per further round
    train_rows.jsonl            SFT rows or DPO pairs
    stats.json                  the iteration's metrics
    model/                      the checkpoint after training (weights, or the adapter for PEFT)
    DONE                        written last: the iteration is complete

Every file is written to a temporary name and renamed into place, so a file that exists is complete and a
killed run never leaves a half-written file that reads as done. Sampling and scoring phases also save their
progress in chunks, ``.<phase>.chunks/chunk-<first unit>.jsonl`` (each written the same way), merged into the
phase's file when the phase ends; a rerun computes only the chunks that are missing. A rerun with the same
``output_dir`` skips each phase whose file exists. The layout has a version (:data:`FORMAT_VERSION`, kept in the
run manifest): a run directory of another version is refused, never resumed wrongly. JSON Lines files load with
``datasets.load_dataset("json", data_files=...)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ._utils import publish_dir as _publish_dir

__all__ = ["FORMAT_VERSION", "IterationArtifacts", "PhaseStore", "RunManifest", "atomic_write_text"]

FORMAT_VERSION = 2
"""Version of the files' layout. 1: ``presamples.jsonl``/``levels.jsonl``/``resamples.jsonl`` (before rounds)."""

PROBLEMS = "problems.jsonl"
TRAIN_ROWS = "train_rows.jsonl"
STATS = "stats.json"
MODEL = "model"
DONE = "DONE"


def samples_file(round_: int) -> str:
    """Round ``round_``'s samples, each with its verdict."""
    return f"round-{round_}.samples.jsonl"


def scored_file(round_: int) -> str:
    """Round ``round_``'s samples with their rewards."""
    return f"round-{round_}.scored.jsonl"


def plan_file(round_: int) -> str:
    """The statistics and allocation that decided round ``round_`` (``round_ >= 1``)."""
    return f"round-{round_}.plan.jsonl"


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
        _publish_dir(tmp_dir, self.path(name))

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

    def rounds(self) -> int:
        """How many rounds have a samples or plan file."""
        r = 0
        while self.has(samples_file(r)) or self.has(plan_file(r)):
            r += 1
        return r

    def completed_phases(self) -> list[str]:
        """The phases whose file exists, in the order they are written."""
        names = [PROBLEMS]
        for r in range(self.rounds()):
            names += ([plan_file(r)] if r else []) + [samples_file(r), scored_file(r)]
        return [name for name in [*names, TRAIN_ROWS, STATS, MODEL, DONE] if self.has(name)]


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
        settings = json.loads(
            json.dumps({"format_version": FORMAT_VERSION, **settings})
        )  # as JSON would read it
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                previous = json.load(f)
            version = previous.get("format_version", 1)
            if version != FORMAT_VERSION:
                raise ValueError(
                    f"`output_dir` ({self.path.parent}) holds a run written in phase-store format {version}; this "
                    f"version of trl-hsstar writes format {FORMAT_VERSION} and cannot resume it. Pass a new "
                    "`output_dir` (the existing run is left untouched), or finish that run with the trl-hsstar "
                    "version that started it."
                )
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


class PhaseStore:
    """The phases of one iteration, computed or read back: its files, process group, timings and chunk accounting.

    ``collective`` is a :class:`~trl_hsstar.distributed.Collective` (one process by default)."""

    def __init__(self, store: IterationArtifacts, coll, chunk_size: int, progress: bool):
        self.store, self.coll, self.chunk_size, self.progress = store, coll, chunk_size, progress
        self.computed: list[str] = []
        self.timings: dict[str, float] = {}
        self.units: dict[str, dict[str, int]] = {}

    def on_main(self, name: str, compute: Callable[[], list[dict]], share: bool = True) -> list[dict] | None:
        """A phase computed by the main process alone: read its file if complete, else compute and write it.
        With ``share``, every process gets the rows (broadcast); otherwise the other processes get ``None``."""
        start = time.monotonic()
        rows = None
        if self.coll.is_main:
            if self.store.has(name):
                rows = self.store.read_jsonl(name)
            else:
                rows = compute()
                self.store.write_jsonl(name, rows)
                self.computed.append(name)
                self.timings[name] = time.monotonic() - start
        return self.coll.broadcast(rows) if share else rows

    def chunked(
        self,
        name: str,
        units: list,
        key: Callable[[Any], str],
        compute: Callable[[list, int | None], list[dict]],
        *,
        desc: str,
    ) -> list[dict] | None:
        """A phase over ``units`` (one output row per unit, with ``sample_id == key(unit)``), shared by all processes
        and checkpointed in chunks.

        The main process lists the chunks still to do (``<phase>.chunks/chunk-<first unit>.jsonl`` files already
        written are complete: each is renamed into place whole) and broadcasts the plan; in each round every
        process computes one chunk (or calls ``compute([], None)`` if none is left for it), the main process
        gathers the rows and writes each chunk's file. Once every chunk is written, the main process merges them,
        checks that each unit has exactly one row, writes the phase file and removes the chunks. Returns the rows in
        unit order on the main process, ``None`` on the others.
        """
        store, coll = self.store, self.coll
        chunk_dir = store.path(f".{name}.chunks")
        plan = None
        if coll.is_main:
            if store.has(name):
                plan = {"done": True}
            else:
                done = _read_chunks(chunk_dir)
                keys = [key(u) for u in units]
                position = {k: i for i, k in enumerate(keys)}
                unknown = [k for k in done if k not in position]
                if unknown:
                    raise RuntimeError(
                        f"{chunk_dir} holds rows for {len(unknown)} unit(s) this phase does not have (e.g. "
                        f"{unknown[0]!r}): the run's settings changed since they were written. Remove that directory "
                        "to redo the phase."
                    )
                pending = [i for i, k in enumerate(keys) if k not in done]
                chunks = [pending[j : j + self.chunk_size] for j in range(0, len(pending), self.chunk_size)]
                plan = {"done": False, "chunks": chunks, "reused": len(done)}
        plan = coll.broadcast(plan)
        if plan["done"]:
            if chunk_dir.exists() and coll.is_main:
                shutil.rmtree(chunk_dir, ignore_errors=True)  # a kill after the merge and before the clean-up
            return store.read_jsonl(name) if coll.is_main else None

        start = time.monotonic()
        chunks, p = plan["chunks"], coll.num_processes
        total = sum(len(c) for c in chunks)
        bar = tqdm(
            total=len(units),
            initial=len(units) - total,
            desc=desc,
            unit="sample",
            disable=not (self.progress and coll.is_main),
            leave=False,
        )
        with bar:
            for r in range(math.ceil(len(chunks) / p)):
                mine = (
                    chunks[r * p + coll.process_index] if r * p + coll.process_index < len(chunks) else None
                )
                rows = compute([units[i] for i in mine], mine[0]) if mine else compute([], None)
                gathered = coll.gather([(mine, rows)] if mine else [])
                if coll.is_main:
                    for indices, chunk_rows in gathered:
                        wanted = [key(units[i]) for i in indices]
                        got = [row["sample_id"] for row in chunk_rows]
                        if sorted(got) != sorted(wanted):
                            raise RuntimeError(
                                f"phase {name!r}: a chunk returned rows for {len(got)} unit(s) instead of its "
                                f"{len(wanted)} (first wanted {wanted[0]!r})"
                            )
                        atomic_write_text(
                            chunk_dir / f"chunk-{indices[0]:08d}.jsonl",
                            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in chunk_rows),
                        )
                        bar.update(len(indices))
        rows = None
        if coll.is_main:
            done = _read_chunks(chunk_dir)
            missing = [key(u) for u in units if key(u) not in done]
            if missing or len(done) != len(units):
                raise RuntimeError(
                    f"phase {name!r}: {len(missing)} unit(s) have no row after every chunk ran (e.g. "
                    f"{missing[:1]}); rerun to compute them."
                )
            rows = [done[key(u)] for u in units]
            store.write_jsonl(name, rows)
            shutil.rmtree(chunk_dir, ignore_errors=True)
            self.computed.append(name)
            self.timings[name] = time.monotonic() - start
            self.units[name] = {"computed": total, "reused": plan["reused"]}
        coll.barrier()
        return rows


def _read_chunks(chunk_dir) -> dict[str, dict]:
    """Rows of the complete chunk files in ``chunk_dir``, by sample id (a unit in two chunks is an error)."""
    rows: dict[str, dict] = {}
    if not chunk_dir.is_dir():
        return rows
    for path in sorted(chunk_dir.glob("chunk-*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if row["sample_id"] in rows:
                    raise RuntimeError(
                        f"{path} repeats sample {row['sample_id']!r} of another chunk: remove {chunk_dir} to redo "
                        "the phase."
                    )
                rows[row["sample_id"]] = row
    return rows
