"""What the recipes run: parse ``--config x.yaml`` (TRL's ``TrlParser``), load problems, model and rewards, train.

``recipes/hsstar.py`` (SFT) and ``recipes/hsstar_dpo.py`` (DPO) are thin scripts around :func:`main`, and
``hsstar train --config x.yaml`` runs the same code, choosing the trainer from the YAML's ``objective``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from .config import HSStarConfig, HSStarDPOConfig

__all__ = ["HSStarScriptArguments", "main", "make_parser", "run"]

OBJECTIVES = ("sft", "dpo")


@dataclass
class HSStarScriptArguments(ScriptArguments):
    """Script arguments of the HS-STaR recipes (on top of TRL's ``ScriptArguments``).

    ``dataset_name: toy`` and ``model_name_or_path: toy`` select the embedded arithmetic world and its tiny
    reasoner, shipped with the package (no download, nothing trained before the loop).
    """

    objective: str = field(default="sft", metadata={"help": f"Training objective, one of {OBJECTIVES}."})
    prompt_column: str = field(default="prompt", metadata={"help": "Dataset column with the problem text."})
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "If set, prompts become chat messages: this system turn, then the problem."},
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Process (or outcome) reward model giving S(r)."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions as 'module:function' (or 'oracle' for the toy world's step checker)."
        },
    )
    toy_num_problems: int = field(default=600, metadata={"help": "Toy world: number of problems generated."})
    toy_operands: list[int] = field(
        default_factory=lambda: [2, 6], metadata={"help": "Toy world: operand range."}
    )
    toy_digits: list[int] = field(
        default_factory=lambda: [1, 1], metadata={"help": "Toy world: digit range."}
    )
    toy_num_eval_problems: int = field(
        default=0,
        metadata={
            "help": "Toy world: held-out problems evaluated before the first iteration and after each one."
        },
    )
    toy_words: bool = field(
        default=False,
        metadata={
            "help": "Toy world: ask each sum as a question in words ('What is 3 + 4 + 5?') instead of 'Q: 3+4+5', for a "
            "pretrained instruct model; combine with `system_prompt` to send chat messages."
        },
    )

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {self.objective!r}.")


def make_parser(objective: str = "sft") -> TrlParser:
    config_cls = HSStarDPOConfig if objective == "dpo" else HSStarConfig
    return TrlParser((HSStarScriptArguments, config_cls, ModelConfig))


def _peek_objective(argv: Sequence[str]) -> str:
    """The objective from ``--objective`` or the YAML given with ``--config`` (default ``sft``)."""
    import argparse

    import yaml

    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--objective")
    peek.add_argument("--config")
    known, _ = peek.parse_known_args(list(argv))
    if known.objective:
        return known.objective
    if known.config:
        with open(known.config, encoding="utf-8") as f:
            return (yaml.safe_load(f) or {}).get("objective", "sft")
    return "sft"


def parse(argv: Sequence[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return make_parser(_peek_objective(argv)).parse_args_and_config(args=argv)


def _load_problems(script_args: HSStarScriptArguments, training_args):
    from datasets import load_dataset

    if script_args.dataset_name == "toy":
        from .toy import generate_problems

        problems = generate_problems(
            script_args.toy_num_problems,
            operands=tuple(script_args.toy_operands),
            digits=tuple(script_args.toy_digits),
            seed=training_args.seed,
        )
        return _toy_dataset(problems, script_args)
    if script_args.dataset_name is None:
        raise ValueError("`dataset_name` is required: a Hub dataset, a local .json/.jsonl file, or `toy`.")
    if script_args.dataset_name.endswith((".json", ".jsonl")):
        dataset = load_dataset("json", data_files=script_args.dataset_name, split="train")
    else:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split
        )
    column = script_args.prompt_column
    if column not in dataset.column_names:
        raise ValueError(
            f"`prompt_column` {column!r} is not a column of the dataset ({dataset.column_names})."
        )
    return _as_chat(dataset, column, script_args.system_prompt)


def _toy_dataset(problems, script_args):
    from datasets import Dataset

    from .toy import problems_to_dataset_dict

    dataset = Dataset.from_dict(problems_to_dataset_dict(problems))
    if script_args.toy_words:
        words = [f"What is {p.expression.replace('+', ' + ').replace('-', ' - ')}?" for p in problems]
        dataset = dataset.remove_columns("prompt").add_column("prompt", words)
    return _as_chat(dataset, "prompt", script_args.system_prompt)


def _load_eval_problems(script_args, training_args, train):
    """Held-out toy problems (``toy_num_eval_problems``), none of them among the training problems."""
    if script_args.dataset_name != "toy" or not script_args.toy_num_eval_problems:
        return None
    from .toy import generate_problems

    seen = set(train["id"])
    pool = generate_problems(
        script_args.toy_num_eval_problems + len(seen),
        operands=tuple(script_args.toy_operands),
        digits=tuple(script_args.toy_digits),
        seed=training_args.seed + 1,
    )
    held_out = [p for p in pool if p.id not in seen][: script_args.toy_num_eval_problems]
    return _toy_dataset(held_out, script_args)


def _as_chat(dataset, column: str, system: str | None):
    """The problems with their question in ``prompt``: chat messages (this system turn, then the question) when a
    system prompt is given, else the text as it is."""
    if system is not None:

        def to_messages(row):
            return {
                "prompt": [{"role": "system", "content": system}, {"role": "user", "content": row[column]}]
            }

        return dataset.map(to_messages, remove_columns=[column] if column != "prompt" else None)
    return dataset.rename_column(column, "prompt") if column != "prompt" else dataset


def _load_reward_funcs(script_args: HSStarScriptArguments):
    funcs: list = []
    if script_args.reward_model_name_or_path:
        funcs.append(script_args.reward_model_name_or_path)
    for spec in script_args.reward_funcs or []:
        if spec == "oracle":
            from .toy.oracle import OracleStepReward

            funcs.append(OracleStepReward())
            continue
        module, _, name = spec.partition(":")
        if not name:
            raise ValueError(
                f"`reward_funcs` entry {spec!r} must look like 'package.module:function' (or 'oracle')."
            )
        funcs.append(getattr(importlib.import_module(module), name))
    return funcs or None


def main(script_args: HSStarScriptArguments, training_args, model_args: ModelConfig):
    """Build the trainer from parsed arguments and run the HS-STaR loop."""
    from trl import get_peft_config, get_quantization_config

    from .trainer import HSStarDPOTrainer, HSStarTrainer

    problems = _load_problems(script_args, training_args)
    eval_problems = _load_eval_problems(script_args, training_args, problems)
    reward_funcs = _load_reward_funcs(script_args)

    model = model_args.model_name_or_path
    if model == "toy":
        from .toy.world import toy_reasoner_path

        model = str(toy_reasoner_path())
    # Safe by default: remote code only if the user sets `trust_remote_code` (TRL's field, default False), and
    # safetensors weights only (a pickle-based pytorch_model.bin can run code when loaded); the user's
    # `model_init_kwargs` override both, e.g. `{"use_safetensors": false}` for a trusted .bin checkpoint.
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=bool(training_args.trust_remote_code),
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
        use_safetensors=True,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    trainer_cls = HSStarDPOTrainer if script_args.objective == "dpo" else HSStarTrainer
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=problems,
        eval_dataset=eval_problems,
        reward_funcs=reward_funcs,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(
        f"HS-STaR finished: {len(trainer.iteration_stats)} iterations, model in {training_args.output_dir}"
    )
    initial = os.path.join(training_args.output_dir, "eval-initial", "eval_summary.json")
    if eval_problems is not None and os.path.exists(initial):
        with open(initial, encoding="utf-8") as f:
            trainer.accelerator.print(
                f"  held-out greedy accuracy before the first iteration: {json.load(f)['greedy']:.3f}"
            )
    for stats in trainer.iteration_stats:
        trainer.accelerator.print(
            f"  iteration {stats['iteration']}: levels {stats['levels']}, budget {stats['budget_spent']}/"
            f"{stats['budget_planned']}, rows {stats['rows']}, pre-sample accuracy {stats['presample_accuracy']:.3f}"
        )
        if stats.get("eval"):
            trainer.accelerator.print(f"    held-out greedy accuracy after it: {stats['eval']['greedy']:.3f}")
        for warning in stats.get("warnings", []):
            trainer.accelerator.print(f"    warning: {warning}")
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


def run(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    script_args, training_args, model_args = parse(argv)
    main(script_args, training_args, model_args)
    return 0
