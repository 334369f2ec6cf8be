"""The ``hsstar`` command.

``hsstar train --config x.yaml [--field value ...] [--num_processes N --accelerate_config NAME]``
    Run the HS-STaR loop from a recipe YAML or a shipped recipe's name (``toy_cpu``; the trainer follows the
    YAML's ``objective``: sft or dpo). Arguments that are not fields go to ``accelerate launch``, as with
    ``trl sft``; ``--accelerate_config`` takes a file or a shipped name (``multi_gpu``, ``deepspeed_zero3``, ...).
    ``hsstar train --help`` lists every field.
``hsstar vllm-serve --model PATH [--python P] [--host 127.0.0.1] [--port 8000] [vllm serve arguments ...]``
    Start a vLLM server that the loop can reload in place each iteration (``vllm_mode: server``): the dev
    endpoints on, trl-hsstar's worker extension loaded, bound to loopback unless told otherwise.
``hsstar eval --model M --dataset D [--k 8 --limit N --group-by COLUMN ...]``
    Greedy accuracy, avg@k, unbiased pass@k and maj@k of a model (a directory, Hub id or .gguf file, plus an
    optional LoRA adapter) on any datasets-loadable problem set; ``eval_rows.jsonl`` and ``eval_summary.json``.
``hsstar env``
    The versions of trl-hsstar, Python, torch and the Hugging Face stack, the devices and vLLM, for bug reports
    (as ``trl env``).
``hsstar world [--num-problems 3 ...]``
    Print problems of the embedded arithmetic world with their reference rationale, other valid paths and labels.
``hsstar world build [--seed 0] [--output-dir DIR] [--only tiny m0 prm]``
    Rebuild the world's shipped checkpoints (the tests' tiny reasoner, M_0, the PRM) from a seed, each with a
    ``build.json``; by default into the package's ``trl_hsstar/toy/checkpoints``.

``hsstar demo [--output-dir runs/demo ...]``
    Build (or load) the world's M_0 and PRM, run HS-STaR iterations on the CPU and print a per-iteration table
    with held-out accuracy per level; plots and ``results.json`` go to the output directory.
``hsstar bench [--quick] ...``
    The equal-budget comparison of the allocation methods on the world (``benchmarks/bench_methods.py``): writes
    ``docs/benchmarks.md`` and a results JSON.
``hsstar bench --protocol [--objectives sft] [--report-only] ...``
    The pre-registered study of ``docs/protocol.md`` (``benchmarks/bench_study.py``): a record per run, the report
    generated from the records.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def _world(args: argparse.Namespace) -> int:
    import random

    if args.action == "build":
        from .toy.world import build_world

        for name, path in build_world(args.output_dir, seed=args.seed, only=args.only, progress=True).items():
            print(f"{name}: {path}\n{(path / 'build.json').read_text()}")
        return 0
    from .toy.problems import generate_problems, label_steps

    problems = generate_problems(
        args.num_problems, operands=(2, args.max_operands), digits=args.digits, seed=args.seed
    )
    rng = random.Random(args.seed)
    for p in problems:
        print(f"--- {p.id}  (operands={p.num_operands}, digits={p.digits}, answer={p.answer})")
        print(p.prompt + p.rationale())
        print(f"step labels: {label_steps(p, p.rationale())}")
        other = p.rationale(rng)
        print(f"another valid path: {other!r}, step labels: {label_steps(p, other)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .recipe import run

    return run(args.recipe_args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    bench_args = list(args.bench_args)
    name = "bench_methods.py"
    if "--protocol" in bench_args:  # the pre-registered study of docs/protocol.md
        bench_args.remove("--protocol")
        name = "bench_study.py"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    if not script.exists():
        raise SystemExit(
            f"`hsstar bench` runs benchmarks/{name} from a source checkout, and {script} does not exist: "
            "clone the repository and install it with `pip install -e .`."
        )
    argv, sys.argv = sys.argv, [str(script), *bench_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit:  # the script ends with sys.exit(main()), or stops with a message
        if isinstance(exit.code, int) or exit.code is None:
            return exit.code or 0
        print(exit.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = argv
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import main as evaluate

    evaluate(args)
    return 0


def environment() -> dict[str, str]:
    """What ``hsstar env`` prints: versions and devices, as ``trl env`` reports them."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    if torch.cuda.is_available():
        devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        devices = f"cpu ({torch.get_num_threads()} torch threads)"
    info = {"trl-hsstar version": __version__, "Platform": platform.platform()}
    info["Python version"] = platform.python_version()
    info["PyTorch version"] = torch.__version__
    info["accelerator(s)"] = devices
    for name in ("transformers", "trl", "accelerate", "datasets", "peft", "huggingface_hub", "math-verify"):
        info[f"{name} version"] = installed(name)
    for name in ("bitsandbytes", "deepspeed", "gguf", "tensorboard", "wandb"):
        info[f"{name} version"] = installed(name)
    info["vllm version"] = installed("vllm")  # a separate engine interpreter is the config's `vllm_python`
    return info


def _env(args: argparse.Namespace) -> int:
    info = environment()
    print("\nCopy-paste the following information when reporting an issue:\n")
    print("\n".join(f"- {key}: {value}" for key, value in info.items()))
    return 0


def _vllm_serve(args: argparse.Namespace) -> int:
    import time

    from .sampling.vllm_server import launch_vllm_server

    server = launch_vllm_server(
        args.model,
        python=args.python,
        host=args.host,
        port=args.port,
        args=args.vllm_args,
        log_path=args.log,
        timeout=args.timeout,
    )
    print(
        f"vLLM server for {args.model} at {server.url} (log: {server.log_path}); Ctrl-C stops it.", flush=True
    )
    print(
        f"In the run's config: use_vllm: true, vllm_mode: server, vllm_server_base_url: {server.url}",
        flush=True,
    )
    try:
        while server.process.poll() is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return server.process.returncode or 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsstar",
        description=(
            "HS-STaR on TRL: sample a model's own solutions, estimate each problem's difficulty from answer "
            "accuracy and a process reward model, spend the budget on boundary problems, train, repeat."
        ),
        epilog="Start with `hsstar demo`. See docs/.",
    )
    parser.add_argument("--version", action="version", version=f"trl-hsstar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="run the HS-STaR loop from a recipe YAML: hsstar train --config toy_cpu (--help: every field)",
        add_help=False,
    )
    train.add_argument("recipe_args", nargs=argparse.REMAINDER, help="--config x.yaml and field overrides")
    train.set_defaults(func=_train)
    from . import demo

    demo_parser = sub.add_parser("demo", help="watch HS-STaR work on the embedded world (CPU, a few minutes)")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=_demo)
    bench_parser = sub.add_parser(
        "bench",
        help="the equal-budget comparison of allocation methods on the world: hsstar bench [--quick]; the "
        "pre-registered study of docs/protocol.md: hsstar bench --protocol",
        add_help=False,
    )
    bench_parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="see hsstar bench --help")
    bench_parser.set_defaults(func=_bench)
    from . import evaluation

    eval_parser = sub.add_parser(
        "eval",
        help="greedy accuracy, avg@k, pass@k and maj@k of a model on a problem set (e.g. GSM8K's test split)",
    )
    evaluation.make_parser(eval_parser)
    eval_parser.set_defaults(func=_eval)
    serve = sub.add_parser(
        "vllm-serve",
        help="start a vLLM server the loop reloads each iteration (vllm_mode: server)",
        description=(
            "Start vLLM's OpenAI-compatible server with what the HS-STaR loop needs: the dev endpoints "
            "(VLLM_SERVER_DEV_MODE=1) for in-place reloads, the trl-hsstar worker extension, runtime LoRA loading. "
            "Unknown arguments go to the server, e.g. --tensor-parallel-size 8 --enable-lora --max-lora-rank 64."
        ),
    )
    serve.add_argument(
        "--model", required=True, help="the policy's starting checkpoint (for LoRA: the 16-bit base)"
    )
    serve.add_argument("--python", default=None, help="interpreter with vLLM installed (default: this one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds the server may take to start")
    serve.add_argument("--log", default=None, help="the server's log file (default: a temporary file)")
    serve.set_defaults(func=_vllm_serve, vllm_args=[])
    env = sub.add_parser("env", help="print versions and devices for a bug report (as `trl env`)")
    env.set_defaults(func=_env)
    world = sub.add_parser(
        "world", help="print problems of the embedded world, or `hsstar world build` its shipped checkpoints"
    )
    world.add_argument("action", nargs="?", choices=["show", "build"], default="show")
    world.add_argument(
        "--output-dir", default=None, help="build: where to (default: the package's checkpoints)"
    )
    world.add_argument("--only", nargs="+", default=["tiny", "m0", "prm"], choices=["tiny", "m0", "prm"])
    world.add_argument("--num-problems", type=int, default=3)
    world.add_argument("--max-operands", type=int, default=4)
    world.add_argument("--digits", type=int, default=1)
    world.add_argument("--seed", type=int, default=0)
    world.set_defaults(func=_world)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # everything after `train` belongs to the recipe's TrlParser, --help included (it lists every field)
        return _train(argparse.Namespace(recipe_args=argv[1:]))
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's own parser
        return _bench(argparse.Namespace(bench_args=argv[1:]))
    parser = make_parser()
    if argv[:1] == ["vllm-serve"]:  # arguments we do not know are the server's
        args, extra = parser.parse_known_args(argv)
        args.vllm_args = extra
    else:
        args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
