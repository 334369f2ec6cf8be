"""Work-arounds for the stack's known defects, each small and named after what it fixes."""

from __future__ import annotations

import torch

__all__ = ["keep_bnb_4bit_weights_trainable_on_cpu", "load_checkpoint"]


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


def load_checkpoint(trainer, model_dir) -> None:
    """Load a saved iteration's weights (or adapter, for PEFT) into ``trainer.model``.

    transformers has no public call that loads a checkpoint into a live model for every layout (full weights,
    sharded, safetensors, PEFT adapters); its Trainer resumes through this private method, and so do we.
    ``tests/test_compat.py`` fails when its signature changes.
    """
    trainer._load_from_checkpoint(str(model_dir))
