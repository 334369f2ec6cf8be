"""Seeded weight noise for studies and tests: another floating-point path stood in by a tiny nudge, or a checkpoint
with the same architecture and other outputs (to check that an engine serves a new checkpoint).

Research tools: no installed command runs them, so they live here, beside the studies that use them.
"""

from __future__ import annotations

import torch


def add_weight_noise(model, scale: float, *, seed: int, relative: bool = False):
    """Add seeded Gaussian noise (sd ``scale``) to every weight of ``model`` in place; with ``relative`` the noise
    is scaled by each weight (``w * (1 + scale * N(0, 1))``). Returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            if relative:
                p.mul_(1 + noise)
            else:
                p.add_(noise)
    return model


def perturbed_copy(src, dst, scale: float = 0.02, seed: int = 1):
    """Save to ``dst`` the causal LM at ``src`` with seeded Gaussian noise (sd ``scale``) added to every weight, and
    its tokenizer: the same architecture with other outputs, e.g. to check that an engine serves a new checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    add_weight_noise(model, scale, seed=seed)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst
