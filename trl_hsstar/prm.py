"""Train a token-classification process reward model in the Math-Shepherd layout.

TRL 1.16 no longer ships its PRMTrainer; this is the small part of it that HS-STaR needs. Each example is
laid out exactly as :class:`~trl_hsstar.rewards.ProcessRewardModel` reads it (both call
:func:`~trl_hsstar.rewards.encode_math_shepherd`): BOS, the prompt, then each step followed by the step token,
the step's label (1 correct, 0 wrong) at that token and -100 everywhere else. Training is an ordinary
``transformers.Trainer`` run, so its arguments, logging and ``report_to`` apply.

Example (the toy world: the step checker labels the policy's own samples)::

    rows = prm_examples(tokenizer, prompts, completions, [label_steps(p, c) for p, c in zip(problems, completions)],
                        step_token=STEP_TOKEN)
    metrics = train_prm(prm_model, tokenizer, rows, output_dir="runs/prm", num_train_epochs=3)
    metrics["eval_step_accuracy"]
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from .rewards import DEFAULT_STEP_SEPARATOR, encode_math_shepherd, single_token_id, split_steps

__all__ = ["prm_examples", "step_accuracy", "train_prm"]


def prm_examples(
    tokenizer,
    prompts: Sequence[Any],
    completions: Sequence[str],
    step_labels: Sequence[Sequence[bool]],
    *,
    step_token: str,
    step_separator: str = DEFAULT_STEP_SEPARATOR,
    max_length: int | None = None,
) -> list[dict]:
    """Token-classification examples ``{"input_ids", "labels"}`` in the Math-Shepherd layout.

    ``step_labels[i]`` has one label per step of ``completions[i]`` (steps split on ``step_separator``); a
    mismatch is an error naming the example. Examples longer than ``max_length`` are dropped (not cut, so no
    label is silently lost).
    """
    if not (len(prompts) == len(completions) == len(step_labels)):
        raise ValueError(
            f"`prompts` ({len(prompts)}), `completions` ({len(completions)}) and `step_labels` ({len(step_labels)}) "
            "must have the same length."
        )
    step_token_id = single_token_id(tokenizer, step_token)
    rows = []
    for i, (prompt, completion, labels) in enumerate(zip(prompts, completions, step_labels)):
        steps = split_steps(completion, step_separator)
        if len(labels) != len(steps):
            raise ValueError(f"example {i}: {len(labels)} step labels for {len(steps)} steps.")
        if not steps:
            continue
        input_ids, positions = encode_math_shepherd(tokenizer, prompt, steps, step_token_id)
        if max_length is not None and len(input_ids) > max_length:
            continue
        token_labels = [-100] * len(input_ids)
        for pos, ok in zip(positions, labels):
            token_labels[pos] = int(bool(ok))
        rows.append({"input_ids": input_ids, "labels": token_labels})
    return rows


def step_accuracy(eval_prediction) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: accuracy over labelled (step-token) positions, and the share of
    positive labels (the accuracy of always answering "correct")."""
    import numpy as np

    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    mask = labels != -100
    predicted = np.argmax(logits, axis=-1)
    return {
        "step_accuracy": float((predicted[mask] == labels[mask]).mean()) if mask.any() else float("nan"),
        "positive_rate": float((labels[mask] == 1).mean()) if mask.any() else float("nan"),
    }


def train_prm(
    model,
    tokenizer,
    examples: list[dict],
    *,
    output_dir: str,
    eval_fraction: float = 0.2,
    seed: int = 0,
    **training_kwargs,
) -> dict[str, float]:
    """Fine-tune ``model`` (a token-classification model with 2 labels) on ``examples``; return eval metrics.

    A seeded ``eval_fraction`` of the examples is held out and scored with :func:`step_accuracy`. Extra keyword
    arguments go to ``transformers.TrainingArguments`` (``num_train_epochs``, ``learning_rate``, ...).
    """
    from datasets import Dataset
    from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments

    if len(examples) < 2:
        raise ValueError(
            f"`examples` holds {len(examples)} example(s): at least 2 are needed (train and eval)."
        )
    if not 0 < eval_fraction < 1:
        raise ValueError(f"`eval_fraction` must be in (0, 1), got {eval_fraction!r}.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(examples)))
    eval_rows = [examples[i] for i in order[:n_eval]]
    train_rows = [examples[i] for i in order[n_eval:]]
    defaults = {
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "learning_rate": 1e-3,
        "num_train_epochs": 3,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10,
        "seed": seed,
    }
    args = TrainingArguments(output_dir=output_dir, **{**defaults, **training_kwargs})
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows),
        data_collator=DataCollatorForTokenClassification(tokenizer, label_pad_token_id=-100),
        compute_metrics=step_accuracy,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    return {
        "eval_step_accuracy": after["eval_step_accuracy"],
        "eval_step_accuracy_before": before["eval_step_accuracy"],
        "eval_positive_rate": after["eval_positive_rate"],
        "num_train": len(train_rows),
        "num_eval": len(eval_rows),
    }
