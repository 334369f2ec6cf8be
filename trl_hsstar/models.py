"""Policies the way users have them: a model id or path, or a GGUF file.

A GGUF file (llama.cpp's format; ``SmolLM2-135M-Instruct.Q4_1.gguf`` and most local models are shipped this way)
is quantized for inference and cannot be trained. Given its path (``model="path/to/model.gguf"``) or
``model_init_kwargs={"gguf_file": ...}``, the trainers and ``hsstar train`` de-quantize it once, with
transformers' GGUF reader (the ``gguf`` package), into a float32 safetensors checkpoint with the tokenizer from the
same file, cached under ``$TRL_HSSTAR_CACHE/gguf/`` and keyed by the file's sha256; every later run loads the
cached checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from ._utils import model_name, publish_dir

logger = logging.getLogger(__name__)

__all__ = [
    "cache_root",
    "check_trainable",
    "dequantized_gguf",
    "load_policy",
    "load_tokenizer",
    "resolve_model",
    "safe_loading",
    "sha256_file",
]


def cache_root() -> Path:
    """``$TRL_HSSTAR_CACHE``, else ``$XDG_CACHE_HOME/trl_hsstar``, else ``~/.cache/trl_hsstar``."""
    if os.environ.get("TRL_HSSTAR_CACHE"):
        return Path(os.environ["TRL_HSSTAR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trl_hsstar"


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_file(model: str, model_init_kwargs: dict) -> Path | None:
    """The local GGUF file ``model`` (and ``gguf_file``) name, or ``None`` for an ordinary checkpoint."""
    name = model_init_kwargs.get("gguf_file")
    if name is None and not model.endswith(".gguf"):
        return None
    path = Path(model) / name if name else Path(model)
    if not path.is_file() and name:  # a Hub repository holding the file
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, name, revision=model_init_kwargs.get("revision")))
    if not path.is_file():
        raise ValueError(
            f"GGUF file {str(path)!r} does not exist: pass the path of a .gguf file as `model`, or a directory (or Hub "
            "repository) as `model` with the file's name in `model_init_kwargs['gguf_file']`."
        )
    return path


def dequantized_gguf(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A trainable float32 checkpoint (model and tokenizer) made from the GGUF file ``path``, once: cached by sha256."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "gguf"
    target = root / f"{path.stem}-{sha256_file(path)[:16]}"
    if (target / "model.safetensors").exists() or (target / "model.safetensors.index.json").exists():
        return target
    try:
        import gguf  # noqa: F401 - transformers reads GGUF through it
    except ImportError:
        raise ImportError(
            f"Reading {path.name} needs the `gguf` package: `pip install gguf` (or `pip install trl-hsstar[gguf]`)."
        ) from None
    logger.info("De-quantizing %s to float32 (once; cached in %s)", path, target)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # Its weights are float32 already, but it stays marked as GGUF-quantized, which cannot be saved or trained: move
    # them into a plain model of the same config (built on the meta device, so nothing is allocated twice).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, target, keep_existing=True)  # another process may have finished first
    return target


def resolve_model(model, model_init_kwargs: dict | None):
    """``(model, model_init_kwargs)`` to load: a GGUF file becomes its cached de-quantized checkpoint."""
    kwargs = dict(model_init_kwargs or {})
    if not isinstance(model, str):
        check_trainable(model)
        return model, kwargs
    path = _gguf_file(model, kwargs)
    if path is None:
        return model, kwargs
    kwargs.pop("gguf_file", None)
    return str(dequantized_gguf(path)), kwargs


def check_trainable(model) -> None:
    """Refuse, with the fix, a model instance whose quantization cannot be trained (e.g. loaded from GGUF)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer, "is_trainable", True):
        return
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "this quantization")
    method = getattr(method, "value", method)
    raise ValueError(
        f"The model is quantized with {method}, which cannot be trained. For a GGUF file, pass its path as `model` "
        "(or the directory as `model` and `model_init_kwargs={'gguf_file': name}`): trl-hsstar de-quantizes it once "
        "to a trainable float32 checkpoint and caches it. Otherwise load the model unquantized, or with a trainable "
        "quantization (bitsandbytes 4-bit with a `peft_config`, i.e. QLoRA)."
    )


def safe_loading(args) -> dict:
    """Safe by default, for every model the run loads: remote code only if the user sets ``trust_remote_code``, and
    safetensors weights only (no unpickling); ``args.model_init_kwargs`` overrides both."""
    user = getattr(args, "model_init_kwargs", None)
    user = user if isinstance(user, dict) else {}
    return {
        "trust_remote_code": bool(user.get("trust_remote_code", getattr(args, "trust_remote_code", False))),
        "use_safetensors": user.get("use_safetensors", True),
    }


def load_policy(model, args, quantization_config=None, peft_config=None):
    """The policy as TRL's trainers load it: from an id or path with ``model_init_kwargs`` (and a quantization
    config), then wrapped in a PEFT adapter when ``peft_config`` is given (prepared for k-bit training first)."""
    from transformers import set_seed

    from ._compat import create_model

    # a GGUF file: de-quantized once, cached
    model, init_kwargs = resolve_model(model, args.model_init_kwargs)
    if isinstance(model, str):
        kwargs = {**init_kwargs, **safe_loading(args)}
        if quantization_config is not None:
            if "quantization_config" in kwargs:
                raise ValueError(
                    "`quantization_config` is set both as a trainer argument and in `args.model_init_kwargs`: set "
                    "it in one place."
                )
            kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED", "FSDP"):
            kwargs["device_map"] = (
                None  # each process loads the whole model; DDP moves it, FSDP/ZeRO shard it
            )
        set_seed(args.seed)
        model = create_model(model, **kwargs)
    if peft_config is not None:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=args.gradient_checkpointing,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            )
        set_seed(args.seed)  # the adapter's initial weights
        model = get_peft_model(model, peft_config)
    return model


def load_tokenizer(model, args):
    """The tokenizer saved with the policy, loaded as safely as the policy."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        model_name(model), trust_remote_code=safe_loading(args)["trust_remote_code"]
    )
