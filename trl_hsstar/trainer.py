"""``HSStarTrainer`` (SFT) and ``HSStarDPOTrainer``: TRL-style trainers that run the HS-STaR loop.

What happens once per run, once per iteration and once per round::

    __init__   once per run: check the problems, the reward sources and the output directory (nothing expensive
               yet), load the policy as TRL would (LoRA / QLoRA included)
    train()    the phases of each iteration t, from trl_hsstar.run.HSStarRun:
                 resume:   a done iteration is skipped, its model loaded back
                 begin:    the iteration's problems; the reward source loaded and probed once
                 sample:   run_iteration() -- round 0 pre-samples, each later round re-estimates and re-allocates
                           (trl_hsstar.pipeline), every phase saved under output_dir/iteration-<t>/
                 train:    one ordinary TRL pass (SFTTrainer / DPOTrainer, built on the selected rows) continuing
                           from the current model, with its own optimizer and learning-rate schedule, as the release
                 save, evaluate, report: iteration-<t>/model, the held-out problems, stats.json and DONE
               cleanup: the verifier and the generation engine close

Each iteration's TRL trainer is built with the rows it trains on, through TRL's public constructor. The outer
object is a ``transformers.Trainer`` (``save_model``, ``push_to_hub``, ``state``, callbacks, ``report_to``) that
holds the model between passes; the run-wide step, log history, trackers and checkpoints are
:class:`~trl_hsstar.run.RunLog`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence

from datasets import Dataset
from transformers import PreTrainedModel, PrinterCallback, ProgressCallback, Trainer
from trl import DPOTrainer, SFTTrainer

from . import artifacts
from ._utils import model_name, quiet_progress_bars, short_model_name
from .config import HSStarConfig, HSStarDPOConfig
from .data import (
    check_launch,
    check_output_dir,
    drop_unverifiable,
    ids_digest,
    make_problems,
    problem_rows,
    split_iterations,
    warn_on_unsharded_fsdp,
)
from .hub import model_card, upload_files
from .models import load_policy, load_tokenizer
from .records import Problem
from .run import HSStarRun, RunLog, iteration_table
from .sampling import Sampler
from .sampling.engine import Generation
from .scoring import RunRewards

logger = logging.getLogger(__name__)

__all__ = ["HSStarDPOTrainer", "HSStarTrainer", "iteration_table"]

RewardFunc = str | PreTrainedModel | Callable[..., list]


def _resolve_args(model, args, config_cls, suffix: str, train_dataset):
    """The trainer's config (a default one named after the model if none is given), checked."""
    if args is None:
        name = short_model_name(model, "model")
        args = config_cls(output_dir=f"{name}-{suffix}")
    if not isinstance(args, config_cls):
        raise TypeError(f"`args` must be an {config_cls.__name__}, got {type(args).__name__}.")
    if train_dataset is None:
        raise ValueError("`train_dataset` (the problems) is required.")
    return args


class _HSStarBase(Trainer):
    """The loop both trainers share; a subclass names its objective and builds its TRL pass."""

    objective = "sft"
    config_class: type = HSStarConfig

    def __init__(
        self,
        model,
        args,
        train_dataset: Dataset | None,
        reward_funcs: RewardFunc | Sequence[RewardFunc] | None,
        *,
        reward_processing_classes=None,
        reward_weights: Sequence[float] | None = None,
        verifier: Callable[[str, str], bool] | None = None,
        sampler: Sampler | None = None,
        processing_class=None,
        callbacks=None,
        peft_config=None,
        quantization_config=None,
        eval_dataset: Dataset | None = None,
        **trl_kwargs,
    ):
        # -- checks, before anything expensive
        suffix = "HSStar" if self.objective == "sft" else "HSStar-DPO"
        args = _resolve_args(model, args, self.config_class, suffix, train_dataset)
        check_launch(args)
        check_output_dir(args.output_dir)
        rows, self.skipped_problems = drop_unverifiable(
            problem_rows(train_dataset, args), verifier, args.verifier_timeout
        )
        self.problem_rows = rows
        self.iteration_problems = split_iterations(rows, args)
        self.rewards = RunRewards(reward_funcs, reward_processing_classes, reward_weights, args)
        self.verifier = verifier
        # held-out problems, evaluated before the first iteration and after each one
        self.eval_problems = (
            None if eval_dataset is None else problem_rows(eval_dataset, args, name="eval_dataset")
        )

        # -- the policy and its tokenizer
        self.base_model_name = model_name(model)  # for the model card
        with quiet_progress_bars() if args.disable_tqdm else contextlib.nullcontext():
            model = load_policy(model, args, quantization_config, peft_config)
        if processing_class is None:
            processing_class = load_tokenizer(model, args)
        super().__init__(model=model, args=args, processing_class=processing_class, callbacks=callbacks)
        warn_on_unsharded_fsdp(self.accelerator.distributed_type.value)

        # -- the run: its log (each pass prints its own progress; the run prints a table), generation, the Hub
        self.user_callbacks = list(callbacks or [])
        for callback in list(self.callback_handler.callbacks):  # transformers' own printers, not a user's
            if type(callback) in (PrinterCallback, ProgressCallback) and callback not in self.user_callbacks:
                self.remove_callback(callback)
        self.run_log = RunLog(
            args, self.state, self.callback_handler.callbacks, self.user_callbacks, self.accelerator
        )
        self.trl_kwargs = trl_kwargs  # passed on to each iteration's TRL trainer (data_collator, ...)
        self.generation = Generation(args, self.accelerator, processing_class, sampler)
        self.iteration_stats: list[dict] = []
        self.iterations_run = 0  # iterations computed by the last train() call (a resume skips finished ones)
        self.pushed_model_dir: str | None = None  # the last model folder uploaded, so that none goes up twice
        self.push_future = None

    # -- the loop

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run the HS-STaR iterations. ``resume_from_checkpoint`` is not used: a rerun resumes from ``output_dir``."""
        if resume_from_checkpoint not in (None, False):
            logger.warning(
                "`resume_from_checkpoint` is ignored by HS-STaR trainers: rerunning with the same `output_dir` "
                "resumes at the first unfinished phase."
            )
        with HSStarRun(self, {"ignore_keys_for_eval": ignore_keys_for_eval, **kwargs}) as run:
            for t in range(self.args.num_iterations):
                if run.resume(t):  # a finished iteration: skipped, its model loaded before the next one runs
                    continue
                problems = run.begin(t)  # on_iteration_begin; the reward source loaded and probed once
                if run.should_stop:
                    break
                result, stats = run.sample(t, problems)  # the rounds: levels, allocation, training rows
                run.train(t, stats)  # one TRL pass on the rows
                run.save(t)  # iteration-<t>/model
                run.evaluate(t, stats)  # the held-out problems
                run.report(t, stats, result)  # stats.json, DONE, trackers, table, Hub, on_iteration_end
                if run.should_stop:
                    break
            return run.finish()

    def trl_pass(self, dataset: Dataset, args, callbacks: list) -> SFTTrainer | DPOTrainer:
        """The TRL trainer of one iteration's pass, on ``dataset`` (each trainer builds its own)."""
        raise NotImplementedError

    # -- pieces the run uses

    def problems(self, rows: list[dict]) -> list[Problem]:
        """Checked problem rows as records, their prompts rendered with this trainer's tokenizer."""
        return make_problems(rows, self.processing_class, self.args.chat_template_kwargs)

    def manifest(self) -> dict:
        """What a resume must match (:class:`~trl_hsstar.artifacts.RunManifest`): the problems and the settings."""
        thresholds = self.rewards.thresholds
        return {
            "objective": self.objective,
            "num_problems": len(self.problem_rows),
            "problems_skipped": len(self.skipped_problems),
            "problem_ids_sha": ids_digest(self.problem_rows),
            "problems_per_iteration": len(self.iteration_problems[0]),
            "reward_thresholds": list(thresholds) if thresholds else None,
            **self.args.data_settings(),
        }

    # -- saving and the Hub

    def save_model(self, output_dir: str | None = None, *args, **kwargs) -> None:
        """``Trainer.save_model``, without progress bars under ``disable_tqdm``; with ``push_to_hub``, the upload
        is :meth:`push_to_hub`'s (the last iteration's model, once)."""
        with quiet_progress_bars() if self.args.disable_tqdm else contextlib.nullcontext():
            super().save_model(output_dir, *args, **kwargs)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token=None,
        revision=None,
        **kwargs,
    ):
        """Upload the model of the last finished iteration (full weights or adapter) with its model card.

        Only the model folder goes up (:func:`~trl_hsstar.hub.upload_files`: no caches, samples or partial
        folders), and a folder already uploaded is not uploaded again. Returns what ``HfApi.upload_folder``
        returns (a future when ``blocking=False``), or ``None`` when there was nothing new to push.
        """
        from huggingface_hub import HfApi
        from peft import PeftModel

        if not self.is_world_process_zero():
            return None
        if not self.iteration_stats:
            raise ValueError(
                "push_to_hub: no HS-STaR iteration has finished yet, so there is no model to push."
            )
        folder = artifacts.IterationArtifacts(
            self.args.output_dir, self.iteration_stats[-1]["iteration"]
        ).model_dir
        if str(folder) == self.pushed_model_dir:
            return None
        if self.push_future is not None:  # one upload at a time
            self.push_future.result()
        card = model_card(
            repo_id=self.hub_model_id,
            base_model=self.base_model_name,
            objective=self.objective,
            reward_source=self.rewards.describe(),
            iteration_stats=self.iteration_stats,
            allocation=self.args.allocation,
            adapter=isinstance(self.model, PeftModel),
        )
        artifacts.atomic_write_text(os.path.join(folder, "README.md"), card)
        result = HfApi().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=str(folder),
            allow_patterns=upload_files(folder),
            commit_message=commit_message,
            token=token if token is not None else self.args.hub_token,
            revision=revision if revision is not None else self.args.hub_revision,
            run_as_future=not blocking,
        )
        self.pushed_model_dir = str(folder)
        self.push_future = None if blocking else result
        return result


# ---------------------------------------------------------------------------------------------------------------
# The trainers


class HSStarTrainer(_HSStarBase):
    """Runs HS-STaR with SFT: each iteration trains (with TRL's ``SFTTrainer``) on the correct rationales of boundary
    problems.

    Args:
        model: a model id or path, or a model instance (as for ``SFTTrainer``).
        args: an :class:`~trl_hsstar.HSStarConfig`.
        train_dataset: the problems: a ``prompt`` column (text or chat messages) and a reference answer column
            (``args.answer_column``, default ``"answer"``); optionally a unique ``id`` column. Other columns are
            passed to reward functions.
        reward_funcs: the reward source(s) giving S(r): a process reward model (instance, or Hub id / path), an
            outcome reward model, or TRL-style reward functions ``f(prompts, completions, **columns)``. Needed
            unless ``difficulty_estimator="accuracy"``.
        reward_processing_classes: tokenizer(s) of reward model instances.
        reward_weights: weights when several reward sources are given (their weighted sum is S(r)).
        verifier: ``f(completion, reference) -> bool``; default :class:`~trl_hsstar.MathVerifier`.
        sampler: a :class:`~trl_hsstar.sampling.Sampler`; default transformers ``generate`` on the trained model.
        processing_class, callbacks, peft_config, quantization_config: as for ``SFTTrainer``. Anything else (e.g.
            ``data_collator``, ``formatting_func``) is passed to each iteration's ``SFTTrainer``.
    """

    objective = "sft"
    config_class = HSStarConfig

    def __init__(
        self,
        model,
        args: HSStarConfig | None = None,
        train_dataset: Dataset | None = None,
        reward_funcs: RewardFunc | Sequence[RewardFunc] | None = None,
        **kwargs,
    ):
        super().__init__(model, args, train_dataset, reward_funcs, **kwargs)

    def trl_pass(self, dataset: Dataset, args, callbacks: list) -> SFTTrainer:
        return SFTTrainer(
            model=self.model,
            args=args,
            train_dataset=dataset,
            processing_class=self.processing_class,
            callbacks=callbacks,
            **self.trl_kwargs,
        )


class HSStarDPOTrainer(_HSStarBase):
    """Runs HS-STaR with DPO (TRL's ``DPOTrainer``) on the authors' pairs of boundary problems.

    The reference of iteration t is the policy at its start, M_t: with ``precompute_ref_log_probs=True`` (the
    default) its log-probabilities are computed once per iteration before training, so no second model is held;
    with PEFT, TRL copies the adapter as it is at the start of the pass to a frozen ``"ref"`` adapter. Arguments as
    for :class:`HSStarTrainer`, plus ``ref_model`` (a fixed reference instead).
    """

    objective = "dpo"
    config_class = HSStarDPOConfig

    def __init__(
        self,
        model,
        args: HSStarDPOConfig | None = None,
        train_dataset: Dataset | None = None,
        reward_funcs: RewardFunc | Sequence[RewardFunc] | None = None,
        *,
        ref_model=None,
        **kwargs,
    ):
        if ref_model is None and args is not None and not getattr(args, "precompute_ref_log_probs", True):
            raise ValueError(
                "Without `ref_model`, HSStarDPOTrainer needs `precompute_ref_log_probs=True`: the reference of each "
                "iteration is the policy at its start, computed once per iteration."
            )
        self.ref_model = ref_model
        super().__init__(model, args, train_dataset, reward_funcs, **kwargs)

    def trl_pass(self, dataset: Dataset, args, callbacks: list) -> DPOTrainer:
        from peft import PeftModel

        if self.ref_model is None and isinstance(self.model, PeftModel) and "ref" in self.model.peft_config:
            # last pass's reference; TRL copies the adapter as it is now, M_t
            self.model.delete_adapter("ref")
        return DPOTrainer(
            model=self.model,
            ref_model=self.ref_model,
            args=args,
            train_dataset=dataset,
            processing_class=self.processing_class,
            callbacks=callbacks,
            **self.trl_kwargs,
        )
