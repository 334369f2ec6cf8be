"""The toy world's part of the recipes: its ``toy_*`` fields, its problems, its reasoner and its reward.

``dataset_name: toy`` and ``model_name_or_path: toy`` in a recipe select the embedded arithmetic world and its tiny
reasoner, shipped with the package (no download, nothing trained before the loop); ``reward_funcs: [oracle]`` is
its step checker. :func:`trl_hsstar.recipe.main` calls in here for these names only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_type_hints

__all__ = [
    "TOY",
    "TOY_REWARDS",
    "ToyArguments",
    "toy_arguments",
    "toy_dataset",
    "toy_eval_dataset",
    "toy_model_path",
    "toy_reward",
    "with_toy_arguments",
]

TOY = "toy"
"""The ``dataset_name`` and ``model_name_or_path`` that select the toy world."""

TOY_REWARDS = ("oracle",)
"""The toy world's reward functions by name (``reward_funcs``)."""


@dataclass
class ToyArguments:
    """The toy world's recipe fields (read only with ``dataset_name: toy``)."""

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


def with_toy_arguments(cls: type) -> type:
    """``cls`` (a dataclass of script arguments) with the ``toy_*`` fields added last, under the same name."""
    # real types: the generated class's module cannot resolve this module's string annotations
    hints = get_type_hints(ToyArguments)
    toy = [
        (
            f.name,
            hints[f.name],
            field(default=f.default, default_factory=f.default_factory, metadata=f.metadata),
        )
        for f in dataclasses.fields(ToyArguments)
    ]
    return dataclasses.make_dataclass(cls.__name__, toy, bases=(cls,), namespace={"__doc__": cls.__doc__})


def toy_arguments(args: Any) -> ToyArguments:
    """The toy fields of ``args`` (parsed script arguments), their defaults where ``args`` has none."""
    names = [f.name for f in dataclasses.fields(ToyArguments)]
    return ToyArguments(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def toy_dataset(args: Any, seed: int):
    """The training problems: ``toy_num_problems`` drawn with ``seed``, prompts in the ``prompt`` column."""
    from . import generate_problems

    toy = toy_arguments(args)
    problems = generate_problems(
        toy.toy_num_problems, operands=tuple(toy.toy_operands), digits=tuple(toy.toy_digits), seed=seed
    )
    return _dataset(problems, toy)


def toy_eval_dataset(args: Any, seed: int, train_ids):
    """``toy_num_eval_problems`` held-out problems (drawn with ``seed + 1``), none of ``train_ids``; ``None`` if 0."""
    from . import generate_problems

    toy = toy_arguments(args)
    if not toy.toy_num_eval_problems:
        return None
    seen = set(train_ids)
    pool = generate_problems(
        toy.toy_num_eval_problems + len(seen),
        operands=tuple(toy.toy_operands),
        digits=tuple(toy.toy_digits),
        seed=seed + 1,
    )
    return _dataset([p for p in pool if p.id not in seen][: toy.toy_num_eval_problems], toy)


def _dataset(problems, toy: ToyArguments):
    from datasets import Dataset

    from . import problems_to_dataset_dict

    dataset = Dataset.from_dict(problems_to_dataset_dict(problems))
    if toy.toy_words:
        words = [f"What is {p.expression.replace('+', ' + ').replace('-', ' - ')}?" for p in problems]
        dataset = dataset.remove_columns("prompt").add_column("prompt", words)
    return dataset


def toy_model_path() -> str:
    """The shipped tiny reasoner that ``model_name_or_path: toy`` names."""
    from .world import toy_reasoner_path

    return str(toy_reasoner_path())


def toy_reward(name: str):
    """The toy reward function ``name`` (one of :data:`TOY_REWARDS`): ``oracle``, the exact step checker."""
    if name not in TOY_REWARDS:
        raise ValueError(f"{name!r} is not a toy reward; valid: {list(TOY_REWARDS)}.")
    from .oracle import OracleStepReward

    return OracleStepReward()
