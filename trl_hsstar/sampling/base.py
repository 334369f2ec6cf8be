"""The sampler interface: prompts in, ``num_samples[i]`` completions for ``prompts[i]`` out.

A backend (transformers ``generate``, vLLM, a server) is one subclass of :class:`Sampler` that implements
:meth:`Sampler.generate`. What every backend shares lives here: the request validation
(:func:`validate_request`), the flat expansion of a request (:func:`expand_requests`) and the cumulative
accounting (:meth:`Sampler._record`), so callers can report samples and tokens per second whatever the
backend.

This module imports only the standard library (and `trl_hsstar.checks`, which does too).
"""

from __future__ import annotations

import abc
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from ..checks import check_int

__all__ = [
    "Completion",
    "Sampler",
    "SamplingParams",
    "SamplingStats",
    "encode_prompt",
    "expand_requests",
    "request_seed",
    "stop_list",
    "text_tokenizer",
    "validate_request",
]

FINISH_REASONS = ("stop", "length")


def _check_params(temperature: object, top_p: object, max_new_tokens: object, seed: object) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"`temperature` must be a number, got {temperature!r}.")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"`temperature` must be finite and >= 0 (0 means greedy), got {temperature!r}.")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}.")
    check_int(max_new_tokens, "max_new_tokens")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"`seed` must be an integer or None, got {seed!r}.")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample.

    Args:
        temperature: softmax temperature; ``0`` means greedy decoding (then the truncations are unused).
        top_p: nucleus sampling probability, in ``(0, 1]``.
        max_new_tokens: the most tokens generated per completion (EOS included).
        seed: seeds the sampling RNG for the call: the same seed gives the same completions on the same
            machine, backend and batching. ``None`` uses (and advances) the backend's global RNG.
        top_k: keep the ``top_k`` most likely tokens; ``0`` (the default) keeps all.
        min_p: drop tokens less likely than ``min_p`` times the most likely one; ``None`` drops none.
        repetition_penalty: ``1.0`` (the default) is none.
        generation_kwargs: more arguments for the backend (``generate`` or vLLM's ``SamplingParams``); they
            override the fields above.
    """

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int | None = None
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict | None = None

    def __post_init__(self) -> None:
        _check_params(self.temperature, self.top_p, self.max_new_tokens, self.seed)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"`top_k` must be an integer >= 0 (0 keeps every token), got {self.top_k!r}.")
        if self.min_p is not None and not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise ValueError(f"`min_p` must be in [0, 1] or None, got {self.min_p!r}.")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise ValueError(f"`repetition_penalty` must be positive, got {self.repetition_penalty!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One sampled completion.

    Attributes:
        text: the decoded new tokens only, special tokens skipped, EOS (or a stop string) not included.
        num_tokens: tokens generated, counted up to and including EOS (or the token completing a stop
            string); padding is not counted.
        finish_reason: ``"stop"`` (EOS or a stop string was generated) or ``"length"`` (hit
            ``max_new_tokens``).
    """

    text: str
    num_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class SamplingStats:
    """A snapshot of a sampler's cumulative accounting (see :attr:`Sampler.stats`)."""

    num_generated: int = 0
    num_completion_tokens: int = 0
    generation_seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.num_generated / self.generation_seconds if self.generation_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.num_completion_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


def validate_request(prompts: Sequence[str], num_samples: Sequence[int], params: SamplingParams) -> None:
    """Raise a ``ValueError`` naming the offending field unless the request is well formed.

    ``prompts`` is a sequence of str, ``num_samples`` a sequence of the same length of non-negative
    ints, and ``params`` a :class:`SamplingParams` with sane values.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"`prompts` must be a sequence of str, got {type(prompts).__name__}.")
    if isinstance(num_samples, (str, bytes)) or not isinstance(num_samples, Sequence):
        raise ValueError(f"`num_samples` must be a sequence of int, got {type(num_samples).__name__}.")
    if len(prompts) != len(num_samples):
        raise ValueError(
            f"`prompts` ({len(prompts)}) and `num_samples` ({len(num_samples)}) must have the same length."
        )
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(
                f"`prompts[{i}]` must be a str (render chat prompts before sampling), got {type(prompt).__name__}."
            )
    for i, n in enumerate(num_samples):
        check_int(n, f"num_samples[{i}]", minimum=0)
    if not isinstance(params, SamplingParams):
        raise ValueError(f"`params` must be a SamplingParams, got {type(params).__name__}.")
    _check_params(params.temperature, params.top_p, params.max_new_tokens, params.seed)


def encode_prompt(tokenizer, prompt: str, index: int = 0) -> list[int]:
    """The token ids every backend generates from: the tokenizer's defaults (``add_special_tokens=True``, so a
    tokenizer that prepends BOS does so), except that a prompt already starting with the BOS token (typically a
    rendered chat template) is tokenized without special tokens, so BOS is never doubled."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special_tokens = not (bos and prompt.startswith(bos))
    ids = list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    if not ids:
        raise ValueError(
            f"`prompts[{index}]` is empty after tokenization; a prompt needs at least one token."
        )
    return ids


def text_tokenizer(tokenizer):
    """The text tokenizer of a processor (its ``.tokenizer``), or the tokenizer itself."""
    if not hasattr(tokenizer, "batch_decode") and hasattr(tokenizer, "tokenizer"):
        return tokenizer.tokenizer
    return tokenizer


def stop_list(stop_strings: str | Sequence[str] | None) -> list[str]:
    """``stop_strings`` as a list (one string is a list of one); each must be a non-empty string."""
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or ())
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"`stop_strings` must be non-empty strings, got {stop_strings!r}.")
    return stops


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample of a request seeded with ``seed``: distinct per (prompt, sample), so that no two
    samples share random draws, and the same on every run (for backends that seed each sample, like vLLM).

    The samples of one prompt get consecutive seeds (a per-prompt base plus the sample's index), which is how vLLM
    seeds the ``n`` samples of one request: a server can then be sent one request per prompt and draw exactly
    what per-sample requests would."""
    return zlib.crc32(f"{seed}:{prompt_index}".encode()) + sample_index


def expand_requests(num_samples: Sequence[int]) -> list[int]:
    """The flat list of prompt indices, prompt ``i`` repeated ``num_samples[i]`` times, in input order."""
    return [i for i, n in enumerate(num_samples) for _ in range(n)]


class Sampler(abc.ABC):
    """Generates completions for already-rendered text prompts.

    Subclasses implement :meth:`generate` (call :func:`validate_request` first, and :meth:`_record` with
    the results) and, if they hold resources (an engine, a server), :meth:`close`. A sampler is also a
    context manager that closes itself.

    Attributes:
        name: the backend's name, e.g. ``"transformers"``.
        num_generated: completions generated so far, over all calls.
        num_completion_tokens: completion tokens generated so far (``Completion.num_tokens`` summed).
        generation_seconds: wall-clock seconds spent in :meth:`generate` so far.
    """

    name: str = "sampler"
    num_generated: int = 0
    num_completion_tokens: int = 0
    generation_seconds: float = 0.0

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[str], num_samples: Sequence[int], params: SamplingParams
    ) -> list[list[Completion]]:
        """Exactly ``num_samples[i]`` completions for ``prompts[i]``, as one list per prompt in input order.

        Prompts are already-rendered text (chat templates are applied by the caller). A request for zero
        samples in total spends no generation and returns empty lists.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the backend's resources (a no-op unless the backend holds any)."""

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- accounting ----------------------------------------------------------------------------

    @property
    def stats(self) -> SamplingStats:
        """The cumulative accounting as a snapshot (subtract two snapshots' fields for one phase)."""
        return SamplingStats(self.num_generated, self.num_completion_tokens, self.generation_seconds)

    def reset_stats(self) -> None:
        self.num_generated = 0
        self.num_completion_tokens = 0
        self.generation_seconds = 0.0

    def _record(self, results: Sequence[Sequence[Completion]], seconds: float) -> None:
        """Add one call's completions and wall-clock time to the cumulative counters."""
        self.num_generated += sum(len(r) for r in results)
        self.num_completion_tokens += sum(c.num_tokens for r in results for c in r)
        self.generation_seconds += float(seconds)
