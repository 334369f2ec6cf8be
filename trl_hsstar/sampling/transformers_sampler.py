"""Sampling with ``model.generate`` from transformers (any causal LM, PEFT-wrapped or not, on any device).

How a call runs:

1. The request is expanded into a flat list of samples (prompt ``i`` repeated ``num_samples[i]`` times);
   each distinct prompt is tokenized once.
2. The samples are sorted by prompt length, longest first (an out-of-memory error shows up in the first
   batch), then by prompt index, so a batch holds prompts of about the same length (little padding) and
   the samples of one prompt sit next to each other.
3. Batches of ``batch_size`` samples are left-padded and passed to ``model.generate`` in eval mode under
   ``torch.no_grad()``; with an ``accelerator``, through TRL's ``unwrap_model_for_generation`` (which
   unwraps DDP/FSDP/DeepSpeed and gathers ZeRO-3 shards for the duration).
4. Only the new tokens are decoded, up to the first EOS (or stop string), and each completion goes back
   to its prompt's list, in input order.

Tokenization: a prompt is tokenized with the tokenizer's defaults (``add_special_tokens=True``, so a
tokenizer that prepends BOS does so), except that a prompt whose text already starts with the BOS token
(typically a rendered chat template) is tokenized with ``add_special_tokens=False``, so BOS is never
doubled.

Sampling is exactly ``temperature`` and ``top_p``: top-k is switched off (transformers would otherwise
apply its default ``top_k=50``) and the repetition penalty is 1, whatever the model's
``generation_config`` says, so that the transformers and vLLM backends sample the same distribution.
The ``generation_config`` does contribute its EOS ids.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .._utils import eval_mode
from ..checks import check_int
from .base import (
    Completion,
    Sampler,
    SamplingParams,
    encode_prompt,
    expand_requests,
    stop_list,
    text_tokenizer,
    validate_request,
)

__all__ = ["TransformersSampler"]


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value]


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch for the block, restoring the caller's CPU and accelerator RNG states afterwards."""
    if seed is None:
        yield
        return
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None:
        devices, device_type = [], None
    else:
        devices, device_type = list(range(torch.accelerator.device_count())), accelerator.type
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.manual_seed(seed)
        yield


class TransformersSampler(Sampler):
    """A :class:`~trl_hsstar.sampling.Sampler` backed by ``model.generate``.

    Args:
        model: a causal LM (``PreTrainedModel``, a ``PeftModel``, or a model prepared by an
            ``accelerator``).
        tokenizer: its tokenizer (a processor's ``.tokenizer`` is used).
        batch_size: samples per ``generate`` call.
        accelerator: the ``accelerate.Accelerator`` that prepared ``model``, if any; generation then goes
            through ``trl.models.utils.unwrap_model_for_generation``, and the progress bar shows on the
            local main process only. Every process must call :meth:`generate` together (ZeRO-3 gathers
            the weights collectively), each with its own prompts, possibly none.
        progress: show a tqdm progress bar over samples.
        stop_strings: strings that end a completion like EOS does (the completion's text stops before
            the string, as in vLLM).

    The sampler keeps ``model`` and ``tokenizer`` by reference, so it always samples the current weights.
    It never changes the tokenizer, and restores each module's training flag after a call.
    """

    name = "transformers"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 64,
        accelerator: Any = None,
        progress: bool = True,
        stop_strings: str | Sequence[str] | None = None,
    ):
        check_int(batch_size, "batch_size")
        self.model = model
        self.tokenizer = text_tokenizer(tokenizer)
        self.batch_size = batch_size
        self.accelerator = accelerator
        self.progress = progress
        self.stop_strings = tuple(stop_list(stop_strings))

    # -- helpers -------------------------------------------------------------------------------

    def _eos_ids(self, model: Any) -> list[int]:
        config = getattr(model, "generation_config", None)
        ids = _as_id_list(getattr(config, "eos_token_id", None))
        ids += _as_id_list(getattr(self.tokenizer, "eos_token_id", None))
        return list(dict.fromkeys(ids))

    @contextlib.contextmanager
    def _generation_model(self) -> Iterator[Any]:
        """The model to call ``generate`` on: eval mode, no grad, unwrapped (and gathered) if needed."""
        with eval_mode(self.model), contextlib.ExitStack() as stack:
            if self.accelerator is not None:
                from trl.models.utils import unwrap_model_for_generation

                model = stack.enter_context(unwrap_model_for_generation(self.model, self.accelerator))
            else:
                model = self.model
            stack.enter_context(torch.no_grad())
            yield model

    def _lockstep_calls(self, calls: int) -> int:
        """How many times this process must call ``generate``: its own ``calls``, or, where the weights are sharded
        across processes (ZeRO-3, FSDP: every forward and ``generate``'s synced steps are collective), the most any
        process needs, so that none waits for a call another never makes."""
        acc = self.accelerator
        if acc is None or acc.num_processes < 2 or acc.distributed_type.value not in ("DEEPSPEED", "FSDP"):
            return calls
        return int(acc.gather(torch.tensor([calls], device=acc.device)).max())

    def _show_progress(self) -> bool:
        if not self.progress:
            return False
        return self.accelerator is None or bool(self.accelerator.is_local_main_process)

    def _stop_cut(self, ids: list[int]) -> tuple[int, int] | None:
        """``(tokens, chars)`` up to the first stop string in ``ids``' text, or None if there is none:
        the fewest tokens whose text contains a stop string, and where in the full text it starts."""
        decode = self.tokenizer.decode
        text = decode(ids, skip_special_tokens=True)
        starts = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if not starts:
            return None
        lo, hi = 1, len(ids)  # the text of ids[:hi] contains a stop string; find the smallest such hi
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in decode(ids[:mid], skip_special_tokens=True) for s in self.stop_strings):
                hi = mid
            else:
                lo = mid + 1
        return hi, min(starts)

    def _finish(self, new_tokens: torch.Tensor, eos: torch.Tensor) -> list[Completion]:
        """Completions from a batch of generated tokens (prompt removed, padded on the right)."""
        is_eos = torch.isin(new_tokens, eos)
        has_eos = is_eos.any(dim=1).tolist()
        first_eos = is_eos.to(torch.int8).argmax(dim=1).tolist()
        rows = new_tokens.tolist()
        kept = [row[:first] if stop else row for row, stop, first in zip(rows, has_eos, first_eos)]
        texts = self.tokenizer.batch_decode(kept, skip_special_tokens=True)
        completions = []
        for row, ids, text, stop in zip(rows, kept, texts, has_eos):
            cut = self._stop_cut(ids) if self.stop_strings else None
            if cut is not None:  # generation stopped at the stop string; what follows is padding
                completions.append(Completion(text[: cut[1]], cut[0], "stop"))
            elif stop:
                completions.append(Completion(text, len(ids) + 1, "stop"))
            else:
                completions.append(Completion(text, len(row), "length"))
        return completions

    # -- the interface -------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[str], num_samples: Sequence[int], params: SamplingParams
    ) -> list[list[Completion]]:
        validate_request(prompts, num_samples, params)
        start = time.perf_counter()
        flat = expand_requests(num_samples)
        results: list[list[Completion]] = [[] for _ in prompts]
        if not flat and self.accelerator is None:
            self._record(results, time.perf_counter() - start)
            return results

        encoded = {i: encode_prompt(self.tokenizer, prompts[i], i) for i in dict.fromkeys(flat)}
        # Longest prompts first, samples of one prompt adjacent (the sort is stable: input order within).
        order = sorted(flat, key=lambda i: -len(encoded[i]))

        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "return_dict_in_generate": False,
            "repetition_penalty": float(params.repetition_penalty),
        }
        if params.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(
                do_sample=True,
                temperature=float(params.temperature),
                top_p=float(params.top_p),
                top_k=params.top_k,
            )
            if params.min_p is not None:
                kwargs["min_p"] = float(params.min_p)
        kwargs.update(params.generation_kwargs or {})
        if self.stop_strings:
            kwargs.update(stop_strings=list(self.stop_strings), tokenizer=self.tokenizer)

        bar = tqdm(
            total=len(flat), desc="sampling", unit="sample", disable=not self._show_progress(), leave=False
        )
        with bar, self._generation_model() as model, _seeded(params.seed):
            eos_ids = self._eos_ids(model)
            if pad_id is None:
                if not eos_ids:
                    raise ValueError(
                        "The tokenizer has neither a pad token nor an EOS token; set one of them."
                    )
                pad_id = eos_ids[0]
            kwargs.update(pad_token_id=pad_id, eos_token_id=eos_ids or None)
            device = _model_device(model)
            eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
            batches = range(0, len(order), self.batch_size)
            for b in batches:
                batch = order[b : b + self.batch_size]
                width = len(encoded[batch[0]])  # the longest prompt of the batch comes first
                input_ids = [[pad_id] * (width - len(encoded[i])) + encoded[i] for i in batch]
                attention_mask = [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch]
                output = model.generate(
                    input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
                    attention_mask=torch.tensor(attention_mask, dtype=torch.long, device=device),
                    **kwargs,
                )
                for i, completion in zip(batch, self._finish(output[:, width:], eos)):
                    results[i].append(completion)
                bar.update(len(batch))
            for _ in range(self._lockstep_calls(len(batches)) - len(batches)):
                # sharded weights: as many generate calls as the busiest process, after the real ones (so that
                # this process's samples do not depend on the others')
                one = torch.tensor([[pad_id]], dtype=torch.long, device=device)
                model.generate(
                    input_ids=one, attention_mask=torch.ones_like(one), **{**kwargs, "max_new_tokens": 1}
                )

        self._record(results, time.perf_counter() - start)
        return results
