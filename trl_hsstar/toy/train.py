"""Teach a tiny model the toy world's rationale format from scratch (the cold-start SFT, M_0).

A plain torch loop, fresh problems every batch, loss on the completion only (prompt tokens masked), AdamW with
linear warm-up and cosine decay. It gives a weak reasoner: reliable on short sums, unreliable on long ones, which
is what HS-STaR needs to have easy, boundary and hard problems.
"""

from __future__ import annotations

import math

import torch

from .problems import generate_problems

__all__ = ["pretrain_reasoner"]


def _batch(tokenizer, problems, device):
    eos = tokenizer.eos_token_id
    seqs, labels = [], []
    for p in problems:
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        completion = tokenizer(p.rationale(), add_special_tokens=False)["input_ids"] + [eos]
        seqs.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels], device=device)
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    return input_ids, attention, label_ids


def pretrain_reasoner(
    model,
    tokenizer,
    *,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    warmup_steps: int = 20,
    operands: int | tuple[int, int] = (2, 4),
    digits: int | tuple[int, int] = 1,
    ops: str = "+",
    seed: int = 0,
) -> list[float]:
    """Train ``model`` in place on reference rationales; returns the loss per step."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    was_training = model.training
    model.train()
    losses = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for step in range(steps):
            problems = generate_problems(
                batch_size,
                operands=operands,
                digits=digits,
                ops=ops,
                seed=seed * 1_000_003 + step,
                unique=False,
            )
            input_ids, attention, labels = _batch(tokenizer, problems, device)
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.train(was_training)
    return losses
