"""``HSStarTrainer`` (SFT) and ``HSStarDPOTrainer``: TRL-style trainers that run the HS-STaR loop.

What happens once per run, once per iteration and once per round::

    __init__   once per run: check the problems, the reward sources and the output directory (nothing expensive
               yet), load the policy as TRL would (LoRA / QLoRA included)
    train()    once per run: the manifest, the verifier; then for each iteration t:
                 resume: a done iteration is skipped, its model loaded back
                 data:   run_iteration() -- round 0 pre-samples, each later round re-estimates and re-allocates
                         (trl_hsstar.pipeline), every phase saved under output_dir/iteration-<t>/
                 train:  one ordinary TRL pass (SFTTrainer / DPOTrainer, built on the selected rows) continuing from
                         the current model, with its own optimizer and learning-rate schedule, as the release does
                 save:   iteration-<t>/model, stats.json, DONE
               cleanup: the verifier and the generation engine close

Each iteration's TRL trainer is built with the rows it trains on, through TRL's public constructor, so nothing
here fills a stand-in dataset or resets TRL's private state. The outer object is a ``transformers.Trainer``
(``save_model``, ``push_to_hub``, ``state``, callbacks, ``report_to``) that holds the model between passes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset
from transformers import (
    AutoTokenizer,
    DefaultFlowCallback,
    PreTrainedModel,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    set_seed,
)
from transformers.trainer_utils import TrainOutput
from trl import DPOTrainer, SFTTrainer
from trl.trainer.utils import create_model_from_path

from . import artifacts as A
from ._compat import load_checkpoint, save_model_without_push
from ._utils import model_name, publish_dir, quiet_progress_bars, short_model_name
from .callbacks import emit
from .config import HSStarConfig, HSStarDPOConfig
from .data import (
    check_launch,
    check_output_dir,
    drop_unverifiable,
    ids_digest,
    problem_rows,
    split_iterations,
)
from .distributed import AccelerateCollective
from .evaluation import evaluate, save
from .hub import model_card, upload_files
from .models import resolve_model
from .pipeline import PipelineEvents, PipelineSettings, run_iteration
from .records import Problem
from .sampling import Sampler, SamplingParams
from .sampling.engine import Generation
from .scoring import RunRewards
from .verify import MathVerifier

logger = logging.getLogger(__name__)

__all__ = ["HSStarDPOTrainer", "HSStarTrainer"]

RewardFunc = str | PreTrainedModel | Callable[..., list]


def _load_policy(model, args, quantization_config=None, peft_config=None):
    """The policy as TRL's trainers load it: from an id or path with ``model_init_kwargs`` (and a quantization
    config), then wrapped in a PEFT adapter when ``peft_config`` is given (prepared for k-bit training first)."""
    model, init_kwargs = resolve_model(
        model, args.model_init_kwargs
    )  # a GGUF file: de-quantized once, cached
    if isinstance(model, str):
        kwargs = {"use_safetensors": True, **init_kwargs}  # no unpickling unless asked for
        if quantization_config is not None:
            if "quantization_config" in kwargs:
                raise ValueError(
                    "`quantization_config` is set both as a trainer argument and in `args.model_init_kwargs`: set "
                    "it in one place."
                )
            kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED", "FSDP"):
            kwargs["device_map"] = (
                None  # each process loads the whole model; DDP moves it, FSDP/ZeRO shard it
            )
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        set_seed(args.seed)
        model = create_model_from_path(model, **kwargs)
    if peft_config is not None:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=args.gradient_checkpointing,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            )
        set_seed(args.seed)  # the adapter's initial weights
        model = get_peft_model(model, peft_config)
    return model


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


class _Events(PipelineEvents):
    """The pipeline's events, forwarded to the trainer's callbacks."""

    def __init__(self, trainer: _HSStarBase, iteration: int):
        self.trainer, self.iteration = trainer, iteration

    def levels_estimated(self, difficulties, resamples):
        self.trainer._emit(
            "on_levels_estimated", self.iteration, difficulties=difficulties, resamples=resamples
        )

    def rows_selected(self, rows):
        return self.trainer._emit("on_rows_selected", self.iteration, rows=rows)


class _PassRelay(TrainerCallback):
    """Carries one training pass's logs and checkpoints over to the run, at the run's step: the steps of the
    earlier passes plus this pass's own, so trackers draw one curve and checkpoint names never repeat."""

    def __init__(self, trainer: _HSStarBase, offset: int):
        self.trainer, self.offset = trainer, offset

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.trainer.state.global_step = self.offset + state.global_step
        self.trainer._log_quietly(dict(logs or {}), trackers_only=True)

    def on_save(self, args, state, control, **kwargs):
        self.trainer.accelerator.wait_for_everyone()  # every process has written its part of the checkpoint
        if state.is_world_process_zero:
            src = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.trainer._publish_checkpoint(src, self.offset + state.global_step)


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
            model = _load_policy(model, args, quantization_config, peft_config)
        if processing_class is None:
            trust = (args.model_init_kwargs or {}).get("trust_remote_code", args.trust_remote_code)
            processing_class = AutoTokenizer.from_pretrained(model_name(model), trust_remote_code=trust)
        super().__init__(model=model, args=args, processing_class=processing_class, callbacks=callbacks)
        self.user_callbacks = list(callbacks or [])
        # passed on to each iteration's TRL trainer (data_collator, formatting_func, ...)
        self.trl_kwargs = trl_kwargs
        self.generation = Generation(args, self.accelerator, processing_class, sampler)
        self.hsstar_control = TrainerControl()
        self.iteration_stats: list[dict] = []
        self.pushed_model_dir: str | None = None  # the last model folder uploaded, so that none goes up twice
        self.push_future = None
        self.iterations_run = 0  # iterations computed by the last train() call (a resume skips finished ones)

    # -- the loop

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run the HS-STaR iterations. ``resume_from_checkpoint`` is not used: a rerun resumes from ``output_dir``."""
        args = self.args
        if resume_from_checkpoint not in (None, False):
            logger.warning(
                "`resume_from_checkpoint` is ignored by HS-STaR trainers: rerunning with the same `output_dir` "
                "resumes at the first unfinished phase."
            )
        distributed = self.accelerator.distributed_type.value
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and distributed != "FSDP":
            # accelerate applies FSDP to GPU-type processes only; CPU processes get plain data parallelism
            logger.warning(
                "accelerate was asked for FSDP but this run is %s: it shards only accelerator (GPU/XPU/NPU) "
                "processes, so these processes hold full replicas (DDP). Levels, allocation and rows are the same.",
                distributed,
            )
        if self.accelerator.is_main_process:
            A.RunManifest(args.output_dir).check_or_write(self._manifest())
            if self.skipped_problems:
                A.atomic_write_text(
                    os.path.join(args.output_dir, "skipped_problems.jsonl"),
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.skipped_problems),
                )
        self.hsstar_control = control = TrainerControl()
        fallback = args.last_number_fallback
        if fallback is None:  # instruct models (chat prompts) answer in free text
            fallback = not isinstance(self.problem_rows[0]["prompt"], str)
        verifier = self.verifier or MathVerifier(timeout=args.verifier_timeout, last_number_fallback=fallback)
        score_fn, scored = None, False  # reward models load on the first iteration that needs them
        output = TrainOutput(global_step=0, training_loss=float("nan"), metrics={})
        self.iteration_stats = []
        self.state.global_step = 0  # the run's step: every pass's steps, one after the other
        self.iterations_run = 0
        for callback in self._trackers():
            callback.on_train_begin(args, self.state, self.control, model=self.model)
        pending_restore = None
        quiet = contextlib.ExitStack()
        if args.disable_tqdm:  # respected everywhere: datasets' and transformers' bars too
            quiet.enter_context(quiet_progress_bars(datasets_too=True))
        try:
            for t in range(args.num_iterations):
                store = A.IterationArtifacts(args.output_dir, t)
                if store.done:  # resume: skip it, and load its model before the next one runs
                    pending_restore = store.model_dir
                    self.iteration_stats.append(store.read_json(A.STATS))
                    self.state.global_step += self.iteration_stats[-1].get("train_steps", 0)
                    continue
                if pending_restore is not None:
                    self._restore(pending_restore)
                    pending_restore = None
                problems = [
                    Problem(
                        r["problem_id"], r["prompt"], self._render(r["prompt"]), r["answer"], r["columns"]
                    )
                    for r in self.iteration_problems[t]
                ]
                self._emit("on_iteration_begin", t, problems=problems)
                if control.should_training_stop:
                    break
                if not scored:
                    score_fn = self.rewards.score_fn(
                        self.accelerator.device, self.processing_class, lambda: self.state
                    )
                    scored = True
                    if score_fn is not None:
                        self.rewards.probe(score_fn, self.iteration_problems[t][0])

                # data: the rounds of this iteration
                sampler = self.generation.sampler(
                    self.model, t, A.IterationArtifacts(args.output_dir, t - 1).model_dir
                )
                initial = os.path.join(args.output_dir, "eval-initial")
                if (
                    t == 0 and self.eval_problems is not None and not os.path.exists(initial)
                ):  # the starting model
                    self._evaluate_held_out(sampler, verifier, initial)
                result = run_iteration(
                    problems,
                    store=store,
                    sampler=sampler,
                    verifier=verifier,
                    score_fn=score_fn,
                    settings=self._settings(t),
                    events=_Events(self, t),
                    collective=AccelerateCollective(self.accelerator),
                    progress=not args.disable_tqdm,
                )
                stats = {
                    "iteration": t,
                    "sampler": sampler.name,
                    "distributed_type": distributed,
                    **result.stats,
                }
                reward_metrics, reward_extra = self.rewards.pop_logs()  # what reward functions logged
                if reward_metrics:
                    stats["reward_metrics"] = reward_metrics

                # train: one TRL pass on the selected rows
                if stats["rows"] and not control.should_training_stop:
                    self.generation.sleep()  # its GPU memory goes to training
                    output = self._train_pass(store, t, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
                    self.generation.wake()
                    stats["train_loss"] = output.training_loss
                    stats["train_steps"] = output.global_step
                    stats["train_runtime"] = output.metrics.get("train_runtime")
                elif not stats["rows"]:
                    logger.warning(
                        "Iteration %d selected no training rows: the model is carried over unchanged.", t
                    )

                # save, and evaluate the new model on the held-out problems
                self._save_iteration_model(store)
                if self.eval_problems is not None:
                    sampler = self.generation.sampler(self.model, t + 1, store.model_dir)
                    stats["eval"] = self._evaluate_held_out(sampler, verifier, str(store.dir / "eval"))
                if self.accelerator.is_main_process:
                    store.write_json(A.STATS, stats)
                    store.mark_done()
                self.iteration_stats.append(stats)
                self._log_quietly(_flat_metrics(stats))
                if self.is_world_process_zero():  # one row per iteration, not the raw dict of figures
                    print(iteration_table([stats], header=not self.iterations_run), flush=True)
                self.iterations_run += 1
                self._log_completions(store, result.difficulties, reward_extra)
                if args.push_to_hub and (args.hub_strategy != "end" or t == args.num_iterations - 1):
                    self.push_to_hub(commit_message=f"HS-STaR iteration {t}", blocking=False)
                self._emit("on_iteration_end", t, stats=stats)
                if control.should_training_stop:
                    break
            if pending_restore is not None:
                self._restore(pending_restore)
            if not self.iterations_run and len(self.iteration_stats) == args.num_iterations:
                logger.warning(
                    "Nothing to do: this run finished earlier (%d iterations in %s); its last model is loaded. Pass "
                    "a new `output_dir` to start another run.",
                    args.num_iterations,
                    args.output_dir,
                )
        finally:
            if self.verifier is None:
                verifier.close()
            self.generation.close()
            for callback in self._trackers():
                callback.on_train_end(args, self.state, self.control, model=self.model)
            if self.push_future is not None:  # the last upload finishes before train() returns
                self.push_future.result()
            quiet.close()
        return TrainOutput(self.state.global_step, output.training_loss, output.metrics)

    # -- one TRL training pass

    def _trl_trainer(self, dataset: Dataset, args, callbacks: list) -> SFTTrainer | DPOTrainer:
        raise NotImplementedError  # each trainer builds its own

    def _train_pass(self, store: A.IterationArtifacts, iteration: int, **train_kwargs) -> TrainOutput:
        """Train on the iteration's rows with a TRL trainer built for them: a fresh optimizer and learning-rate
        schedule per iteration, as each iteration of the release is a new run. Its logs reach the run's trackers
        and its checkpoints the run's ``output_dir`` at the run's step (:class:`_PassRelay`)."""
        columns = ["prompt", "completion"] if self.objective == "sft" else ["prompt", "chosen", "rejected"]
        # one process fills the datasets cache, the others read it; no bars for this bookkeeping
        with self.accelerator.main_process_first(), quiet_progress_bars(datasets_too=True):
            dataset = Dataset.from_json(str(store.path(A.TRAIN_ROWS)), cache_dir=str(store.dir / ".cache"))
            dataset = dataset.select_columns(columns)
        args = copy.copy(self.args)
        args.model_init_kwargs = None  # the model is loaded already
        args.output_dir = str(store.dir / "pass")  # its checkpoints move on to run-wide names
        args.report_to = []  # the run's trackers get the pass's logs through the relay
        args.push_to_hub = False  # the run pushes once per iteration end
        args.save_total_limit = None  # applied over the run's checkpoints
        offset = self.state.global_step
        with quiet_progress_bars(datasets_too=True):  # TRL's tokenizing of a few hundred rows, not a phase
            trainer = self._trl_trainer(dataset, args, [*self.user_callbacks, _PassRelay(self, offset)])
        output = trainer.train(**train_kwargs)
        self.state.global_step = offset + trainer.state.global_step
        # every process out of the pass (transformers globs its output_dir as train() ends) before it goes
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(args.output_dir, ignore_errors=True)
        return output

    def _trackers(self) -> list[TrainerCallback]:
        """The run's ``report_to`` integrations: the callbacks that are neither the user's nor the terminal's."""
        own = (DefaultFlowCallback, PrinterCallback, ProgressCallback, _PassRelay)
        return [
            c
            for c in self.callback_handler.callbacks
            if c not in self.user_callbacks and not isinstance(c, own)
        ]

    def _log_quietly(self, logs: dict, trackers_only: bool = False) -> None:
        """``Trainer.log`` at the run's step without the terminal printers (the loop prints its own table); with
        ``trackers_only``, a training pass's entry (the pass printed it and told the user's callbacks)."""
        self.state.log_history.append({**logs, "step": self.state.global_step})
        callbacks = self._trackers() if trackers_only else self.callback_handler.callbacks
        for callback in callbacks:
            if not isinstance(callback, (PrinterCallback, ProgressCallback)):
                callback.on_log(self.args, self.state, self.hsstar_control, logs=logs)

    def _log_completions(
        self, store: A.IterationArtifacts, difficulties: dict, extra: dict, k: int = 8
    ) -> None:
        """A table of the iteration's first ``k`` pre-samples, for trackers that take tables (TensorBoard as
        markdown text, Weights & Biases as a ``wandb.Table``), as GRPOTrainer logs its completions; the columns
        reward functions logged with ``log_extra`` are added for the samples this process scored."""
        if not self.is_world_process_zero() or not store.has(A.scored_file(0)):
            return
        rows = [
            {
                "problem_id": r["problem_id"],
                "level": difficulties[r["problem_id"]].level.value if r["problem_id"] in difficulties else "",
                "completion": r["completion"],
                "correct": bool(r["correct"]),
                "reward": r["reward"],
            }
            for r in store.read_jsonl(A.scored_file(0))[:k]
        ]
        columns = sorted({c for r in rows for c in extra.get(r["completion"], {})})
        for r in rows:
            r.update({c: extra.get(r["completion"], {}).get(c) for c in columns})
        if not rows:
            return
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        markdown = "\n".join(
            ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            + ["| " + " | ".join(cell(v) for v in r.values()) + " |" for r in rows]
        )
        for callback in self._trackers():
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.add_text("hsstar/completions", markdown, self.state.global_step)
                writer.flush()
        if "wandb" in self.args.report_to:
            import wandb

            if wandb.run is not None:
                table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
                wandb.log({"hsstar/completions": table})

    def _publish_checkpoint(self, src: str, step: int) -> None:
        """Move a pass's checkpoint to ``output_dir/checkpoint-<run step>``; keep the newest ``save_total_limit``."""
        dst = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        publish_dir(src, dst)  # replaces one left by an interrupted attempt at this iteration
        limit = self.args.save_total_limit
        if limit:
            steps = sorted(
                int(m.group(1))
                for n in os.listdir(self.args.output_dir)
                if (m := re.fullmatch(r"checkpoint-(\d+)", n))
            )
            for old in steps[: max(len(steps) - limit, 0)]:
                shutil.rmtree(os.path.join(self.args.output_dir, f"checkpoint-{old}"), ignore_errors=True)

    # -- pieces

    def _evaluate_held_out(self, sampler, verifier, output_dir: str) -> dict | None:
        """Greedy (and ``eval_num_samples``-sample) accuracy on the held-out problems, on the main process; the
        rows and summary are saved in ``output_dir``, the figures logged as ``eval/...``."""
        args, summary = self.args, None
        if hasattr(sampler, "progress"):  # here the sampler's bar is the only one
            sampler.progress = not args.disable_tqdm
        if self.accelerator.is_main_process:
            problems = [
                Problem(r["problem_id"], r["prompt"], self._render(r["prompt"]), r["answer"], r["columns"])
                for r in self.eval_problems
            ]
            rows, summary = evaluate(
                problems,
                sampler,
                verifier,
                k=args.eval_num_samples,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_completion_length,
                seed=args.seed,
                sampling=self._sampling_knobs(),
            )
            save(rows, summary, output_dir)
            self._log_quietly({f"eval/{k}": v for k, v in summary.items() if "@" in k or k == "greedy"})
        if hasattr(sampler, "progress"):
            sampler.progress = False
        self.accelerator.wait_for_everyone()
        return summary

    def _restore(self, model_dir) -> None:
        logger.info("Resuming: loading the model of the last completed iteration from %s", model_dir)
        with quiet_progress_bars():
            load_checkpoint(self, model_dir)

    def _save_iteration_model(self, store: A.IterationArtifacts) -> None:
        # every process calls save_model (sharded weights are gathered), only the main one writes
        tmp = store.tmp_dir(A.MODEL, create=self.accelerator.is_main_process)
        with quiet_progress_bars():
            save_model_without_push(self, str(tmp))  # the run pushes once per iteration end, not per save
        if self.accelerator.is_main_process:
            store.publish_dir(tmp, A.MODEL)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, without progress bars under ``disable_tqdm``; with ``push_to_hub``, the upload
        is :meth:`push_to_hub`'s (the last iteration's model, once)."""
        with quiet_progress_bars() if self.args.disable_tqdm else contextlib.nullcontext():
            super().save_model(output_dir, _internal_call)

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
        folder = A.IterationArtifacts(self.args.output_dir, self.iteration_stats[-1]["iteration"]).model_dir
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
        A.atomic_write_text(os.path.join(folder, "README.md"), card)
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

    def _render(self, prompt: Any) -> str:
        if isinstance(prompt, str):
            return prompt
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        return tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True, **(self.args.chat_template_kwargs or {})
        )

    def _emit(self, event: str, iteration: int, **payload):
        return emit(
            self.callback_handler.callbacks,
            event,
            self.args,
            self.state,
            self.hsstar_control,
            model=self.model,
            processing_class=self.processing_class,
            iteration=iteration,
            **payload,
        )

    def _settings(self, iteration: int) -> PipelineSettings:
        args = self.args
        return PipelineSettings(
            budget=args.sampling_budget,
            num_presamples=args.num_presamples,
            allocation=args.allocation,
            difficulty_estimator=args.difficulty_estimator,
            reward_thresholds=self.rewards.thresholds,
            train_levels=tuple(args.train_levels),
            resample_levels=tuple(args.resample_levels),
            max_rows_per_problem=args.max_rows_per_problem,
            objective=self.objective,
            seed=args.seed + iteration,
            chunk_size=args.sampling_chunk_size,
            resample_rounds=args.resample_rounds,
            min_row_score=args.min_row_score,
            calibrate_thresholds=args.calibrate_thresholds,
            sampling=SamplingParams(
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_completion_length,
                seed=args.seed + 1000 * (iteration + 1),
                **self._sampling_knobs(),
            ),
        )

    def _sampling_knobs(self) -> dict:
        """GRPOConfig's other sampling fields, where they are set."""
        args = self.args
        return {
            "top_k": args.top_k,
            "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty,
            "generation_kwargs": args.generation_kwargs,
        }

    def _manifest(self) -> dict:
        """The settings that shape the data: a resume must match them (see :class:`~trl_hsstar.artifacts.RunManifest`)."""
        args = self.args
        return {
            "objective": self.objective,
            "num_problems": len(self.problem_rows),
            "problems_skipped": len(self.skipped_problems),
            "problem_ids_sha": ids_digest(self.problem_rows),
            "problems_per_iteration": len(self.iteration_problems[0]),
            "sampling_budget": args.sampling_budget,
            "num_presamples": args.num_presamples,
            "resample_rounds": args.resample_rounds,
            "allocation": args.allocation,
            "difficulty_estimator": args.difficulty_estimator,
            "reward_thresholds": list(self.rewards.thresholds) if self.rewards.thresholds else None,
            "reward_aggregation": args.reward_aggregation,
            "reward_step_token": args.reward_step_token,
            "train_levels": list(args.train_levels),
            "resample_levels": list(args.resample_levels),
            "max_rows_per_problem": args.max_rows_per_problem,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_completion_length": args.max_completion_length,
            "last_number_fallback": args.last_number_fallback,
            "seed": args.seed,
            # in the manifest only when set, so that runs started before these fields existed still resume
            **{
                k: v
                for k, v in {
                    **self._sampling_knobs(),
                    "chat_template_kwargs": args.chat_template_kwargs,
                }.items()
                if v not in (None, 0, 1.0)
            },
            **({} if args.min_row_score is None else {"min_row_score": args.min_row_score}),
            **({"calibrate_thresholds": True} if args.calibrate_thresholds else {}),
        }


def iteration_table(stats_list: list[dict], header: bool = True) -> str:
    """The iterations as a small table: levels, budget, rows, accuracy, loss and held-out accuracy."""
    rows = []
    if header:
        rows.append(
            f"{'iteration':>9}  {'easy/boundary/hard':>18}  {'budget':>11}  {'rows':>5}  {'pre-acc':>7}  "
            f"{'loss':>7}  {'held-out':>8}"
        )
    for s in stats_list:
        lv = s.get("levels", {})
        loss = s.get("train_loss")
        held = (s.get("eval") or {}).get("greedy")
        pre = s.get("presample_accuracy")  # None without pre-samples (num_presamples=0)
        rows.append(
            f"{s['iteration']:>9}  {str(lv.get('easy', 0)) + '/' + str(lv.get('boundary', 0)) + '/' + str(lv.get('hard', 0)):>18}  "
            f"{str(s.get('budget_spent')) + '/' + str(s.get('budget_planned')):>11}  {s.get('rows', 0):>5}  "
            f"{'-' if pre is None else f'{pre:.3f}':>7}  {'-' if loss is None else f'{loss:.4f}':>7}  "
            f"{'-' if held is None else f'{held:.3f}':>8}"
        )
    return "\n".join(rows)


def _flat_metrics(stats: dict) -> dict[str, float]:
    """The numeric stats as ``hsstar/...`` scalars for ``report_to``."""
    out: dict[str, float] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, (bool, int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out[key] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}/{k}", v)

    for k, v in stats.items():
        if k not in ("phases_computed", "phase_seconds"):
            add(f"hsstar/{k}", v)
    return out


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

    def _trl_trainer(self, dataset: Dataset, args, callbacks: list) -> SFTTrainer:
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

    def _trl_trainer(self, dataset: Dataset, args, callbacks: list) -> DPOTrainer:
        from peft import PeftModel

        if self.ref_model is None and isinstance(self.model, PeftModel) and "ref" in self.model.peft_config:
            self.model.delete_adapter(
                "ref"
            )  # last pass's reference; TRL copies the adapter as it is now, M_t
        return DPOTrainer(
            model=self.model,
            ref_model=self.ref_model,
            args=args,
            train_dataset=dataset,
            processing_class=self.processing_class,
            callbacks=callbacks,
            **self.trl_kwargs,
        )
