"""The ``hsstar`` command.

Sub-commands arrive with the issues that build them: ``hsstar train`` (run the HS-STaR loop from a
YAML config), ``hsstar demo`` (the loop on the embedded arithmetic world, CPU only, no downloads) and
``hsstar bench`` (the equal-budget comparison with the baselines). Today it offers ``world``, which
prints problems of the embedded world with their reference rationales and step labels.
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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsstar",
        description=(
            "HS-STaR on TRL: sample a model's own solutions, estimate each problem's difficulty from answer "
            "accuracy and a process reward model, spend the budget on boundary problems, train, repeat."
        ),
        epilog="Coming next: `hsstar train --config x.yaml`, `hsstar demo`, `hsstar bench`. See docs/.",
    )
    parser.add_argument("--version", action="version", version=f"trl-hsstar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    world = sub.add_parser("world", help="print problems of the embedded arithmetic world")
    world.add_argument("--num-problems", type=int, default=3)
    world.add_argument("--max-operands", type=int, default=4)
    world.add_argument("--digits", type=int, default=1)
    world.add_argument("--seed", type=int, default=0)
    world.set_defaults(func=_world)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
