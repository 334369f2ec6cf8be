"""Reward sources: process reward models (PRMs), outcome reward models (ORMs) and reward callables.

HS-STaR needs one score S(r) in [0, 1] per sampled response r (or ``None`` when a source has nothing to
say about it); the difficulty estimator averages S(r) over a problem's samples. Every reward source
follows TRL GRPO's reward-function convention::

    source(prompts: list, completions: list, **columns) -> list[float | None]

where ``prompts`` / ``completions`` are strings, or chat messages (``[{"role": ..., "content": ...}]``)
for conversational datasets, and ``columns`` are the dataset's other columns (ignored by the models here).

- :class:`ProcessRewardModel`: a token-classification PRM read at a step-separator token after each step,
  in the Math-Shepherd layout (what TRL's former ``PRMTrainer`` trained) or the Qwen2.5-Math-PRM layout.
  S(r) is the aggregation (``"min"``, ``"prod"`` or ``"last"``) of the per-step probabilities.
- :class:`OutcomeRewardModel`: a sequence-classification model scoring the whole response.
- any plain callable ``f(prompts, completions, **kwargs)``; :func:`as_reward_source` normalises all three,
  :func:`combine_rewards` sums several, :func:`check_rewards` validates what a source returned.

The pure helpers (:func:`aggregate_step_rewards`, :func:`split_steps`, :func:`check_rewards`,
:func:`combine_rewards`) never import torch; the model classes import it when they are built.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._utils import eval_mode, short_model_name
from .checks import check_int
from .records import Problem

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_STEP_SEPARATOR",
    "LAYOUTS",
    "POSITION_LIMIT_FIELDS",
    "QWEN_PRM_STEP_TOKEN",
    "QWEN_PRM_SYSTEM_PROMPT",
    "CombinedReward",
    "OutcomeRewardModel",
    "ProcessRewardModel",
    "RewardSource",
    "aggregate_step_rewards",
    "answer_reward",
    "as_reward_source",
    "check_rewards",
    "combine_rewards",
    "config_max_length",
    "reward_source_name",
    "split_steps",
]

AGGREGATIONS = ("min", "prod", "last")
"""How step rewards make S(r): the minimum (HS-STaR's choice), the product, or the last step's reward."""

LAYOUTS = ("math-shepherd", "qwen-prm")
"""Input layouts of :class:`ProcessRewardModel`."""

DEFAULT_STEP_SEPARATOR = "\n\n"
"""Separates the steps of a completion (a blank line)."""

MATH_SHEPHERD_STEP_TOKEN = "<step>"
"""Default step token of the Math-Shepherd layout, used when the tokenizer has it (the toy tokenizer does)."""

QWEN_PRM_STEP_TOKEN = "<extra_0>"
"""The step token of Qwen2.5-Math-PRM-7B/72B."""

QWEN_PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
"""The system prompt of Qwen2.5-Math-PRM's model card."""


# ----------------------------------------------------------------------------------------------------
# Pure helpers


def aggregate_step_rewards(step_rewards: Sequence[float], how: str = "min") -> float | None:
    """Aggregate per-step rewards into one score: ``"min"``, ``"prod"`` or ``"last"``.

    Returns ``None`` for an empty sequence (a response without steps has no process score).

    Raises:
        ValueError: for an unknown ``how``.
    """
    if how not in AGGREGATIONS:
        raise ValueError(
            f"unknown reward_aggregation {how!r}: valid values are {', '.join(map(repr, AGGREGATIONS))}"
        )
    values = [float(v) for v in step_rewards]
    if not values:
        return None
    if how == "min":
        return min(values)
    if how == "prod":
        return math.prod(values)
    return values[-1]


def split_steps(completion: str, separator: str = DEFAULT_STEP_SEPARATOR) -> list[str]:
    """Split a completion into steps on ``separator``; each step is stripped and empty ones are dropped."""
    if not separator:
        raise ValueError("step separator must be a non-empty string")
    return [step.strip() for step in completion.split(separator) if step.strip()]


def reward_source_name(source: Any) -> str:
    """The name a reward source is reported under: its ``name``, else its ``__name__``, else its class name."""
    name = getattr(source, "name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(source, "__name__", None) or getattr(getattr(source, "func", None), "__name__", None)
    return name if isinstance(name, str) and name else type(source).__name__


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_rewards(values: Any, n: int, name: str, *, nan_is_error: bool = False) -> list[float | None]:
    """Validate what reward source ``name`` returned for ``n`` completions; return it as floats / ``None``.

    A valid output is a list (or tuple) of ``n`` values, each a finite real number or ``None`` (bools are not
    numbers). Numpy scalars are accepted and converted to ``float``. NaN means what ``None`` means, "cannot score
    this completion" (as in GRPOTrainer), and becomes ``None`` with a warning; under ``nan_is_error`` (a check
    before any sampling) it is an error.

    Raises:
        ValueError: naming the source and what is wrong, e.g. ``"reward function 'my_fn' returned 3 values
            for 4 completions"``.
    """
    who = f"reward function {name!r}"
    if not isinstance(values, list | tuple):
        raise ValueError(
            f"{who} returned a {type(values).__name__}; expected a list of {n} values (a float, or None for a "
            "completion it cannot score)"
        )
    if len(values) != n:
        raise ValueError(f"{who} returned {len(values)} values for {n} completions")
    out: list[float | None] = []
    nan = 0
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, bool) or type(v).__name__ == "bool_" or not isinstance(v, numbers.Real):
            raise ValueError(
                f"{who} returned {_describe(v)} ({type(v).__name__}) at index {i}: a reward must be a real number "
                "or None"
            )
        x = float(v)
        if math.isnan(x) and nan_is_error:
            raise ValueError(
                f"{who} returned NaN at index {i} on its check before any sampling: it must return a score, or None for a "
                "completion it cannot score"
            )
        if math.isnan(x):  # GRPOTrainer's reading of None; one policy for one source or many
            out.append(None)
            nan += 1
            continue
        if math.isinf(x):
            raise ValueError(f"{who} returned {x} at index {i}: rewards must be finite")
        out.append(x)
    if nan:
        logger.warning(
            "%s returned NaN for %d of %d completions: they count as unscored (None).", who, nan, n
        )
    return out


# ----------------------------------------------------------------------------------------------------
# The interface


class RewardSource(ABC):
    """Base class of the reward sources in this module (the interface the HS-STaR loop calls).

    A reward source is called like a TRL GRPO reward function::

        scores = source(prompts, completions, **columns)  # list[float | None], one per completion

    - ``prompts[i]`` is a string, or a conversation (a list of ``{"role", "content"}`` messages);
    - ``completions[i]`` is a string, or a list of messages whose assistant content is the response;
    - ``columns`` are the dataset's other columns (one list per column), for sources that need them;
    - a value is the score S(r) of the completion, ``None`` when the source cannot score it.

    Subclasses set ``name`` (used in logs and error messages) and implement ``__call__``. The loop also
    accepts any plain callable with that signature; it is reported under its ``__name__`` (see
    :func:`as_reward_source` and :func:`reward_source_name`).
    """

    name: str = "reward"

    @abstractmethod
    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        """One score (or ``None``) per completion."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class CombinedReward(RewardSource):
    """The weighted sum of several reward sources, ignoring ``None`` (built by :func:`combine_rewards`)."""

    def __init__(self, sources: Sequence[Callable[..., Any]], weights: Sequence[float]):
        self.sources = list(sources)
        self.weights = [float(w) for w in weights]
        self.name = "+".join(reward_source_name(s) for s in self.sources)

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        n = len(completions)
        totals: list[float | None] = [None] * n
        for source, weight in zip(self.sources, self.weights, strict=True):
            values = check_rewards(
                source(prompts=prompts, completions=completions, **columns), n, reward_source_name(source)
            )
            for i, v in enumerate(values):
                if v is not None:
                    totals[i] = (totals[i] or 0.0) + weight * v
        return totals


def combine_rewards(
    sources: Sequence[Callable[..., Any]], weights: Sequence[float] | None = None
) -> CombinedReward:
    """One reward source returning, per completion, ``sum(weight * value)`` over the sources.

    ``None`` values are skipped (like TRL GRPO's ``nansum``); the result is ``None`` only when every source
    returned ``None`` for that completion. Each source's output is validated with :func:`check_rewards`.
    ``weights`` defaults to 1 for every source. Note that a weighted sum of scores in [0, 1] is in [0, 1]
    only when the weights are non-negative and sum to at most 1.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("combine_rewards needs at least one reward source")
    for s in sources:
        if not callable(s):
            raise TypeError(f"reward source {s!r} is not callable; see as_reward_source() for models")
    if weights is None:
        weights = [1.0] * len(sources)
    weights = list(weights)
    if len(weights) != len(sources):
        raise ValueError(f"got {len(weights)} reward weights for {len(sources)} reward sources")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
            raise ValueError(f"reward weights must be finite real numbers, got {w!r}")
    return CombinedReward(sources, weights)


# ----------------------------------------------------------------------------------------------------
# Prompt / completion text


def _content_text(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts (``{"type": "text", "text": ...}``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
        return "".join(parts)
    return str(content)


def _as_messages(value: Any, what: str) -> list[dict]:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(m, Mapping) for m in value):
        raise TypeError(f"{what} must be a string or a list of chat messages, got {type(value).__name__}")
    return [{"role": m.get("role", "user"), "content": _content_text(m.get("content"))} for m in value]


def _completion_text(completion: Any) -> str:
    """A completion's response text: the string itself, or the content of its assistant message(s)."""
    if isinstance(completion, str):
        return completion
    messages = _as_messages(completion, "a completion")
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    return "".join(assistant if assistant else [m["content"] for m in messages])


def answer_reward(completions: list, answer: list, **kwargs) -> list[float]:
    """A TRL reward function: 1.0 when a completion's final answer equals the reference in the ``answer`` column,
    else 0.0 (the package's verifier). For GRPO, and the accuracy HSStarGRPOTrainer reads."""
    from .verify import verify_answer

    return [
        float(verify_answer(_completion_text(c), str(a))) for c, a in zip(completions, answer, strict=True)
    ]


def probe_inputs(prompt: Any, answer: Any) -> tuple[list, list]:
    """Two tiny completions of one real prompt (its answer boxed, and an empty one), in the prompt's format: what a
    reward source is called on once before any sampling, so that a wrong output fails at once."""
    problem = Problem("probe", prompt, "", str(answer))
    return [prompt] * 2, [problem.completion(t) for t in (f"The answer is \\boxed{{{answer}}}.", "")]


def _render_prompt(prompt: Any, tokenizer: PreTrainedTokenizerBase) -> str:
    """A prompt as text: the string itself, or the conversation rendered by the chat template (with the
    generation prompt; messages joined by blank lines when the tokenizer has no template)."""
    if isinstance(prompt, str):
        return prompt
    messages = _as_messages(prompt, "a prompt")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)


def _check_pairs(prompts: Any, completions: Any) -> None:
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be lists (one entry per completion), not strings")
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")


# ----------------------------------------------------------------------------------------------------
# Model plumbing shared by the PRM and the ORM


POSITION_LIMIT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len")
"""Config fields read, in this order, for the longest sequence a model takes (the default ``max_length``)."""


def config_max_length(model: Any) -> int | None:
    """The longest sequence ``model``'s config declares: the first positive int among
    :data:`POSITION_LIMIT_FIELDS` on its text config (``config.get_text_config()``), then on ``config``;
    ``None`` when the model has no config or the config names no limit. A PEFT model is read through to its
    base model's config."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        with contextlib.suppress(Exception):  # a config without a text part: read `config` itself
            configs.insert(0, get_text_config())
    for cfg in configs:
        for name in POSITION_LIMIT_FIELDS:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _pad_id(model: Any, tokenizer: Any) -> int:
    """The id used for right padding: the model's pad token (what sequence-classification heads use to find
    the last real token), else the tokenizer's, else 0 (positions are read explicitly, masked anyway)."""
    for candidate in (
        getattr(getattr(model, "config", None), "pad_token_id", None),
        getattr(tokenizer, "pad_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    return 0


def _batched_logits(
    model: torch.nn.Module, sequences: list[list[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Run ``model`` on ``sequences`` in length-sorted, right-padded batches without recording gradients.

    Yields ``(indices, logits)``: the indices into ``sequences`` of one batch and the model's float32 logits
    for it (row ``j`` belongs to ``sequences[indices[j]]``). Callers restore the input order.
    """
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    # no_grad rather than inference_mode: buffers a model creates lazily in forward must stay usable for
    # training when the scored model is also trained.
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            width = max(len(sequences[i]) for i in indices)
            input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
            for row, i in enumerate(indices):
                input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                attention_mask[row, : len(sequences[i])] = 1
            output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            logits = output.logits if hasattr(output, "logits") else output[0]
            yield indices, logits.float()


def _check_label(logits: torch.Tensor, positive_label: int, what: str) -> None:
    if logits.shape[-1] <= positive_label:
        raise ValueError(
            f"positive_label={positive_label} but the {what} returns {logits.shape[-1]} label(s) per position"
        )


# ----------------------------------------------------------------------------------------------------
# Process reward model


def _remove_all(text: str, token: str) -> str:
    """``text`` without any occurrence of ``token``, including ones that removing others would form
    (``"<ex<extra_0>tra_0>"`` loses both). Linear time: one ``str.replace`` in the usual case, else one stack
    pass."""
    text = text.replace(token, "")
    if token not in text:
        return text
    out: list[str] = []
    n = len(token)
    last = token[-1]
    for ch in text:
        out.append(ch)
        if ch == last and len(out) >= n and "".join(out[-n:]) == token:
            del out[-n:]
    return "".join(out)


def single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of ``token`` if it encodes to exactly one known token of ``tokenizer``; else a ``ValueError``."""
    ids = tokenizer.encode(token, add_special_tokens=False) if token else []
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) != 1 or (ids[0] == unk and token != getattr(tokenizer, "unk_token", None)):
        raise ValueError(
            f"the PRM's tokenizer has no single token for step separator {token!r} (it encodes to {ids}): "
            "pass `step_token=` the token the PRM reads step rewards at (e.g. '<extra_0>' for "
            "Qwen2.5-Math-PRM, the trainer's step_separator for a Math-Shepherd-layout PRM)"
        )
    return ids[0]


def encode_math_shepherd(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Any,
    steps: Sequence[str],
    step_token_id: int,
    *,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """The Math-Shepherd layout (TRL's former PRMTrainer): BOS (if the tokenizer has one), the prompt, then each
    step followed by the step token. Returns the ids and the positions of the step tokens, where a step's label
    is read (and, for training, written).

    With ``max_length``, only the last ``max_length`` tokens are returned and the positions of the step tokens
    among them (the same result as truncating the full sequence). The steps are then encoded from the last one
    back, and encoding stops once ``max_length`` tokens are reached, so a huge completion costs only the
    tokens that are kept.
    """
    if max_length is not None:
        pieces: list[list[int]] = []
        total = 0
        for step in reversed(steps):
            pieces.append([*tokenizer.encode(step, add_special_tokens=False), step_token_id])
            total += len(pieces[-1])
            if total >= max_length:  # everything before these steps (earlier steps, prompt, BOS) is cut
                ids, positions = [], []
                for piece in reversed(pieces):
                    ids += piece
                    positions.append(len(ids) - 1)
                cut = len(ids) - max_length
                return ids[cut:], [p - cut for p in positions if p >= cut]
        ids, positions = encode_math_shepherd(tokenizer, prompt, steps, step_token_id)
        cut = max(0, len(ids) - max_length)
        return ids[cut:], [p - cut for p in positions if p >= cut]
    ids = tokenizer.encode(_render_prompt(prompt, tokenizer), add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    positions = []
    for step in steps:
        ids += tokenizer.encode(step, add_special_tokens=False)
        ids.append(step_token_id)
        positions.append(len(ids) - 1)
    return ids, positions


def _check_head(model, batch_size, max_length, positive_label, *, min_labels: int = 1) -> int:
    """The settings a reward model's head shares, checked; returns ``max_length`` (the model's own if unset). A head
    with fewer than ``min_labels`` labels has no class to pick (a one-label ORM is a regression head)."""
    check_int(batch_size, "batch_size")
    check_int(max_length, "max_length", allow_none=True)
    check_int(positive_label, "positive_label", minimum=0)
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if isinstance(num_labels, int) and num_labels >= min_labels and positive_label >= num_labels:
        raise ValueError(f"positive_label={positive_label} but the model has num_labels={num_labels}")
    return config_max_length(model) if max_length is None else max_length


class ProcessRewardModel(RewardSource):
    r"""A process reward model (PRM): a probability per step that the step is correct, aggregated into S(r).

    The completion is split into steps with :func:`split_steps` (on ``step_separator``, ``"\n\n"`` by
    default; steps stripped, empty ones dropped). The model sees each step followed by one *step token* and
    the step's reward is ``softmax(logits)[positive_label]`` at that token. ``__call__`` returns
    ``aggregate_step_rewards(step_rewards, aggregation)`` per completion (``None`` when it has no step).

    Layouts (``layout=``):

    ``"math-shepherd"`` -- a token-classification model (``AutoModelForTokenClassification``, logits
    ``[batch, seq, num_labels]``) trained as TRL's former ``PRMTrainer`` trained it. Token ids, built by
    concatenating separately tokenized pieces (no special tokens added by the tokenizer)::

        [BOS] prompt_ids  step_1_ids <step>  step_2_ids <step>  ...  step_n_ids <step>
                                       ^                ^                        ^
                                    reward 1         reward 2                reward n

      - BOS is prepended when the tokenizer has one (as the trainer did), unless the prompt already starts
        with it; no separator follows the prompt; the label of a step sits on its step token (the trainer put
        it on the last token of the separator and ``-100`` everywhere else; ``train_on_last_step_only`` only
        changed which labels were kept in training, not the layout).
      - ``step_token`` defaults to ``"<step>"`` when the tokenizer has it (the toy tokenizer does); for a real
        PRM pass the separator the model was trained with (TRL's ``PRMConfig.step_separator``, e.g. ``"\n"``).
        It must encode to exactly one token id, which is checked when the object is built.
      - a chat prompt (a list of messages) is rendered with the tokenizer's chat template (generation prompt
        added); a string prompt is used as is.

    ``"qwen-prm"`` -- Qwen2.5-Math-PRM style. The text is the tokenizer's chat template applied to::

        [{"role": "system", "content": system_prompt},
         {"role": "user", "content": prompt},
         {"role": "assistant", "content": "step_1<extra_0>step_2<extra_0>...step_n<extra_0>"}]

      tokenized without adding special tokens; the model returns logits ``[batch, seq, 2]`` (a
      ``ModelOutput`` or a tuple whose first element is the logits) and the step rewards are
      ``softmax(logits)[..., positive_label]`` at the positions of the step token id, in order.
      ``step_token`` defaults to ``"<extra_0>"`` and ``system_prompt`` to the model card's
      ``"Please reason step by step, and put your final answer within \boxed{}."``; ``system_prompt=""``
      omits the system message, and a chat prompt that already has a system message keeps its own.
      Occurrences of the step token inside a step's text are removed (also those that removing others would
      form) so positions map to steps exactly.

    Batching: sequences are sorted by length and run ``batch_size`` at a time, right-padded with an attention
    mask, on the model's device (``next(model.parameters()).device``), under ``torch.no_grad()`` with the
    model in eval mode (each submodule's previous mode is restored afterwards); results come back in input
    order. Completions without steps skip the model.

    Truncation: a sequence longer than ``max_length`` keeps its *last* ``max_length`` tokens (so the
    prompt, then the earliest steps, are cut first). A step whose step token was cut gets no reward: its
    entry is missing from :meth:`step_rewards` (which then lists the rewards of the surviving, last steps)
    and S(r) aggregates the surviving steps; if none survives, S(r) is ``None``. ``max_length=None`` (the
    default) means the model's own limit, read from its config by :func:`config_max_length`
    (``max_position_embeddings``, else ``n_positions``, else ``max_seq_len``), so a runaway completion (a
    megabyte of text) never becomes a sequence the model cannot take; it is stored in ``self.max_length``.
    Only for a model whose config names no limit (or a bare ``torch.nn.Module``) does ``None`` stay, and then
    sequences are not truncated: pass ``max_length`` for such a model. In the Math-Shepherd layout the
    steps are tokenized from the last one back and only until ``max_length`` tokens are reached.
    """

    def __init__(
        self,
        model: PreTrainedModel | torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        layout: str = "math-shepherd",
        step_separator: str = DEFAULT_STEP_SEPARATOR,
        step_token: str | None = None,
        aggregation: str = "min",
        batch_size: int = 16,
        max_length: int | None = None,
        positive_label: int = 1,
        system_prompt: str | None = None,
        name: str | None = None,
    ):
        if layout not in LAYOUTS:
            raise ValueError(
                f"unknown PRM layout {layout!r}: valid layouts are {', '.join(map(repr, LAYOUTS))}"
            )
        aggregate_step_rewards([], aggregation)  # validates `aggregation`
        if not isinstance(step_separator, str) or not step_separator:
            raise ValueError(f"step_separator must be a non-empty string, got {step_separator!r}")
        max_length = _check_head(model, batch_size, max_length, positive_label)
        if layout == "math-shepherd" and system_prompt is not None:
            raise ValueError("system_prompt is only used by layout='qwen-prm'")
        if layout == "qwen-prm" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "layout='qwen-prm' renders the text with the tokenizer's chat template; this tokenizer has none"
            )

        if step_token is None:
            if layout == "qwen-prm":
                step_token = QWEN_PRM_STEP_TOKEN
            elif MATH_SHEPHERD_STEP_TOKEN in tokenizer.get_vocab():
                step_token = MATH_SHEPHERD_STEP_TOKEN
            else:
                raise ValueError(
                    f"the PRM's tokenizer has no {MATH_SHEPHERD_STEP_TOKEN!r} token: pass `step_token=`, the "
                    "separator the PRM was trained with (TRL PRMConfig.step_separator)"
                )
        self.model = model
        self.tokenizer = tokenizer
        self.layout = layout
        self.step_separator = step_separator
        self.step_token = step_token
        self.step_token_id = single_token_id(self.tokenizer, step_token)
        self.aggregation = aggregation
        self.batch_size = batch_size
        self.max_length = max_length
        self.positive_label = positive_label
        if layout == "qwen-prm" and system_prompt is None:
            system_prompt = QWEN_PRM_SYSTEM_PROMPT
        self.system_prompt = system_prompt
        self.name = name or short_model_name(model, "prm")

    # -- encoding ------------------------------------------------------------------------------------

    def _encode(self, prompt: Any, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of one (prompt, steps) pair and the positions of the step tokens that survive truncation."""
        if self.layout == "math-shepherd":
            return encode_math_shepherd(
                self.tokenizer, prompt, steps, self.step_token_id, max_length=self.max_length
            )
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = _as_messages(prompt, "a prompt")
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        clean = [_remove_all(step, self.step_token) for step in steps]
        messages.append({"role": "assistant", "content": self.step_token.join(clean) + self.step_token})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        found = [i for i, t in enumerate(ids) if t == self.step_token_id]
        if len(found) < len(steps):
            raise ValueError(
                f"the chat template and tokenizer turned {len(steps)} step tokens {self.step_token!r} into "
                f"{len(found)} token(s) {self.step_token_id}: the step token must stay one token in context"
            )
        positions = found[len(found) - len(steps) :]  # the assistant turn comes last
        if self.max_length is not None and len(ids) > self.max_length:
            cut = len(ids) - self.max_length
            ids = ids[cut:]
            positions = [p - cut for p in positions if p >= cut]
        return ids, positions

    # -- scoring -------------------------------------------------------------------------------------

    def step_rewards(self, prompts: list, completions: list) -> list[list[float]]:
        """One probability per step (see the class docstring for truncation) for every completion."""
        _check_pairs(prompts, completions)
        results: list[list[float]] = [[] for _ in completions]
        sequences: list[list[int]] = []
        positions: list[list[int]] = []
        owners: list[int] = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            steps = split_steps(_completion_text(completion), self.step_separator)
            if not steps:
                continue
            ids, pos = self._encode(prompt, steps)
            if not pos:
                continue
            sequences.append(ids)
            positions.append(pos)
            owners.append(i)
        if not sequences:
            return results
        import torch

        pad_id = _pad_id(self.model, self.tokenizer)
        for indices, logits in _batched_logits(self.model, sequences, self.batch_size, pad_id):
            _check_label(logits, self.positive_label, "PRM")
            for row, k in enumerate(indices):
                at = torch.tensor(positions[k], dtype=torch.long, device=logits.device)
                probs = torch.softmax(logits[row, at], dim=-1)[:, self.positive_label]
                results[owners[k]] = [float(p) for p in probs.cpu()]
        return results

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        """S(r) per completion: the aggregated step rewards, ``None`` when a completion has no step."""
        return [aggregate_step_rewards(r, self.aggregation) for r in self.step_rewards(prompts, completions)]


# ----------------------------------------------------------------------------------------------------
# Outcome reward model


class OutcomeRewardModel(RewardSource):
    """An outcome reward model: a sequence-classification model scoring the whole response.

    S(r) = ``softmax(logits)[positive_label]`` when the model has two or more labels, ``sigmoid(logit)`` when
    it has one. The input follows TRL GRPO's reward-model convention: ``prompt + completion`` for strings, the
    tokenizer's chat template over ``prompt messages + assistant message`` for conversations, tokenized
    without adding special tokens.

    Sequences run in length-sorted batches of ``batch_size``, right-padded with the model's pad token id so
    that the classification head (which reads the last token that is not padding) sees the last real token;
    a model without ``config.pad_token_id`` cannot find it in a padded batch, so it is run one sequence at a
    time. ``torch.no_grad()``, eval mode (previous modes restored) and the model's device, as for
    :class:`ProcessRewardModel`. A sequence longer than ``max_length`` keeps its last ``max_length`` tokens;
    ``max_length=None`` (the default) means the model's own limit from its config (:func:`config_max_length`),
    and stays ``None`` (no truncation) only for a model whose config names none. An empty input scores
    ``None``.
    """

    def __init__(
        self,
        model: PreTrainedModel | torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        positive_label: int = 1,
        name: str | None = None,
    ):
        max_length = _check_head(model, batch_size, max_length, positive_label, min_labels=2)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.positive_label = positive_label
        self.name = name or short_model_name(model, "orm")

    def _text(self, prompt: Any, completion: Any) -> str:
        if isinstance(prompt, str):
            return prompt + _completion_text(completion)
        messages = _as_messages(prompt, "a prompt")
        messages.append({"role": "assistant", "content": _completion_text(completion)})
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return "\n\n".join(m["content"] for m in messages)

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        """S(r) per completion."""
        _check_pairs(prompts, completions)
        scores: list[float | None] = [None] * len(completions)
        sequences: list[list[int]] = []
        owners: list[int] = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            ids = self.tokenizer.encode(self._text(prompt, completion), add_special_tokens=False)
            if self.max_length is not None:
                ids = ids[-self.max_length :]
            if ids:
                sequences.append(ids)
                owners.append(i)
        if not sequences:
            return scores
        import torch

        config_pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        batch_size = self.batch_size if config_pad is not None else 1
        pad_id = _pad_id(self.model, self.tokenizer)
        for indices, logits in _batched_logits(self.model, sequences, batch_size, pad_id):
            if logits.dim() != 2:
                raise ValueError(
                    f"an outcome reward model must return logits [batch, num_labels], got shape {tuple(logits.shape)}"
                    " (a token-classification model is a ProcessRewardModel)"
                )
            if logits.shape[-1] == 1:
                probs = torch.sigmoid(logits[:, 0])
            else:
                _check_label(logits, self.positive_label, "ORM")
                probs = torch.softmax(logits, dim=-1)[:, self.positive_label]
            for row, k in enumerate(indices):
                scores[owners[k]] = float(probs[row])
        return scores


# ----------------------------------------------------------------------------------------------------
# Normalisation


def _head_kind(model: Any) -> str | None:
    """``"token"`` / ``"sequence"`` / ``"qwen-prm"`` from the model's class (a PEFT wrapper is looked through)."""
    base = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
    cls = type(base).__name__
    if cls.endswith("ForProcessRewardModel"):  # Qwen2.5-Math-PRM's remote code
        return "qwen-prm"
    if cls.endswith("ForTokenClassification"):
        return "token"
    if cls.endswith("ForSequenceClassification"):
        return "sequence"
    return None


def as_reward_source(
    obj: Any,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    aggregation: str = "min",
    batch_size: int = 16,
    step_token: str | None = None,
    **model_kwargs: Any,
) -> Callable[..., list[float | None]]:
    """Normalise what a user passes as a reward source into something the loop can call.

    - a :class:`ProcessRewardModel`, :class:`OutcomeRewardModel` or other :class:`RewardSource`: returned
      unchanged;
    - a ``transformers`` model (or a PEFT model around one), which needs ``tokenizer``:
      a ``*ForTokenClassification`` model becomes a :class:`ProcessRewardModel` (Math-Shepherd layout unless
      ``layout=`` is given), Qwen2.5-Math-PRM's ``*ForProcessRewardModel`` a :class:`ProcessRewardModel` with
      ``layout="qwen-prm"``, and a ``*ForSequenceClassification`` model an :class:`OutcomeRewardModel`;
      ``aggregation`` and ``step_token`` (PRMs only), ``batch_size`` and ``model_kwargs`` go to the constructor;
    - any other callable ``f(prompts, completions, **kwargs) -> list[float | None]`` (a TRL reward function):
      returned unchanged, reported under its ``__name__`` (see :func:`reward_source_name`).

    Raises:
        TypeError: for anything else, or for a model without ``tokenizer``.
    """
    if isinstance(obj, RewardSource):
        return obj
    torch = sys.modules.get("torch")  # an object can only be a torch module if torch is imported
    if torch is not None and isinstance(obj, torch.nn.Module):
        kind = _head_kind(obj)
        if kind is None:
            raise TypeError(
                f"cannot use a {type(obj).__name__} as a reward source: pass a token-classification model "
                "(process reward model), a sequence-classification model (outcome reward model), or a callable "
                "f(prompts, completions, **kwargs) -> list[float | None]"
            )
        if tokenizer is None:
            raise TypeError(f"a {type(obj).__name__} reward model needs its tokenizer: pass `tokenizer=`")
        if kind == "sequence":
            return OutcomeRewardModel(obj, tokenizer, batch_size=batch_size, **model_kwargs)
        if kind == "qwen-prm":
            model_kwargs.setdefault("layout", "qwen-prm")
        return ProcessRewardModel(
            obj,
            tokenizer,
            aggregation=aggregation,
            batch_size=batch_size,
            step_token=step_token,
            **model_kwargs,
        )
    if callable(obj):
        return obj
    raise TypeError(
        f"cannot use {_describe(obj)} ({type(obj).__name__}) as a reward source: pass a callable "
        "f(prompts, completions, **kwargs) -> list[float | None], a ProcessRewardModel / OutcomeRewardModel, or "
        "a token- or sequence-classification model with its tokenizer"
    )
