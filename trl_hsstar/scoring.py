"""The run's reward: the reward sources of ``reward_funcs`` loaded once, combined, checked, and the thresholds.

What a user passes (a process or outcome reward model, its Hub id or path, TRL-style reward functions, with
weights) becomes one ``score_fn(prompts, completions, **columns) -> list[float | None]`` that calls each source
exactly as GRPOTrainer calls a reward function. A NaN counts as "cannot score" (None), whatever the number of
sources, so that one strange completion does not stop a run hours in; the source is called once on a real problem
before any sampling so that a wrong output fails at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ._utils import model_name
from .difficulty import lookup_thresholds
from .models import safe_loading
from .records import Problem
from .rewards import as_reward_source, check_rewards, combine_rewards, probe_inputs, reward_source_name

logger = logging.getLogger(__name__)

__all__ = ["RunRewards", "load_reward_model"]


class RunRewards:
    """The reward sources of one run: checked at construction, loaded on the first iteration that needs them."""

    def __init__(self, reward_funcs, processing_classes, weights: Sequence[float] | None, args):
        funcs = (
            []
            if reward_funcs is None
            else list(reward_funcs)
            if isinstance(reward_funcs, (list, tuple))
            else [reward_funcs]
        )
        if weights is not None and len(weights) != len(funcs):
            raise ValueError(
                f"`reward_weights` has {len(weights)} entries for {len(funcs)} reward functions: give one weight "
                "per reward function."
            )
        if not isinstance(processing_classes, (list, tuple)):
            processing_classes = [processing_classes] * len(funcs)
        self.specs = list(zip(funcs, processing_classes))
        self.weights = list(weights) if weights is not None else None
        self.args = args
        self.thresholds = self._thresholds(funcs)
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, dict] = {}  # completion text -> the columns reward functions logged for it

    def _thresholds(self, funcs) -> tuple[float, float] | None:
        args = self.args
        if args.difficulty_estimator == "accuracy":
            return None
        if not funcs:
            raise ValueError(
                f"`difficulty_estimator={args.difficulty_estimator!r}` needs a reward source: pass `reward_funcs` (a "
                "process reward model, its path, or a reward function), or set `difficulty_estimator='accuracy'`."
            )
        if args.reward_thresholds is not None:  # checked by the config
            return tuple(args.reward_thresholds)
        if getattr(args, "calibrate_thresholds", False):  # each iteration's pre-samples decide
            return None
        names = [model_name(f) for f in funcs]
        found = [lookup_thresholds(n) for n in names if n]
        if not found or found[0] is None:
            raise ValueError(
                "`reward_thresholds` (tau_l, tau_h) is required: no thresholds are published for the reward "
                f"source {names[0] or funcs[0]!r}. Published pairs exist only for Skywork-o1-Open-PRM-Qwen-2.5-"
                "7B/1.5B and Qwen2.5-Math-PRM-7B; set `calibrate_thresholds=True` to take them from each iteration's "
                "pre-samples, or choose them on a held-out pre-sample."
            )
        return found[0]

    def score_fn(self, device, tokenizer=None, state: Callable | None = None) -> Callable | None:
        """The combined score function, its sources loaded onto ``device`` (``None`` without reward sources).

        Each source is called as GRPOTrainer calls a reward function; ``completion_ids`` are the completions
        tokenized with ``tokenizer`` (the policy's), ``trainer_state`` is ``state()``.
        """
        if not self.specs:
            return None
        sources = []
        for i, (func, processing_class) in enumerate(self.specs):
            try:
                if isinstance(func, str):
                    sources.append(load_reward_model(func, self.args, device))
                else:
                    sources.append(
                        as_reward_source(
                            func,
                            tokenizer=processing_class,
                            aggregation=self.args.reward_aggregation,
                            batch_size=self.args.reward_batch_size,
                            step_token=self.args.reward_step_token,
                        )
                    )
            except ValueError as error:
                raise ValueError(
                    f"`reward_funcs[{i}]` ({model_name(func) or type(func).__name__}) cannot be used: {error}. For a "
                    "process reward model, set `reward_step_token` to the separator it was trained with."
                ) from error
        combined = (
            sources[0]
            if len(sources) == 1 and self.weights is None
            else combine_rewards(sources, self.weights)
        )
        name = getattr(combined, "name", None) or getattr(combined, "__name__", "reward")

        def score_fn(prompts, completions, **columns):
            # GRPOTrainer's call, by keyword: the ids of each completion, the trainer state, the two logging hooks
            # and every dataset column under its own name
            extra: dict[str, list] = {}
            values = combined(
                prompts=prompts,
                completions=completions,
                completion_ids=_completion_ids(tokenizer, completions),
                trainer_state=state() if state is not None else None,
                log_extra=lambda column, vals: extra.setdefault(column, []).extend(vals),
                log_metric=lambda metric, value: self.metrics.setdefault(metric, []).append(float(value)),
                **columns,
            )
            texts = _texts(completions)
            for column, vals in extra.items():  # one value per completion, kept beside the completion's text
                for text, value in zip(texts, vals):
                    self.extra.setdefault(text, {})[column] = value
            return check_rewards(
                values, len(completions), name
            )  # NaN becomes None, one policy for all sources

        return score_fn

    def pop_logs(self) -> tuple[dict[str, float], dict[str, dict]]:
        """What reward functions logged through GRPO's hooks since the last call: the mean of each ``log_metric``
        metric, and the ``log_extra`` columns by completion text (for the completions table); both are reset."""
        metrics = {k: sum(v) / len(v) for k, v in self.metrics.items() if v}
        extra, self.metrics, self.extra = self.extra, {}, {}
        return metrics, extra

    def describe(self) -> str | None:
        """The reward sources by name, as the model card reports them (``None`` without any)."""
        if not self.specs:
            return None
        return " + ".join(model_name(f) or reward_source_name(f) for f, _ in self.specs)

    def probe(self, score_fn, problem: Problem) -> None:
        """Call the reward source once on two tiny completions of a real problem, so that a reward function with
        the wrong output (length, type) fails here, before any sampling, and not hours into a run."""
        prompts, completions = probe_inputs(problem.prompt, problem.answer)
        columns = {k: [v] * 2 for k, v in problem.columns.items()}
        try:
            score_fn(prompts, completions, **columns)
            self.pop_logs()  # what the check logged is not the iteration's
        except Exception as error:
            raise ValueError(
                f"The reward source failed its check on problem {problem.problem_id!r} before sampling: {error}. "
                "Fix the reward function (`reward_funcs`): it must return one float (or None) per completion."
            ) from error


def _completion_ids(tokenizer, completions) -> list[list[int]] | None:
    """Each completion's token ids (its text re-tokenized; a conversational completion's assistant content)."""
    if tokenizer is None:
        return None
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in _texts(completions)]


def _texts(completions) -> list[str]:
    """A completion's text: itself, or a conversational completion's assistant content."""
    return [c if isinstance(c, str) else "".join(str(m.get("content", "")) for m in c) for c in completions]


def load_reward_model(name: str, args, device):
    """Load a reward model from the Hub or a directory (a PRM, Qwen2.5-Math-PRM style or Math-Shepherd layout, or
    an ORM) with the Auto class its config names; :func:`~trl_hsstar.rewards.as_reward_source` wraps it.

    Safe by default, like the policy in the recipes: ``trust_remote_code`` is the user's
    (``args.model_init_kwargs["trust_remote_code"]``, else ``args.trust_remote_code``, else ``False``), and only
    safetensors weights are loaded (``use_safetensors=True``) unless ``args.model_init_kwargs`` sets
    ``use_safetensors``: a checkpoint holding only pickle-based ``pytorch_model.bin`` files is refused with an
    ``OSError`` that says how to opt in.
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    safety = safe_loading(args)
    trust = {"trust_remote_code": safety["trust_remote_code"]}
    use_safetensors = safety["use_safetensors"]
    archs = " ".join(AutoConfig.from_pretrained(name, **trust).architectures or [])
    if "ProcessRewardModel" in archs:  # custom code, loaded through AutoModel
        auto = AutoModel
    elif "TokenClassification" in archs:
        auto = AutoModelForTokenClassification
    else:
        auto = AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(name, use_safetensors=use_safetensors, **trust)
    except OSError as e:
        if use_safetensors and "safetensors" in str(e):
            raise OSError(
                f"reward model {name!r} has no safetensors weights (model.safetensors). trl-hsstar loads only "
                "safetensors by default, because pickle-based checkpoints (pytorch_model.bin) can run code when "
                "loaded. Convert it to safetensors, or, if you trust its source, set "
                "`model_init_kwargs={'use_safetensors': False}`."
            ) from e
        raise
    return as_reward_source(
        model.to(device),
        tokenizer=AutoTokenizer.from_pretrained(name, **trust),
        aggregation=args.reward_aggregation,
        batch_size=args.reward_batch_size,
        step_token=args.reward_step_token,
    )
