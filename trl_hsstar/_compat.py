"""Work-arounds for the stack's known defects, each small and named after what it fixes."""

from __future__ import annotations

import logging
import re

import torch

__all__ = [
    "GRPOSeams",
    "concat_groups",
    "create_model",
    "keep_bnb_4bit_weights_trainable_on_cpu",
    "load_checkpoint",
    "save_model_without_push",
    "tensorboard_writer",
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


def create_model(model_id: str, **kwargs):
    """A causal LM loaded the way TRL's trainers load one (``trl.trainer.utils``, which TRL does not export)."""
    from trl.trainer.utils import create_model_from_path

    return create_model_from_path(model_id, **kwargs)


def tensorboard_writer(callback):
    """The ``SummaryWriter`` of transformers' TensorBoard callback (``None`` for any other callback, or before it
    starts): the completions table goes to the run's own event file."""
    return getattr(callback, "tb_writer", None)


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
      ``observe_rewards(inputs, prompts, completions, rewards_per_func)`` sees them, unchanged;
    - ``_generate_and_score_completions``: one generation round, scored, with TRL's advantages; the trainer's
      ``generate_rollouts(inputs, generate)`` may call it again (DAPO's refills) before the batch trains.

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

    def _generate_and_score_completions(self, inputs):
        return self.generate_rollouts(inputs, super()._generate_and_score_completions)


# TRL left-pads the prompt's tensors and right-pads every other per-token tensor
_PROMPT_SIDE = ("prompt_ids", "prompt_mask")
_GROUPABLE = {
    "prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "old_per_token_logps",
    "importance_sampling_ratio", "sampling_per_token_logps", "ref_per_token_logps", "tool_mask",
}  # fmt: skip


def concat_groups(
    rounds: list[dict], picks: list[tuple[int, int]], group_size: int, pad_token_id: int, accelerator
) -> dict:
    """One training batch from the groups ``picks`` (round, group) of several ``_generate_and_score_completions``
    outputs: each tensor's rows taken and re-padded to the longest round (ids with ``pad_token_id``, masks and
    scores with 0), ``num_items_in_batch`` counted again over all processes. A key outside the text layout
    (images, multimodal ids) raises: refills are text-only."""
    unknown = set(rounds[0]) - _GROUPABLE - {"num_items_in_batch"}
    if unknown:
        raise ValueError(
            f"`allocation='dapo'` refills text batches only; this batch also holds {sorted(unknown)}."
        )
    batch = {}
    for key in [key for key in rounds[0] if key != "num_items_in_batch"]:
        rows = [rounds[r][key][g * group_size : (g + 1) * group_size] for r, g in picks]
        if rows[0].dim() > 1:
            width = max(row.size(1) for row in rows)
            value = pad_token_id if key.endswith("_ids") else 1 if key == "tool_mask" else 0
            left = key in _PROMPT_SIDE
            rows = [
                torch.nn.functional.pad(
                    row, (width - row.size(1), 0) if left else (0, width - row.size(1)), value=value
                )
                for row in rows
            ]
        batch[key] = torch.cat(rows)
    loss_mask = batch["completion_mask"] * batch.get("tool_mask", 1)
    batch["num_items_in_batch"] = accelerator.gather(loss_mask.sum()).sum()
    return batch
