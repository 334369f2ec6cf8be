"""One HS-STaR run, torchtune's way: set up once, one method per phase of an iteration, clean up.

:meth:`HSStarTrainer.train <trl_hsstar.HSStarTrainer.train>` is the list of phases; :class:`HSStarRun` holds them,
and :class:`RunLog` the state that lives across iterations: the run's step, its log history, the ``report_to``
trackers and the checkpoints. Each iteration's training pass is a fresh TRL trainer whose steps start at 0; the
run's step is the steps of the passes before it plus the pass's own, so trackers draw one curve and checkpoint
names never repeat.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
from typing import Any

from datasets import Dataset
from transformers import TrainerCallback, TrainerControl
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer_utils import TrainOutput, rotate_checkpoints

from . import artifacts
from ._compat import load_checkpoint, save_model_without_push, tensorboard_writer
from ._utils import publish_dir, quiet_progress_bars
from .callbacks import emit
from .distributed import AccelerateCollective
from .evaluation import evaluate_held_out
from .pipeline import IterationResult, PipelineEvents, PipelineSettings, run_iteration
from .records import Problem
from .verify import MathVerifier

logger = logging.getLogger(__name__)

__all__ = ["HSStarRun", "RunLog", "iteration_table"]


# ---------------------------------------------------------------------------------------------------------------
# Run-wide state: step, log history, trackers, checkpoints


class RunLog:
    """The run's step and log history (the trainer's ``state``), its trackers and its checkpoints."""

    def __init__(self, args, state, callbacks: list, user_callbacks: list, accelerator):
        self.args, self.state, self.accelerator = args, state, accelerator
        self.callbacks = callbacks  # the trainer's own, minus the terminal printers: the run prints its table
        self.user_callbacks = user_callbacks  # a pass tells them itself
        self.tracker_kinds = tuple(get_reporting_integration_callbacks(args.report_to))  # once: not per log
        self.control = TrainerControl()
        self.pass_start = 0

    @property
    def trackers(self) -> list:
        """The ``report_to`` integrations among the trainer's callbacks (transformers' own list of them)."""
        return [
            c for c in self.callbacks if isinstance(c, self.tracker_kinds) and c not in self.user_callbacks
        ]

    def begin(self, model) -> None:
        self.state.global_step, self.control = 0, TrainerControl()
        for tracker in self.trackers:
            tracker.on_train_begin(self.args, self.state, self.control, model=model)

    def end(self, model) -> None:
        for tracker in self.trackers:
            tracker.on_train_end(self.args, self.state, self.control, model=model)

    def advance(self, steps: int) -> None:
        """The run's step moves on by a finished pass's (or a resumed iteration's) steps."""
        self.state.global_step += steps

    def log(self, logs: dict, *, trackers_only: bool = False) -> None:
        """Log at the run's step; a pass's entry goes to the trackers only (the pass told the user's callbacks)."""
        self.state.log_history.append({**logs, "step": self.state.global_step})
        for callback in self.trackers if trackers_only else self.callbacks:
            callback.on_log(self.args, self.state, self.control, logs=logs)

    def pass_callback(self) -> TrainerCallback:
        """The callback a new training pass reports through: its logs and checkpoints, at the run's step."""
        self.pass_start = self.state.global_step
        return _PassToRun(self)

    def at_pass_step(self, step: int) -> None:
        """While a pass runs, the run's step is the step before the pass plus the pass's own."""
        self.state.global_step = self.pass_start + step

    def keep_checkpoint(self, src: str, step: int) -> None:
        """Move a pass's checkpoint to ``output_dir/checkpoint-<run step>``; transformers rotates them."""
        publish_dir(src, os.path.join(self.args.output_dir, f"checkpoint-{step}"))
        rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)

    def completions_table(self, rows: list[dict]) -> None:
        """A table of completions for trackers that take tables, as GRPOTrainer logs its completions."""
        if not rows:
            return
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        markdown = "\n".join(
            ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            + ["| " + " | ".join(cell(v) for v in r.values()) + " |" for r in rows]
        )
        for tracker in self.trackers:
            writer = tensorboard_writer(tracker)
            if writer is not None:
                writer.add_text("hsstar/completions", markdown, self.state.global_step)
                writer.flush()
        if "wandb" in self.args.report_to:
            import wandb

            if wandb.run is not None:
                table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
                wandb.log({"hsstar/completions": table})


class _PassToRun(TrainerCallback):
    """A pass's logs and checkpoints, carried to the run at the run's step before the pass plus the pass's own."""

    def __init__(self, run_log: RunLog):
        self.run_log = run_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.run_log.at_pass_step(state.global_step)
        self.run_log.log(dict(logs or {}), trackers_only=True)

    def on_save(self, args, state, control, **kwargs):
        self.run_log.accelerator.wait_for_everyone()  # every process has written its part of the checkpoint
        if state.is_world_process_zero:
            src = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.run_log.keep_checkpoint(src, self.run_log.pass_start + state.global_step)


# ---------------------------------------------------------------------------------------------------------------
# The recipe: setup, the phases of an iteration, cleanup


class _Events(PipelineEvents):
    """The pipeline's events, forwarded to the trainer's callbacks."""

    def __init__(self, run: HSStarRun, iteration: int):
        self.run, self.iteration = run, iteration

    def levels_estimated(self, difficulties, resamples):
        self.run.emit("on_levels_estimated", self.iteration, difficulties=difficulties, resamples=resamples)

    def rows_selected(self, rows):
        return self.run.emit("on_rows_selected", self.iteration, rows=rows)


class HSStarRun:
    """The phases of one ``train()`` call on ``trainer`` (an :class:`~trl_hsstar.HSStarTrainer` or
    :class:`~trl_hsstar.HSStarDPOTrainer`); used as a context manager, it sets up and cleans up."""

    def __init__(self, trainer, train_kwargs: dict):
        self.trainer, self.args, self.train_kwargs = trainer, trainer.args, train_kwargs
        self.accelerator, self.run_log = trainer.accelerator, trainer.run_log
        # reward models load on the first iteration that needs them
        self.score_fn, self.rewards_loaded = None, False
        self.output = TrainOutput(global_step=0, training_loss=float("nan"), metrics={})
        self.model_to_load = None  # a finished iteration's model, loaded before the next one runs
        self.cleanup = contextlib.ExitStack()  # filled on entering: engine, trackers, upload, verifier, bars

    # -- setup and cleanup

    def __enter__(self) -> HSStarRun:
        trainer, args = self.trainer, self.args
        if self.accelerator.is_main_process:
            artifacts.RunManifest(args.output_dir).check_or_write(trainer.manifest())
            if trainer.skipped_problems:
                artifacts.atomic_write_text(
                    os.path.join(args.output_dir, "skipped_problems.jsonl"),
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in trainer.skipped_problems),
                )
        with contextlib.ExitStack() as setup:  # undone at once if any step of the setup fails
            if args.disable_tqdm:  # respected everywhere: datasets' and transformers' bars too
                setup.enter_context(quiet_progress_bars(datasets_too=True))
            fallback = args.answer_fallback(trainer.problem_rows)
            self.verifier = trainer.verifier or setup.enter_context(
                MathVerifier(timeout=args.verifier_timeout, last_number_fallback=fallback)
            )
            setup.callback(self._finish)
            trainer.iteration_stats, trainer.iterations_run = [], 0
            self.run_log.begin(trainer.model)
            self.cleanup = setup.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup.close()

    def _finish(self) -> None:
        self.trainer.generation.close()
        self.run_log.end(self.trainer.model)
        if self.trainer.push_future is not None:  # the last upload finishes before train() returns
            self.trainer.push_future.result()

    @property
    def should_stop(self) -> bool:
        return self.run_log.control.should_training_stop  # a callback stops the run through the run's control

    def emit(self, event: str, iteration: int, **payload):
        trainer = self.trainer
        return emit(
            trainer.callback_handler.callbacks,
            event,
            self.args,
            trainer.state,
            self.run_log.control,
            model=trainer.model,
            processing_class=trainer.processing_class,
            iteration=iteration,
            **payload,
        )

    # -- the phases of iteration t

    def resume(self, t: int) -> bool:
        """A finished iteration is skipped (its model loads before the next one runs); ``True`` when it was."""
        store = artifacts.IterationArtifacts(self.args.output_dir, t)
        if store.done:
            self.trainer.iteration_stats.append(store.read_json(artifacts.STATS))
            self.run_log.advance(self.trainer.iteration_stats[-1].get("train_steps", 0))
            self.model_to_load = store.model_dir
            return True
        self.load_finished_model()
        return False

    def load_finished_model(self) -> None:
        if self.model_to_load is not None:
            logger.info(
                "Resuming: loading the model of the last completed iteration from %s", self.model_to_load
            )
            with quiet_progress_bars():
                load_checkpoint(self.trainer, self.model_to_load)
            self.model_to_load = None

    def begin(self, t: int) -> list[Problem]:
        """The iteration's problems, announced to the callbacks; the reward source loads and is probed once."""
        trainer = self.trainer
        problems = trainer.problems(trainer.iteration_problems[t])
        self.emit("on_iteration_begin", t, problems=problems)
        if not self.rewards_loaded and not self.should_stop:
            self.score_fn = trainer.rewards.score_fn(
                self.accelerator.device, trainer.processing_class, lambda: trainer.state
            )
            self.rewards_loaded = True
            if self.score_fn is not None:
                trainer.rewards.probe(self.score_fn, problems[0])
        return problems

    def sample(self, t: int, problems: list[Problem]) -> tuple[IterationResult, dict]:
        """The rounds of iteration t (and, before the first, the starting model's held-out evaluation)."""
        trainer, args = self.trainer, self.args
        sampler = trainer.generation.sampler(
            trainer.model, t, artifacts.IterationArtifacts(args.output_dir, t - 1).model_dir
        )
        initial = os.path.join(args.output_dir, "eval-initial")
        if t == 0 and trainer.eval_problems is not None and not os.path.exists(initial):
            self._evaluate_on_held_out(sampler, initial)
        result = run_iteration(
            problems,
            store=artifacts.IterationArtifacts(args.output_dir, t),
            sampler=sampler,
            verifier=self.verifier,
            score_fn=self.score_fn,
            settings=PipelineSettings.from_config(args, t, trainer.objective, trainer.rewards.thresholds),
            events=_Events(self, t),
            collective=AccelerateCollective(self.accelerator),
            progress=not args.disable_tqdm,
        )
        stats = {
            "iteration": t,
            "sampler": sampler.name,
            "distributed_type": self.accelerator.distributed_type.value,
            **result.stats,
        }
        metrics, self.reward_columns = trainer.rewards.pop_logs()  # what reward functions logged
        if metrics:
            stats["reward_metrics"] = metrics
        return result, stats

    def train(self, t: int, stats: dict) -> None:
        """One TRL pass on the selected rows: a fresh optimizer and schedule, as each release iteration is a run."""
        if not stats["rows"]:
            logger.warning("Iteration %d selected no training rows: the model is carried over unchanged.", t)
            return
        if self.should_stop:
            return
        trainer, store = self.trainer, artifacts.IterationArtifacts(self.args.output_dir, t)
        columns = ["prompt", "completion"] if trainer.objective == "sft" else ["prompt", "chosen", "rejected"]
        # one process fills the datasets cache, the others read it; no bars for this bookkeeping
        with self.accelerator.main_process_first(), quiet_progress_bars(datasets_too=True):
            rows = Dataset.from_json(
                str(store.path(artifacts.TRAIN_ROWS)), cache_dir=str(store.dir / ".cache")
            )
            rows = rows.select_columns(columns)
        args = copy.copy(self.args)
        args.model_init_kwargs = None  # the model is loaded already
        args.output_dir = str(store.dir / "pass")  # its checkpoints move on to run-wide names
        args.report_to = []  # the run's trackers get the pass's logs through the run log
        args.push_to_hub = False  # the run pushes once per iteration end
        args.save_total_limit = None  # applied over the run's checkpoints
        trainer.generation.sleep()  # its GPU memory goes to training
        with quiet_progress_bars(datasets_too=True):  # TRL's tokenizing of a few hundred rows, not a phase
            pass_trainer = trainer.trl_pass(
                rows, args, [*trainer.user_callbacks, self.run_log.pass_callback()]
            )
        self.output = pass_trainer.train(**self.train_kwargs)
        self.run_log.at_pass_step(pass_trainer.state.global_step)
        trainer.generation.wake()
        # every process out of the pass (transformers globs its output_dir as train() ends) before it goes
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(args.output_dir, ignore_errors=True)
        stats["train_loss"] = self.output.training_loss
        stats["train_steps"] = self.output.global_step
        stats["train_runtime"] = self.output.metrics.get("train_runtime")

    def save(self, t: int) -> None:
        """``iteration-<t>/model``: every process calls save_model (sharded weights gather), the main one writes."""
        store = artifacts.IterationArtifacts(self.args.output_dir, t)
        tmp = store.tmp_dir(artifacts.MODEL, create=self.accelerator.is_main_process)
        with quiet_progress_bars():  # the run pushes once per iteration end, not per save
            save_model_without_push(self.trainer, str(tmp))
        if self.accelerator.is_main_process:
            store.publish_dir(tmp, artifacts.MODEL)
        self.accelerator.wait_for_everyone()

    def evaluate(self, t: int, stats: dict) -> None:
        """The new model on the held-out problems, when there are any."""
        if self.trainer.eval_problems is None:
            return
        store = artifacts.IterationArtifacts(self.args.output_dir, t)
        sampler = self.trainer.generation.sampler(self.trainer.model, t + 1, store.model_dir)
        stats["eval"] = self._evaluate_on_held_out(sampler, str(store.dir / "eval"))

    def _evaluate_on_held_out(self, sampler, output_dir: str) -> dict | None:
        summary = evaluate_held_out(
            self.trainer.problems(self.trainer.eval_problems),
            sampler,
            self.verifier,
            self.args,
            output_dir,
            on_main=self.accelerator.is_main_process,
        )
        if summary is not None:
            self.run_log.log({f"eval/{k}": v for k, v in summary.items() if "@" in k or k == "greedy"})
        self.accelerator.wait_for_everyone()
        return summary

    def report(self, t: int, stats: dict, result: IterationResult) -> None:
        """stats.json and ``DONE``; the figures to the trackers, a table row to the terminal, the Hub, the event."""
        trainer, args = self.trainer, self.args
        store = artifacts.IterationArtifacts(args.output_dir, t)
        if self.accelerator.is_main_process:
            store.write_json(artifacts.STATS, stats)
            store.mark_done()
        trainer.iteration_stats.append(stats)
        self.run_log.log(_flat_metrics(stats))
        if trainer.is_world_process_zero():  # one row per iteration, not the raw dict of figures
            print(iteration_table([stats], header=not trainer.iterations_run), flush=True)
            # a table of the first pre-samples, for trackers that take one
            if store.has(artifacts.scored_file(0)):
                scored = store.read_jsonl(artifacts.scored_file(0))
                self.run_log.completions_table(
                    _completion_rows(scored, result.difficulties, self.reward_columns)
                )
        trainer.iterations_run += 1
        if args.push_to_hub and (args.hub_strategy != "end" or t == args.num_iterations - 1):
            trainer.push_to_hub(commit_message=f"HS-STaR iteration {t}", blocking=False)
        self.emit("on_iteration_end", t, stats=stats)

    def finish(self) -> TrainOutput:
        """The run's output; a run that had nothing left to do says so."""
        self.load_finished_model()
        if not self.trainer.iterations_run and len(self.trainer.iteration_stats) == self.args.num_iterations:
            logger.warning(
                "Nothing to do: this run finished earlier (%d iterations in %s); its last model is loaded. Pass "
                "a new `output_dir` to start another run.",
                self.args.num_iterations,
                self.args.output_dir,
            )
        return TrainOutput(self.trainer.state.global_step, self.output.training_loss, self.output.metrics)


# ---------------------------------------------------------------------------------------------------------------
# What an iteration reports


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


def _completion_rows(scored: list[dict], difficulties: dict, extra: dict, k: int = 8) -> list[dict]:
    """The first ``k`` pre-samples, with the columns reward functions logged with ``log_extra`` for them."""
    rows = [
        {
            "problem_id": r["problem_id"],
            "level": difficulties[r["problem_id"]].level.value if r["problem_id"] in difficulties else "",
            "completion": r["completion"],
            "correct": bool(r["correct"]),
            "reward": r["reward"],
        }
        for r in scored[:k]
    ]
    columns = sorted({c for r in rows for c in extra.get(r["completion"], {})})
    for r in rows:
        r.update({c: extra.get(r["completion"], {}).get(c) for c in columns})
    return rows


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
