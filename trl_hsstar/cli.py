"""The ``hsstar`` command.

``hsstar train --config x.yaml [--field value ...]``
    Run the HS-STaR loop from a recipe YAML (the trainer follows the YAML's ``objective``: sft or dpo); the
    same as ``accelerate launch recipes/hsstar.py --config x.yaml``.
``hsstar world``
    Print problems of the embedded arithmetic world with their reference rationales and step labels.

``hsstar demo`` and ``hsstar bench`` arrive next.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def _world(args: argparse.Namespace) -> int:
    from .toy.problems import generate_problems, label_steps

    problems = generate_problems(
        args.num_problems, operands=(2, args.max_operands), digits=args.digits, seed=args.seed
    )
    for p in problems:
        print(f"--- {p.id}  (operands={p.num_operands}, digits={p.digits}, answer={p.answer})")
        print(p.prompt + p.rationale())
        print(f"step labels: {label_steps(p, p.rationale())}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .recipe import run

    return run(args.recipe_args)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsstar",
        description=(
            "HS-STaR on TRL: sample a model's own solutions, estimate each problem's difficulty from answer "
            "accuracy and a process reward model, spend the budget on boundary problems, train, repeat."
        ),
        epilog="Coming next: `hsstar demo`, `hsstar bench`. See docs/.",
    )
    parser.add_argument("--version", action="version", version=f"trl-hsstar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="run the HS-STaR loop from a recipe YAML: hsstar train --config recipes/configs/toy_cpu.yaml",
        add_help=False,
    )
    train.add_argument("recipe_args", nargs=argparse.REMAINDER, help="--config x.yaml and field overrides")
    train.set_defaults(func=_train)
    world = sub.add_parser("world", help="print problems of the embedded arithmetic world")
    world.add_argument("--num-problems", type=int, default=3)
    world.add_argument("--max-operands", type=int, default=4)
    world.add_argument("--digits", type=int, default=1)
    world.add_argument("--seed", type=int, default=0)
    world.set_defaults(func=_world)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv[1:2]):
        # everything after `train` belongs to the recipe's TrlParser (argparse's REMAINDER drops leading --options)
        return _train(argparse.Namespace(recipe_args=argv[1:]))
    parser = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
