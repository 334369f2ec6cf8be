"""The embedded world's models: M_0, the tests' tiny reasoner and the PRM, shipped as fixed checkpoints.

The package ships them under ``trl_hsstar/toy/checkpoints/`` (``tiny``, ``m0``, ``prm``: safetensors, a few MB),
made by one seeded command, ``hsstar world build``, which writes a ``build.json`` beside each (command, seed,
steps, CPU, torch version, sha256 of the weights). ``toy_reasoner_path()`` and ``toy_prm_path()`` return the
shipped directories, so nothing is trained on the user's machine and every CPU loads the same weights (a model
trained here would differ with the CPU's floating-point path). With other settings, or with
``TRL_HSSTAR_WORLD_SEED`` set (the same models rebuilt from another seed), they build the model once and cache it,
keyed by :data:`WORLD_VERSION` and the settings; a build is written to a temporary directory and renamed into
place, so a killed build leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from .._utils import publish_dir
from ..models import cache_root, sha256_file
from .problems import ArithmeticProblem, generate_problems

__all__ = [
    "CHECKPOINTS",
    "DEFAULT_REASONER",
    "DPO_LEARNING_RATE",
    "HELD_OUT_PER_LEVEL",
    "LEVELS",
    "REASONER_PRESETS",
    "SFT_LEARNING_RATE",
    "WORLD_VERSION",
    "build_reasoner",
    "build_world",
    "cache_root",
    "cpu_name",
    "evaluate_levels",
    "held_out_problems",
    "level_of",
    "level_problems",
    "shipped",
    "toy_prm_path",
    "toy_reasoner_path",
    "world_seed",
]

WORLD_VERSION = 2
"""Version 2: any order and grouping of the terms is a valid path. A model cached for another version is never
reused (the cache key holds the version)."""
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
"""Where the package's world models live: ``tiny``, ``m0`` and ``prm``."""

LEVELS: tuple[str, ...] = ("3x1", "4x1", "5x1", "6x1", "7x1", "8x1", "2x2")
"""The world's difficulty levels, ``"<operands>x<digits>"`` (``"6x1"``: six one-digit operands). M_0 solves the
short one-digit sums, is unreliable on the long ones and rarely solves two-digit sums, so a pool drawn across the
levels has real easy, boundary and hard shares."""

SFT_LEARNING_RATE = 1e-4
"""The world's SFT rate: at 3e-4 one iteration could move held-out accuracy by 0.1 either way (the equal-budget
study of an earlier M_0, docs/benchmarks.md); at 1e-4 every method gained, iteration after iteration."""
DPO_LEARNING_RATE = 1.5e-5
"""The world's DPO rate: at 1.5e-4 (the release's DPO/SFT ratio of 0.5 applied to 3e-4) every method fell below
M_0 in that study; at 1.5e-5 every method gained and the seeds agreed."""

REASONER_PRESETS: dict[str, dict] = {
    # A few seconds to build: the tests' and the quick recipe's reasoner (one-digit sums of 2 to 5 operands).
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "head_dim": 32,
        "intermediate_size": 128,
        "steps": 450,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "operands": [2, 5],
        "digits": [1, 1],
        "mix": None,
        "target_accuracy": None,
        "probe_per_cell": 0,
        "check_every": 20,
        "refine_every": None,
        "schedule_steps": None,
        "micro_batches": 1,
        "seed": 0,
        "data_seed": None,
    },
    # M_0 of `hsstar demo` and `hsstar bench` (shipped): about 0.7M parameters, trained on random run paths over a
    # mix skewed to short one-digit sums (so long sums and two-digit sums stay hard) until its greedy accuracy on a
    # probe reaches `target_accuracy` (the stop found to `refine_every` steps among weights kept between probe
    # runs). Built once by `hsstar world build` (about 10 minutes on 2 cores); users load the shipped weights.
    "m0": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "head_dim": 32,
        "intermediate_size": 256,
        "steps": 2000,
        "schedule_steps": None,
        "target_accuracy": 0.65,
        "probe_per_cell": 40,
        "check_every": 20,
        "refine_every": 5,
        "micro_batches": 2,
        "batch_size": 64,
        "learning_rate": 3e-3,
        "operands": [2, 8],
        "digits": [1, 1],
        "mix": [[2, 1, 3], [3, 1, 3], [4, 1, 2], [5, 1, 2], [6, 1, 1], [7, 1, 1], [8, 1, 1]],
        "seed": 0,
        "data_seed": None,
    },
}
DEFAULT_REASONER = REASONER_PRESETS["tiny"]


def cpu_name() -> str:
    """The CPU's model name where the system tells it (``/proc/cpuinfo``), else the machine type."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _accuracy_reached(settings: dict, tokenizer, model):
    """``stop_when`` for M_0: greedy accuracy on a probe (``probe_per_cell`` problems of each trained cell, never
    a held-out problem) reaches ``target_accuracy``. Stopping on a measured accuracy rather than a step count
    follows the jump in accuracy wherever the machine's floating-point path puts it (tens of steps earlier or
    later); how strong M_0 is at the stop still varies from path to path (``benchmarks/bench_m0.py``)."""
    if not settings["mix"] or settings["probe_per_cell"] < 1:
        raise ValueError("`target_accuracy` needs a `mix` to probe and `probe_per_cell` >= 1.")
    cells = [f"{k}x{d}" for k, d, _ in settings["mix"]]
    probe = level_problems(
        cells,
        settings["probe_per_cell"],
        seed=HELD_OUT_SEED + 1,
        exclude=held_out_problems(),
    )

    # A quarter of the probe screens first: while it is far below the target (0.2 below is over three standard
    # deviations of its sampling error at 10 problems a cell), the whole probe is not run.
    per, share = settings["probe_per_cell"], max(1, settings["probe_per_cell"] // 4)
    screen = [p for i in range(len(cells)) for p in probe[i * per : i * per + share]]

    def stop(step: int) -> bool:
        target = settings["target_accuracy"]
        if share < per and evaluate_levels(model, tokenizer, screen)["all"] < target - 0.2:
            return False
        return evaluate_levels(model, tokenizer, probe)["all"] >= target

    return stop


def build_reasoner(settings: dict, *, progress: bool = False):
    """Train a reasoner from the full ``settings`` of a preset; returns ``(model, tokenizer, build)``, ``build``
    saying how many steps it trained and how long it took, on which CPU and torch threads."""
    import time

    import torch

    from . import model as toy_model
    from .tokenizer import build_char_tokenizer
    from .train import pretrain_reasoner

    tokenizer = build_char_tokenizer()
    arch = {k: settings[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim")}
    model = toy_model.build_tiny_model(
        tokenizer, intermediate_size=settings["intermediate_size"], seed=settings["seed"], **arch
    )
    started = time.monotonic()
    losses = pretrain_reasoner(  # seeds its own forked RNG
        model,
        tokenizer,
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        operands=tuple(settings["operands"]),
        digits=tuple(settings["digits"]),
        mix=settings["mix"],
        schedule_steps=settings["schedule_steps"],
        micro_batches=settings["micro_batches"],
        seed=settings["seed"],
        data_seed=settings["data_seed"],
        stop_when=None
        if settings["target_accuracy"] is None
        else _accuracy_reached(settings, tokenizer, model),
        check_every=settings["check_every"],
        refine_every=settings["refine_every"],
        progress=progress,
    )
    build = {
        "steps_trained": len(losses),
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.monotonic() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
    }
    return model, tokenizer, build


def world_seed() -> int | None:
    """``TRL_HSSTAR_WORLD_SEED`` as an int, else None: with it set, the world's models are rebuilt from that seed
    instead of loaded from the package (a check that nothing depends on the shipped weights)."""
    value = os.environ.get("TRL_HSSTAR_WORLD_SEED", "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"TRL_HSSTAR_WORLD_SEED must be an integer seed, got {value!r}.") from None


def shipped(name: str) -> Path | None:
    """The package's checkpoint ``name`` (``"tiny"``, ``"m0"``, ``"prm"``), or None where it is not built."""
    path = CHECKPOINTS / name
    return path if (path / "model.safetensors").exists() else None


def _save(model, tokenizer, path: Path, files: dict[str, object]) -> None:
    """Write a model, its tokenizer and JSON ``files`` to a temporary directory, then rename it to ``path``; the
    weights' sha256 goes into ``build.json``."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if "build.json" in files:
        files = {
            **files,
            "build.json": {**files["build.json"], "sha256": sha256_file(tmp / "model.safetensors")},
        }
    for name, content in files.items():
        (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    publish_dir(tmp, path)  # `hsstar world build` replaces what it built before


def _cached(kind: str, identity: dict, cache_dir) -> Path:
    """The cache directory of a model: keyed by everything that made it, the world's version included."""
    identity = {**identity, "world_version": WORLD_VERSION}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / f"{kind}-{key}"


def _reasoner_settings(preset: str, overrides: dict) -> dict:
    if preset not in REASONER_PRESETS:
        raise ValueError(f"unknown toy reasoner `preset` {preset!r}; valid: {sorted(REASONER_PRESETS)}")
    unknown = set(overrides) - set(REASONER_PRESETS[preset])
    if unknown:
        raise ValueError(
            f"unknown toy reasoner settings {sorted(unknown)}; valid: {sorted(REASONER_PRESETS[preset])}"
        )
    return {**REASONER_PRESETS[preset], **overrides}


def _write_reasoner(path: Path, preset: str, settings: dict, *, progress: bool = False) -> Path:
    model, tokenizer, build = build_reasoner(settings, progress=progress)
    files: dict[str, object] = {"toy_reasoner.json": {**settings, "world_version": WORLD_VERSION}}
    if preset != "tiny":
        files["levels.json"] = evaluate_levels(model, tokenizer, held_out_problems(), progress=progress)
    _save(model, tokenizer, path, {**files, "build.json": build})
    return path


def toy_reasoner_path(
    cache_dir: str | os.PathLike | None = None, preset: str = "tiny", *, progress: bool = False, **overrides
) -> Path:
    """The directory of the toy reasoner ``preset`` (``"tiny"``, the tests' reasoner, or ``"m0"``, the demo's).

    Without ``overrides`` it is the package's shipped checkpoint. ``overrides`` change single settings of the
    preset; then, or with ``TRL_HSSTAR_WORLD_SEED`` set (its seed, unless ``seed`` is passed), the reasoner is built (seconds for ``tiny``, minutes for
    ``m0``) and cached under ``cache_dir``. A built ``m0`` has its greedy accuracy per level (see :data:`LEVELS`)
    in ``levels.json`` beside the weights.
    """
    settings = _reasoner_settings(preset, overrides)
    seed = world_seed()
    if seed is not None and "seed" not in overrides:  # a seed passed explicitly wins
        settings = {**settings, "seed": seed}
    elif not overrides and shipped(preset) is not None:
        return CHECKPOINTS / preset
    path = _cached("toy-reasoner", settings, cache_dir)
    if (path / "config.json").exists():
        return path
    return _write_reasoner(path, preset, settings, progress=progress)


HELD_OUT_SEED = 10_007
"""Seed of the held-out evaluation problems (never drawn for training: callers pass them as ``exclude``)."""
HELD_OUT_PER_LEVEL = 100
"""Held-out problems per level by default: M_0's ``levels.json`` is its greedy accuracy on these."""


def held_out_problems(per_level: int = HELD_OUT_PER_LEVEL) -> list[ArithmeticProblem]:
    """The fixed held-out problems: ``per_level`` of every level, never drawn for training."""
    return level_problems(LEVELS, per_level, seed=HELD_OUT_SEED)


def level_of(problem: ArithmeticProblem) -> str:
    """The level name of a problem, ``"<operands>x<digits>"``."""
    return f"{problem.num_operands}x{problem.digits}"


def _parse_level(level: str) -> tuple[int, int]:
    try:
        k, d = (int(x) for x in level.split("x"))
    except ValueError:
        raise ValueError(f"level {level!r} must look like '<operands>x<digits>', e.g. '6x1'.") from None
    return k, d


def level_problems(
    levels: Sequence[str], per_level: int, *, seed: int, exclude: Iterable[str | ArithmeticProblem] = ()
) -> list[ArithmeticProblem]:
    """``per_level`` distinct problems of each level (in level order), deterministic in ``seed``."""
    exclude = list(exclude)
    problems: list[ArithmeticProblem] = []
    for i, level in enumerate(levels):
        k, d = _parse_level(level)
        problems += generate_problems(per_level, operands=k, digits=d, seed=seed * 101 + i, exclude=exclude)
    return problems


def evaluate_levels(
    model, tokenizer, problems: Sequence[ArithmeticProblem], *, batch_size: int = 128, progress: bool = False
) -> dict[str, float]:
    """Greedy answer accuracy per level (and ``"all"``, the mean over problems) of ``model`` on ``problems``."""
    from ..sampling import SamplingParams, TransformersSampler
    from ..verify import verify_answer

    sampler = TransformersSampler(model, tokenizer, batch_size=batch_size, progress=progress)
    longest = max(len(p.rationale()) for p in problems)
    outputs = sampler.generate(
        [p.prompt for p in problems],
        [1] * len(problems),
        SamplingParams(temperature=0, max_new_tokens=longest + 16),
    )
    hits: dict[str, list[bool]] = {}
    for p, (completion,) in zip(problems, outputs):
        hits.setdefault(level_of(p), []).append(verify_answer(completion.text, str(p.answer)))
    table = {level: sum(h) / len(h) for level, h in hits.items()}
    table["all"] = sum(sum(h) for h in hits.values()) / len(problems)
    return table


DEFAULT_PRM = {
    "problems_per_level": 64,
    "samples_per_problem": 4,
    "temperature": 1.0,
    "num_train_epochs": 2,
    "learning_rate": 1e-3,
    "batch_size": 32,
    "seed": 0,
}
"""How :func:`toy_prm_path` builds the world's process reward model."""


def toy_prm_path(
    reasoner_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    **overrides,
) -> Path:
    """The directory of a learned PRM for the reasoner in ``reasoner_dir``: the shipped one for the shipped M_0,
    else built once and cached.

    The reasoner samples ``samples_per_problem`` solutions (at ``temperature``) for ``problems_per_level``
    problems of every level (held-out problems excluded); the step checker labels every step; a
    token-classification model initialised from the reasoner's own weights is trained on those labels in the
    Math-Shepherd layout with :func:`~trl_hsstar.prm.train_prm`. Its held-out step accuracy (and the accuracy of
    always answering the majority label) is saved as ``prm_metrics.json`` beside the weights. Cached by the
    reasoner, the settings and :data:`WORLD_VERSION`.
    """
    unknown = set(overrides) - set(DEFAULT_PRM)
    if unknown:
        raise ValueError(f"unknown toy PRM settings {sorted(unknown)}; valid: {sorted(DEFAULT_PRM)}")
    settings = {**DEFAULT_PRM, **overrides}
    reasoner_dir = Path(reasoner_dir).resolve()
    if not overrides and reasoner_dir == CHECKPOINTS / "m0" and shipped("prm") is not None:
        return CHECKPOINTS / "prm"  # the shipped M_0's shipped PRM
    identity = {"reasoner": (reasoner_dir / "toy_reasoner.json").read_text(), **settings}
    path = _cached("toy-prm", identity, cache_dir)
    if (path / "config.json").exists():
        return path
    return _write_prm(path, reasoner_dir, settings, progress=progress)


def _write_prm(path: Path, reasoner_dir: Path, settings: dict, *, progress: bool = False) -> Path:
    import tempfile

    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    from ..prm import prm_examples, train_prm
    from ..sampling import SamplingParams, TransformersSampler
    from .problems import label_steps
    from .tokenizer import STEP_TOKEN

    tokenizer = AutoTokenizer.from_pretrained(reasoner_dir)
    policy = AutoModelForCausalLM.from_pretrained(reasoner_dir)
    held_out = held_out_problems()
    problems = level_problems(
        LEVELS, settings["problems_per_level"], seed=settings["seed"] + 1, exclude=held_out
    )
    k = settings["samples_per_problem"]
    longest = max(len(p.rationale()) for p in problems)
    outputs = TransformersSampler(policy, tokenizer, batch_size=128, progress=progress).generate(
        [p.prompt for p in problems],
        [k] * len(problems),
        SamplingParams(
            temperature=settings["temperature"], top_p=1.0, max_new_tokens=longest + 16, seed=settings["seed"]
        ),
    )
    del policy
    prompts, completions, labels = [], [], []
    for p, samples in zip(problems, outputs):
        for c in samples:
            prompts.append(p.prompt)
            completions.append(c.text)
            labels.append(label_steps(p, c.text))
    examples = prm_examples(tokenizer, prompts, completions, labels, step_token=STEP_TOKEN)
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])  # the new classification head: the same weights on every build
        model = AutoModelForTokenClassification.from_pretrained(reasoner_dir, num_labels=2)
    with tempfile.TemporaryDirectory() as scratch:
        metrics = train_prm(
            model,
            tokenizer,
            examples,
            output_dir=scratch,
            seed=settings["seed"],
            num_train_epochs=settings["num_train_epochs"],
            learning_rate=settings["learning_rate"],
            per_device_train_batch_size=settings["batch_size"],
            disable_tqdm=not progress,
            logging_strategy="no",
        )
    metrics["majority_accuracy"] = max(metrics["eval_positive_rate"], 1 - metrics["eval_positive_rate"])
    build = {"torch_threads": torch.get_num_threads(), "cpu": cpu_name(), "examples": len(examples)}
    files = {"toy_prm.json": {**settings, "world_version": WORLD_VERSION}, "prm_metrics.json": metrics}
    _save(model, tokenizer, path, {**files, "build.json": build})
    return path


def build_world(
    output_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    only: Sequence[str] = ("tiny", "m0", "prm"),
    progress: bool = False,
) -> dict[str, Path]:
    """Build the world's checkpoints from ``seed`` into ``output_dir`` (default: the package's
    :data:`CHECKPOINTS`), each with a ``build.json`` naming the command, seed, steps, CPU, torch version and the
    sha256 of its weights. The PRM is trained on the samples of the M_0 in ``output_dir``."""
    import platform

    import torch

    unknown = set(only) - {"tiny", "m0", "prm"}
    if unknown:
        raise ValueError(f"`only` names unknown checkpoints {sorted(unknown)}; valid: tiny, m0, prm.")
    out = Path(output_dir) if output_dir is not None else CHECKPOINTS
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(["hsstar", "world", "build", *sys.argv[3:]])
        if sys.argv[1:3] == ["world", "build"]
        else f"build_world(seed={seed}, only={list(only)})",
        "seed": seed,
        "world_version": WORLD_VERSION,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    paths = {}
    for name in ("tiny", "m0"):
        if name in only:
            settings = {**REASONER_PRESETS[name], "seed": seed}
            paths[name] = _write_reasoner(out / name, name, settings, progress=progress)
    if "prm" in only:
        if not (out / "m0" / "config.json").exists():
            raise ValueError(
                f"the PRM is trained on M_0's samples, and {out / 'm0'} holds no M_0: build m0 too."
            )
        paths["prm"] = _write_prm(out / "prm", out / "m0", {**DEFAULT_PRM, "seed": seed}, progress=progress)
    for path in paths.values():
        build = json.loads((path / "build.json").read_text())
        (path / "build.json").write_text(json.dumps({**record, **build}, indent=2, sort_keys=True) + "\n")
    return paths
