"""Work-arounds for the stack's known defects, each small and named after what it fixes."""

from __future__ import annotations

import logging
import re

import torch

__all__ = [
    "GRPOSeams",
    "keep_bnb_4bit_weights_trainable_on_cpu",
    "load_checkpoint",
    "save_model_without_push",
]


def keep_bnb_4bit_weights_trainable_on_cpu(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the layers changed.

    bitsandbytes (0.50) repacks a ``Linear4bit`` weight into a CPU inference layout the first time the layer runs
    in eval mode without gradients on a CPU with AVX512-BF16 (as when HS-STaR samples), and keeps that layout when
    training resumes: the backward pass then goes through ``gemv_4bit``, which has no autograd kernel, and every
    LoRA gradient is zero. Turning the repacking off keeps the trainable layout (and unpacks any weight already
    repacked).
    """
    try:
        from bitsandbytes.nn import Linear4bit
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes, nothing to fix
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state
                )
            changed += 1
    return changed


class _TiedHeadIsNotMissing(logging.Filter):
    """Drops transformers' "missing keys" warning when the only key missing is an output head tied to the input
    embedding: the checkpoint holds it once, under the embedding's name, and loading it fills both."""

    def __init__(self, tied: set[str]):
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "missing keys" not in message:
            return True
        return not self.tied or not all(name in self.tied for name in re.findall(r"'([^']+)'", message))


def load_checkpoint(trainer, model_dir) -> None:
    """Load a saved iteration's weights (or adapter, for PEFT) into ``trainer.model``.

    transformers has no public call that loads a checkpoint into a live model for every layout (full weights,
    sharded, safetensors, PEFT adapters); its Trainer resumes through this private method, and so do we.
    ``tests/test_compat.py`` fails when its signature changes.
    """
    config = getattr(trainer.model, "config", None)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    quiet = _TiedHeadIsNotMissing(tied)
    log = logging.getLogger("transformers.trainer")
    log.addFilter(quiet)
    try:
        trainer._load_from_checkpoint(str(model_dir))
    finally:
        log.removeFilter(quiet)


def save_model_without_push(trainer, output_dir: str) -> None:
    """``trainer.save_model(output_dir)`` without the Hub upload that ``push_to_hub=True`` adds to every call.

    transformers skips that upload only for its own saves, flagged by the ``_internal_call`` argument; an HS-STaR
    run saves each iteration's model this way and pushes once per iteration end itself (:mod:`trl_hsstar.hub`).
    """
    trainer.save_model(output_dir, _internal_call=True)


class GRPOSeams:
    """The two protected ``GRPOTrainer`` methods ``HSStarGRPOTrainer`` overrides, put before ``GRPOTrainer`` in its
    bases and forwarded to public hooks of the trainer:

    - ``_get_train_sampler``: GRPO's ``RepeatSampler`` decides which prompts each generation round rolls out; the
      trainer's ``rollout_sampler()`` replaces it (``None`` keeps TRL's);
    - ``_calculate_rewards``: returns the rewards of all processes' completions (gathered); the trainer's
      ``observe_rewards(inputs, prompts, completions, rewards_per_func)`` sees them, unchanged.

    TRL has no public hook for either (huggingface/trl#3708). ``tests/test_compat.py`` fails when their signatures
    change.
    """

    def _get_train_sampler(self, dataset=None):
        sampler = self.rollout_sampler()
        return super()._get_train_sampler(dataset) if sampler is None else sampler

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.observe_rewards(inputs, prompts, completions, rewards_per_func)
        return rewards_per_func
