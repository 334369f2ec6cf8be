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
from pathlib import Path

from trl import ModelConfig, ScriptArguments, TrlParser

from .config import HSStarConfig, HSStarDPOConfig
from .models import safe_loading
from .toy.recipe import (
    TOY,
    TOY_REWARDS,
    toy_dataset,
    toy_eval_dataset,
    toy_model_path,
    toy_reward,
    with_toy_arguments,
)

__all__ = ["HSStarScriptArguments", "main", "make_parser", "run"]

OBJECTIVES = ("sft", "dpo", "grpo")


@dataclass
class HSStarScriptArguments(ScriptArguments):
    """Script arguments of the HS-STaR recipes (on top of TRL's ``ScriptArguments``).

    ``dataset_name: toy`` and ``model_name_or_path: toy`` select the embedded arithmetic world and its tiny
    reasoner; the parser adds its ``toy_*`` fields (:class:`trl_hsstar.toy.recipe.ToyArguments`).
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
            "help": "Reward functions: one of TRL's by name (accuracy_reward, think_format_reward, ...), an import path "
            "('my_rewards.correctness' or 'my_rewards:correctness'), or 'oracle' (the toy world's step checker)."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per reward source (the model first, then `reward_funcs`): S(r) is their sum."
        },
    )

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {self.objective!r}.")


def _grpo_script_arguments() -> type:
    """The script arguments without ``reward_weights``, which GRPOConfig carries itself (same meaning)."""
    import dataclasses

    own = {f.name for f in dataclasses.fields(ScriptArguments)} | {"reward_weights"}
    return dataclasses.make_dataclass(
        "HSStarGRPOScriptArguments",
        [(f.name, f.type, f) for f in dataclasses.fields(HSStarScriptArguments) if f.name not in own],
        bases=(ScriptArguments,),
        namespace={"__post_init__": HSStarScriptArguments.__post_init__},
    )


def _script_arguments(objective: str) -> type:
    """The script arguments a recipe parses: HS-STaR's, plus the toy world's ``toy_*`` fields."""
    return with_toy_arguments(_grpo_script_arguments() if objective == "grpo" else HSStarScriptArguments)


def make_parser(objective: str = "sft", prog: str | None = None) -> TrlParser:
    if objective == "grpo":
        from .grpo import HSStarGRPOConfig

        return TrlParser((_script_arguments(objective), HSStarGRPOConfig, ModelConfig), prog=prog)
    config_cls = HSStarDPOConfig if objective == "dpo" else HSStarConfig
    return TrlParser((_script_arguments(objective), config_cls, ModelConfig), prog=prog)


def shipped(kind: str, name: str) -> str:
    """A path, or the name of a config the package ships: ``kind`` is ``recipes`` (``toy_cpu``,
    ``qwen2.5_math/1.5b_qlora_single``, ...) or ``accelerate`` (``multi_gpu``, ``deepspeed_zero3``, ...)."""
    from importlib import resources

    if os.path.exists(name):
        return name
    root = resources.files("trl_hsstar").joinpath("configs", kind)
    candidate = root.joinpath(name if name.endswith(".yaml") else f"{name}.yaml")
    if not candidate.is_file():
        names = sorted(
            str(p.relative_to(str(root)))[: -len(".yaml")] for p in Path(str(root)).rglob("*.yaml")
        )
        raise ValueError(f"{name!r} is neither a file nor one of the shipped {kind} configs: {names}.")
    return str(candidate)


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


GRPO_RENAMES = {"num_generations": "sampling_budget"}
"""GRPOConfig fields with an HS-STaR meaning: G samples per prompt is B, the budget per problem."""

GRPO_REASONS = {
    "vllm_group_port": "weights reach a vLLM server by an in-place reload (`hsstar vllm-serve`), not an NCCL group",
    "steps_per_generation": "each iteration samples all its problems, then trains on them for `num_train_epochs`",
    "log_completions": "a table of each iteration's completions goes to the trackers of `report_to` anyway",
    "num_completions_to_print": "a table of each iteration's completions goes to the trackers of `report_to`",
}


def _grpo_only_fields(objective: str) -> set[str]:
    import dataclasses

    from trl import GRPOConfig

    ours = {
        f.name
        for c in (HSStarScriptArguments, HSStarDPOConfig if objective == "dpo" else HSStarConfig, ModelConfig)
        for f in dataclasses.fields(c)
    }
    return {f.name for f in dataclasses.fields(GRPOConfig)} - ours


def _grpo_error(key: str) -> ValueError:
    why = GRPO_REASONS.get(
        key, "HS-STaR samples a whole iteration, then trains on it with SFT or DPO, not GRPO's loss"
    )
    return ValueError(
        f"`{key}` is a GRPOConfig field with no meaning in HS-STaR ({why}): remove it. HS-STaR's sampling fields are "
        "sampling_budget (GRPO's num_generations), num_presamples, resample_rounds, temperature, top_p, top_k, min_p, "
        "max_completion_length; see docs/trainer.md, 'From TRL'."
    )


def translate_grpo(argv: Sequence[str], objective: str) -> list[str]:
    """A GRPO recipe's arguments in HS-STaR's names: ``num_generations`` becomes ``sampling_budget``; any other
    GRPO-only field is refused, naming the HS-STaR field to use. A YAML given with ``--config`` that needs renaming
    is rewritten to a temporary file."""
    import tempfile

    import yaml

    grpo = _grpo_only_fields(objective)
    argv = list(argv)
    for i, arg in enumerate(argv):
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if key in GRPO_RENAMES:
            argv[i] = arg.replace(key, GRPO_RENAMES[key], 1)
        elif key in grpo:
            raise _grpo_error(key)
    if "--config" not in argv:
        return argv
    at = argv.index("--config") + 1
    with open(argv[at], encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict) or not grpo & set(config):
        return argv
    for key in sorted(grpo & set(config)):
        if key not in GRPO_RENAMES:
            raise _grpo_error(key)
        if GRPO_RENAMES[key] in config:
            raise ValueError(
                f"The config sets both `{key}` and `{GRPO_RENAMES[key]}` (the same field): keep one."
            )
        config[GRPO_RENAMES[key]] = config.pop(key)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    argv[at] = f.name
    return argv


def _prepare(argv: Sequence[str] | None) -> tuple[list[str], str]:
    """The arguments with a shipped recipe's name made a path and GRPO's names made HS-STaR's, and the objective."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv[:-1]:
        at = argv.index("--config") + 1
        argv[at] = shipped("recipes", argv[at])
    objective = _peek_objective(argv)
    return (argv if objective == "grpo" else translate_grpo(argv, objective)), objective


def parse(argv: Sequence[str] | None = None):
    argv, objective = _prepare(argv)
    return make_parser(objective).parse_args_and_config(args=argv)


def _load_problems(script_args: HSStarScriptArguments, training_args):
    """The training problems and the held-out ones (``None``: only the toy world holds some out)."""
    from datasets import load_dataset

    if script_args.dataset_name == TOY:
        train = toy_dataset(script_args, training_args.seed)
        held_out = toy_eval_dataset(script_args, training_args.seed, train["id"])
        if held_out is not None:
            held_out = _as_chat(held_out, "prompt", script_args.system_prompt)
        return _as_chat(train, "prompt", script_args.system_prompt), held_out
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
    return _as_chat(dataset, column, script_args.system_prompt), None


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


TRL_REWARDS = (
    "accuracy_reward",
    "reasoning_accuracy_reward",
    "think_format_reward",
    "get_soft_overlong_punishment",
)
"""TRL's reward functions by name, as TRL's GRPO script resolves them."""


def load_reward_func(spec: str, max_completion_length: int | None = None):
    """A reward function named in a YAML: ``oracle`` (the toy world's step checker), one of TRL's rewards by
    name (:data:`TRL_REWARDS`), or an import path, ``package.module.function`` (as TRL's GRPO script reads it,
    the working directory importable) or ``package.module:function``."""
    if spec in TOY_REWARDS:
        return toy_reward(spec)
    if spec in TRL_REWARDS:
        import trl.rewards

        if spec == "get_soft_overlong_punishment":  # a factory: GRPO's script sizes it for its completions
            length = max_completion_length or 1280
            return trl.rewards.get_soft_overlong_punishment(
                max_completion_len=length, soft_punish_cache=length // 5
            )
        return getattr(trl.rewards, spec)
    module, sep, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not sep or not module or not name:
        raise ValueError(
            f"`reward_funcs` entry {spec!r} is not a reward function: give one of TRL's rewards {list(TRL_REWARDS)}, "
            "'oracle', or an import path such as 'my_rewards.correctness' (or 'my_rewards:correctness')."
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a rewards file beside the YAML, as with TRL's scripts
    try:
        func = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"`reward_funcs` entry {spec!r} cannot be imported: {error}.") from error
    if not callable(func):
        raise ValueError(f"`reward_funcs` entry {spec!r} is a {type(func).__name__}, not a function.")
    return func


def _load_reward_funcs(script_args: HSStarScriptArguments, training_args=None):
    funcs: list = []
    if script_args.reward_model_name_or_path:
        funcs.append(script_args.reward_model_name_or_path)
    length = getattr(training_args, "max_completion_length", None)
    funcs += [load_reward_func(spec, length) for spec in script_args.reward_funcs or []]
    return funcs or None


def main(script_args: HSStarScriptArguments, training_args, model_args: ModelConfig):
    """Build the trainer from parsed arguments and run the HS-STaR loop."""
    from trl import get_peft_config, get_quantization_config

    from .trainer import HSStarDPOTrainer, HSStarTrainer, iteration_table

    problems, eval_problems = _load_problems(script_args, training_args)
    reward_funcs = _load_reward_funcs(script_args, training_args)

    model = model_args.model_name_or_path
    model = toy_model_path() if model == TOY else model
    # TRL's model fields, then the user's `model_init_kwargs`, loading safely (models.safe_loading)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
        **safe_loading(training_args),
    }

    if script_args.objective == "grpo":
        return _main_grpo(script_args, training_args, model_args, model, problems, reward_funcs)
    trainer_cls = HSStarDPOTrainer if script_args.objective == "dpo" else HSStarTrainer
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=problems,
        eval_dataset=eval_problems,
        reward_funcs=reward_funcs,
        reward_weights=script_args.reward_weights,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    done = len(trainer.iteration_stats)
    if not trainer.iterations_run:
        trainer.accelerator.print(
            f"HS-STaR: nothing to do, this run finished earlier ({done} iterations); model in "
            f"{training_args.output_dir}"
        )
    else:
        trainer.accelerator.print(f"HS-STaR finished: {done} iterations, model in {training_args.output_dir}")
    initial = os.path.join(training_args.output_dir, "eval-initial", "eval_summary.json")
    if eval_problems is not None and os.path.exists(initial):
        with open(initial, encoding="utf-8") as f:
            trainer.accelerator.print(
                f"held-out greedy accuracy before the first iteration: {json.load(f)['greedy']:.3f}"
            )
    trainer.accelerator.print(iteration_table(trainer.iteration_stats))
    for stats in trainer.iteration_stats:
        for warning in stats.get("warnings", []):
            trainer.accelerator.print(f"warning (iteration {stats['iteration']}): {warning}")
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


def _main_grpo(script_args, training_args, model_args, model, problems, reward_funcs):
    """``objective: grpo``: TRL's GRPO with HS-STaR's allocation of rollouts (docs/grpo.md)."""
    from trl import get_peft_config

    from .grpo import HSStarGRPOTrainer

    if script_args.reward_model_name_or_path:
        raise ValueError(
            "`reward_model_name_or_path` (a process reward model for difficulty) is not read by the GRPO recipe "
            "yet: build HSStarGRPOTrainer in Python with `process_reward_model=`, or remove the field."
        )
    if not reward_funcs:
        raise ValueError(
            "`reward_funcs` is required with `objective: grpo`: e.g. [trl_hsstar.rewards.answer_reward] (1 for a "
            "right answer), which is also the accuracy HS-STaR reads (`accuracy_reward_index`)."
        )
    trainer = HSStarGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=problems,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(
        f"HS-STaR GRPO finished: {trainer.state.global_step} steps, rollouts by level when drawn "
        f"{dict(trainer.rollouts)}; model in {training_args.output_dir}"
    )
    return trainer


def _without(args: list[str], subsequence: list[str]) -> list[str]:
    """``args`` without the ordered ``subsequence`` (the launch arguments the parser did not know)."""
    it, out = iter(subsequence), []
    current = next(it, None)
    for item in args:
        if current is not None and item == current:
            current = next(it, None)
        else:
            out.append(item)
    return out


def run(argv: Sequence[str] | None = None, launch: bool = True) -> int:
    """``hsstar train``: parse the recipe; arguments it does not know (``--num_processes 2``,
    ``--accelerate_config multi_gpu``, in the YAML or on the command line) go to ``accelerate launch``, which runs
    this module in each process, as ``trl sft`` does. Without any, the run happens in this process."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv, objective = _prepare(argv)
    *parsed, config_rest, cli_rest = make_parser(objective, prog="hsstar train").parse_args_and_config(
        args=argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if not launch:  # a process accelerate started: the launch settings were its parent's
        if cli_rest:
            raise SystemExit(f"unrecognized arguments: {' '.join(cli_rest)}")
        main(*parsed)
        return 0
    if not config_rest and not cli_rest:
        main(*parsed)
        return 0
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_args = config_rest + cli_rest
    if "--accelerate_config" in launch_args[:-1]:
        at = launch_args.index("--accelerate_config")
        launch_args[at : at + 2] = ["--config_file", shipped("accelerate", launch_args[at + 1])]
    command = [*launch_args, "--module", "trl_hsstar.recipe", *_without(argv, cli_rest)]
    launch_command(launch_command_parser().parse_args(command))
    return 0


if __name__ == "__main__":  # each process of `hsstar train --num_processes N ...`
    sys.exit(run(launch=False))
