"""The problems a run starts from: checked once, before anything expensive, then split into iterations.

A problem is a row with a ``prompt`` (text or chat messages) and a reference answer (``args.answer_column``); an
optional ``args.problem_id_column`` names it. Each check raises a ``ValueError`` that names the row, the column
and the fix.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random

from datasets import Dataset

from .records import Problem
from .verify import MathVerifier, _reference_answer

logger = logging.getLogger(__name__)

__all__ = [
    "check_launch",
    "check_output_dir",
    "drop_unverifiable",
    "ids_digest",
    "make_problems",
    "problem_rows",
    "render_prompt",
    "split_iterations",
    "warn_on_unsharded_fsdp",
]


def check_launch(args) -> None:
    """Every launched process must see the others: a lone process per launch would overwrite the others' files."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and args.world_size != launched:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE), but the training arguments see {args.world_size}: "
            "each process would run the whole loop alone and overwrite the others' files. On a machine without "
            "a GPU set `use_cpu=True` (the HS-STaR configs do so by default) and launch with `accelerate launch "
            "--multi_gpu --num_processes N`."
        )


def warn_on_unsharded_fsdp(distributed: str) -> None:
    """Say at once that FSDP was asked for but will not shard (CPU processes). ``distributed`` is the accelerator's
    own type: only it reports FSDP, the launch state says MULTI_GPU."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and distributed != "FSDP":
        # accelerate applies FSDP to GPU-type processes only; CPU processes get plain data parallelism
        logger.warning(
            "accelerate was asked for FSDP but this run is %s: it shards only accelerator (GPU/XPU/NPU) processes, "
            "so these processes hold full replicas (DDP). Levels, allocation and rows are the same.",
            distributed,
        )


def ids_digest(rows: list[dict]) -> str:
    """A short digest of the problem ids, in order: the run manifest's check that a resume has the same problems."""
    return hashlib.sha256("\n".join(r["problem_id"] for r in rows).encode()).hexdigest()[:16]


def problem_rows(dataset: Dataset, args, name: str = "train_dataset") -> list[dict]:
    """Check the problems dataset; its rows as plain dicts with ``problem_id``, ``prompt``, ``answer``, ``columns``."""
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"`{name}` must be a `datasets.Dataset` of problems (columns `prompt` and `{args.answer_column}`), "
            f"got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: it must hold problems (a `prompt` and a reference answer).")
    missing = [c for c in ("prompt", args.answer_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"`{name}` lacks the column(s) {missing}; it has {dataset.column_names}. Problems need a `prompt` "
            f"(text or chat messages) and a reference answer in `{args.answer_column}` (set `answer_column` to use "
            "another column)."
        )
    rows = []
    seen: dict[str, int] = {}
    has_ids = args.problem_id_column in dataset.column_names
    for i, row in enumerate(dataset):
        pid = str(row[args.problem_id_column]) if has_ids else str(i)
        if pid in seen:
            raise ValueError(
                f"`{name}` has duplicate problem id {pid!r} (rows {seen[pid]} and {i}) in column "
                f"`{args.problem_id_column}`: problem ids must be unique."
            )
        seen[pid] = i
        prompt = row["prompt"]
        if not (isinstance(prompt, str) and prompt) and not (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(m, dict) and "content" in m for m in prompt)
        ):
            raise ValueError(
                f"`{name}` row {i} (id {pid!r}): `prompt` must be a non-empty string or a list of chat "
                f"messages, got {type(prompt).__name__}."
            )
        answer = row[args.answer_column]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise ValueError(
                f"`{name}` row {i} (id {pid!r}): the reference answer in `{args.answer_column}` is empty or "
                f"not a string/number ({answer!r})."
            )
        # every other column under its own name, the answer column too, as GRPOTrainer passes them to rewards
        columns = {k: v for k, v in row.items() if k != "prompt"}
        rows.append({"problem_id": pid, "prompt": prompt, "answer": str(answer).strip(), "columns": columns})
    return rows


def render_prompt(prompt, processing_class, chat_template_kwargs: dict | None = None) -> str:
    """A prompt as the sampler sees it: text as it is, chat messages through the chat template."""
    from transformers import ProcessorMixin

    if isinstance(prompt, str):
        return prompt
    tokenizer = (
        processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
    )
    return tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
    )


def make_problems(
    rows: list[dict], processing_class, chat_template_kwargs: dict | None = None
) -> list[Problem]:
    """Rows (``problem_id``, ``prompt``, ``answer``, ``columns``) as :class:`~trl_hsstar.records.Problem` records,
    each prompt rendered for generation: the one place problems are built."""
    return [
        Problem(
            r["problem_id"],
            r["prompt"],
            render_prompt(r["prompt"], processing_class, chat_template_kwargs),
            r["answer"],
            r["columns"],
        )
        for r in rows
    ]


def check_output_dir(output_dir: str) -> None:
    """Fail now, not after the first phase, if ``output_dir`` cannot hold the run's files."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".hsstar-write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ValueError(
            f"`output_dir` ({output_dir}) cannot be written: {error.strerror or error}. Every phase of every "
            "iteration is saved there: pass an `output_dir` on a writable disk."
        ) from error


def drop_unverifiable(rows: list[dict], verifier, timeout: float) -> tuple[list[dict], list[dict]]:
    """Problems whose reference answer the default verifier cannot read are left out, and counted.

    The test: a completion that boxes the reference's own answer must verify against it. A reference that fails
    it (e.g. ``"\\frac{1}{"`` or an empty box) would make every sample of its problem count as wrong, so the
    problem would look hard and waste its budget. Custom verifiers are trusted as given (not tested).
    """
    own = verifier is None
    if not (own or isinstance(verifier, MathVerifier)):
        return rows, []
    checker = MathVerifier(timeout=timeout) if own else verifier
    try:
        extracted = [_reference_answer(r["answer"]) for r in rows]
        todo = [i for i, a in enumerate(extracted) if a is not None]
        verdicts = checker.verify_batch(
            [f"\\boxed{{{extracted[i]}}}" for i in todo], [rows[i]["answer"] for i in todo]
        )
    finally:
        if own:
            checker.close()
    ok = {i for i, v in zip(todo, verdicts) if v}
    kept = [r for i, r in enumerate(rows) if i in ok]
    skipped = [
        {
            "problem_id": r["problem_id"],
            "answer": r["answer"],
            "reason": "the reference answer cannot be read by the verifier",
        }
        for i, r in enumerate(rows)
        if i not in ok
    ]
    if not kept:
        raise ValueError(
            f"None of the {len(rows)} reference answers in `train_dataset` can be read by the verifier (e.g. "
            f"{rows[0]['answer']!r} of problem {rows[0]['problem_id']!r}): check `answer_column`, or pass a `verifier` "
            "that understands your answers."
        )
    if skipped:
        logger.warning(
            "Left out %d of %d problems whose reference answer the verifier cannot read (e.g. %s); they are listed "
            "in `output_dir/skipped_problems.jsonl`.",
            len(skipped),
            len(rows),
            ", ".join(f"{s['problem_id']!r}: {s['answer']!r}" for s in skipped[:3]),
        )
    return kept, skipped


def split_iterations(rows: list[dict], args) -> list[list[dict]]:
    """Fresh, non-overlapping problems per iteration, from a seeded shuffle of the dataset."""
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    per_iteration = args.problems_per_iteration or len(rows) // args.num_iterations
    if per_iteration == 0 or per_iteration * args.num_iterations > len(rows):
        raise ValueError(
            f"`train_dataset` has {len(rows)} problems, too few for `num_iterations`={args.num_iterations} x "
            f"`problems_per_iteration`={args.problems_per_iteration or per_iteration} fresh problems: lower one of "
            "them or add problems."
        )
    return [
        [rows[j] for j in order[t * per_iteration : (t + 1) * per_iteration]]
        for t in range(args.num_iterations)
    ]
