"""Teach a tiny model the toy world's rationale format from scratch (the cold-start SFT, M_0).

A plain torch loop, fresh problems every batch, loss on the completion only (prompt tokens masked), AdamW with
linear warm-up and cosine decay. It gives a weak reasoner: reliable on short sums, unreliable on long ones, which
is what HS-STaR needs to have easy, boundary and hard problems.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .problems import generate_problems

__all__ = ["pretrain_reasoner"]


def _batch(tokenizer, examples, device):
    eos = tokenizer.eos_token_id
    seqs, labels = [], []
    for prompt_text, rationale in examples:
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion = tokenizer(rationale, add_special_tokens=False)["input_ids"] + [eos]
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
    mix: Sequence[Sequence[int]] | None = None,
    schedule_steps: int | None = None,
    micro_batches: int = 1,
    seed: int = 0,
    data_seed: int | None = None,
    stop_when: Callable[[int], bool] | None = None,
    check_every: int = 20,
    refine_every: int | None = None,
    any_order: bool = True,
    progress: bool = False,
) -> list[float]:
    """Train ``model`` in place on reference rationales; returns the loss per step.

    Each batch holds fresh problems: with ``mix`` (``[(operands, digits, weight), ...]``) each problem's cell is
    drawn with those weights, so a mix skewed to short sums gives a reasoner that is reliable on short sums and
    unreliable on long ones; without it, ``operands`` and ``digits`` are sampled uniformly per problem.

    ``schedule_steps`` (default ``steps``) is the length of the cosine schedule: stopping at ``steps`` before its
    end keeps an early checkpoint of a longer run, a weak reasoner. ``micro_batches`` splits each batch, sorted by
    length, into that many forward passes (less padding; the gradient is the same, weighted by tokens).
    ``data_seed`` (default ``seed``) seeds the problem stream, ``seed`` the torch RNG. ``stop_when(step)``, called
    every ``check_every`` steps with the model in eval mode, ends training early when it returns True. With
    ``refine_every`` (a divisor of ``check_every``) the weights are also kept every ``refine_every`` steps between
    checks, and when ``stop_when`` first holds, those kept weights are checked in order: the model ends at the first
    of them for which it holds, so the stop is found to ``refine_every`` steps for the cost of checking every
    ``check_every``. The losses returned end at the step the model ends at. With ``any_order`` each target
    rationale is a random run path of :meth:`~trl_hsstar.toy.problems.ArithmeticProblem.rationale` (drawn from the
    ``data_seed`` stream), so the model learns many valid paths; without it, left to right.
    """
    if refine_every is not None and (refine_every < 1 or check_every % refine_every):
        raise ValueError(
            f"`refine_every` ({refine_every}) must be a positive divisor of `check_every` ({check_every})."
        )
    if mix is not None:
        cells = [(int(k), int(d)) for k, d, _ in mix]
        weights = [float(w) for _, _, w in mix]
        if not cells or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"`mix` must be a non-empty list of (operands, digits, weight >= 0), got {mix!r}."
            )
    total = steps if schedule_steps is None else schedule_steps
    if total < steps:
        raise ValueError(f"`schedule_steps` ({schedule_steps}) must be >= `steps` ({steps}).")
    data_seed = seed if data_seed is None else data_seed
    stream = random.Random(data_seed)
    orders = random.Random(data_seed + 7919)  # its own stream: the problems drawn do not depend on any_order
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    was_training = model.training
    model.train()
    losses = []
    kept: list[tuple[int, dict]] = []  # (step, weights) since the last check, with refine_every
    bar = tqdm(total=steps, desc="building M_0", unit="step", disable=not progress)
    with torch.random.fork_rng(), bar:
        torch.manual_seed(seed)
        for step in range(steps):
            if mix is None:
                problems = generate_problems(
                    batch_size,
                    operands=operands,
                    digits=digits,
                    ops=ops,
                    seed=data_seed * 1_000_003 + step,
                    unique=False,
                )
            else:
                problems = []
                for _ in range(batch_size):
                    k, d = stream.choices(cells, weights)[0]
                    problems += generate_problems(
                        1, operands=k, digits=d, ops=ops, seed=stream.randrange(1 << 30)
                    )
            examples = [(p.prompt, p.rationale(orders if any_order else None)) for p in problems]
            examples.sort(key=lambda e: len(e[1]))
            size = -(-len(examples) // micro_batches)
            chunks = [
                _batch(tokenizer, examples[i : i + size], device) for i in range(0, len(examples), size)
            ]
            n_tokens = [int((labels[:, 1:] != -100).sum()) for _, _, labels in chunks]
            loss_sum = 0.0
            for (input_ids, attention, labels), n in zip(chunks, n_tokens):
                loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss * (
                    n / sum(n_tokens)
                )
                loss.backward()
                loss_sum += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_sum)
            bar.update()
            if step % 25 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if stop_when is None:
                continue
            if (step + 1) % check_every == 0:
                model.eval()
                stop = stop_when(step + 1)
                if stop:
                    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    for at, weights in kept:
                        model.load_state_dict(weights)
                        if stop_when(at):
                            del losses[at:]
                            break
                    else:
                        model.load_state_dict(final)
                    break
                model.train()
                kept.clear()
            elif refine_every is not None and (step + 1) % refine_every == 0:
                kept.append((step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    model.train(was_training)
    return losses
