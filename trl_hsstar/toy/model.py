"""Tiny, freshly initialised Llama models for the toy arithmetic world (CPU friendly, no download).

The same tiny config backs the policy (causal LM), a token-classification PRM (one label per token, read
at the step separators) and a sequence-classification verifier / reward model.
"""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "causal-lm": LlamaForCausalLM,
    "token-classification": LlamaForTokenClassification,
    "sequence-classification": LlamaForSequenceClassification,
}


def _check_task(task: str) -> None:
    if task not in MODEL_CLASSES:
        raise ValueError(f"unknown task {task!r}; valid tasks are {sorted(MODEL_CLASSES)}")


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str = "causal-lm",
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    head_dim: int = 32,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    num_labels: int = 2,
) -> LlamaConfig:
    """The ``LlamaConfig`` used by ``build_tiny_model``.

    The vocabulary size and pad/bos/eos ids come from ``tokenizer``. Only the causal LM ties its input and
    output embeddings; ``num_labels`` is used by the classification tasks.
    """
    _check_task(task)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=task == "causal-lm",
        num_labels=num_labels,
        dtype="float32",
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase, *, task: str = "causal-lm", seed: int = 0, **config_kwargs
) -> PreTrainedModel:
    """A freshly initialised float32 Llama model for ``task``.

    ``task`` is ``"causal-lm"`` (``LlamaForCausalLM``), ``"token-classification"``
    (``LlamaForTokenClassification``) or ``"sequence-classification"``
    (``LlamaForSequenceClassification``); ``config_kwargs`` are those of :func:`tiny_llama_config`
    (``hidden_size``, ``num_hidden_layers``, ...). The same ``seed`` gives identical weights; the
    caller's global torch RNG state is left untouched. Like ``from_pretrained``, the model is returned
    in eval mode.
    """
    config = tiny_llama_config(tokenizer, task=task, **config_kwargs)
    # fork_rng restores the CPU (and any CUDA) RNG state that manual_seed changes.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MODEL_CLASSES[task](config)
    return model.to(torch.float32).eval()
