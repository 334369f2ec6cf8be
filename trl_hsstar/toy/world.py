"""The embedded world's reasoner, built once per configuration and cached on disk.

``toy_reasoner_path(...)`` returns a directory holding a tiny Llama and its character tokenizer, trained from
scratch on the CPU (:func:`~trl_hsstar.toy.train.pretrain_reasoner`), loadable with ``from_pretrained``. The
directory is keyed by a hash of the configuration, so a change of any knob builds a new model and a cached one is
reused; it is written to a temporary directory and renamed into place, so a killed build leaves nothing that
looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

__all__ = ["DEFAULT_REASONER", "cache_root", "toy_reasoner_path"]

DEFAULT_REASONER = {
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
    "seed": 0,
}


def cache_root() -> Path:
    """``$TRL_HSSTAR_CACHE``, else ``$XDG_CACHE_HOME/trl_hsstar``, else ``~/.cache/trl_hsstar``."""
    if os.environ.get("TRL_HSSTAR_CACHE"):
        return Path(os.environ["TRL_HSSTAR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trl_hsstar"


def toy_reasoner_path(cache_dir: str | os.PathLike | None = None, **overrides) -> Path:
    """Build (or reuse) the toy reasoner for this configuration and return its directory."""
    unknown = set(overrides) - set(DEFAULT_REASONER)
    if unknown:
        raise ValueError(
            f"unknown toy reasoner settings {sorted(unknown)}; valid: {sorted(DEFAULT_REASONER)}"
        )
    settings = {**DEFAULT_REASONER, **overrides}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    path = root / f"toy-reasoner-{key}"
    if (path / "config.json").exists():
        return path

    from .model import build_tiny_model
    from .tokenizer import build_char_tokenizer
    from .train import pretrain_reasoner

    tokenizer = build_char_tokenizer()
    arch = {k: settings[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim")}
    model = build_tiny_model(
        tokenizer, intermediate_size=settings["intermediate_size"], seed=settings["seed"], **arch
    )
    pretrain_reasoner(  # seeds its own forked RNG
        model,
        tokenizer,
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        operands=tuple(settings["operands"]),
        digits=tuple(settings["digits"]),
        seed=settings["seed"],
    )
    tmp = root / f".toy-reasoner-{key}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "toy_reasoner.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return path
