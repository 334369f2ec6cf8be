"""``HSStarTrainer`` (SFT) and ``HSStarDPOTrainer``: TRL trainers that run the HS-STaR loop.

``train()`` runs ``num_iterations`` iterations. Each one

1. takes fresh problems from ``train_dataset``,
2. generates its data with :func:`trl_hsstar.pipeline.run_iteration` (pre-sample, score, estimate difficulty,
   allocate the budget, re-sample, select), every phase saved under ``output_dir/iteration-<t>/``,
3. runs one ordinary TRL training pass on the selected rows, continuing from the current model, with a fresh
   optimizer and its own learning-rate schedule (as the authors' release does), and
4. saves the model to ``iteration-<t>/model`` and marks the iteration done.

A rerun with the same ``output_dir`` resumes: done iterations are skipped (their model is loaded back), and in
the first unfinished one every phase whose file exists is read instead of recomputed.

The trainers are thin: the algorithm lives in the pure modules (``difficulty``, ``budget``, ``selection``)
and the data flow in ``pipeline``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, TrainerControl
from transformers.trainer_utils import TrainOutput
from trl import DPOTrainer, SFTTrainer

from . import artifacts as A
from ._compat import keep_bnb_4bit_weights_trainable_on_cpu
from .callbacks import HSSTAR_EVENTS
from .config import HSStarConfig, HSStarDPOConfig, _accelerator_available
from .difficulty import lookup_thresholds, validate_thresholds
from .distributed import AccelerateCollective
from .pipeline import PipelineEvents, PipelineSettings, Problem, run_iteration
from .rewards import as_reward_source, check_rewards, combine_rewards
from .sampling import Sampler, SamplingParams, TransformersSampler
from .verify import MathVerifier

logger = logging.getLogger(__name__)

__all__ = ["HSStarDPOTrainer", "HSStarTrainer"]

RewardFunc = str | PreTrainedModel | Callable[..., list]
_UNSET = object()


# ---------------------------------------------------------------------------------------------------------------
# Input checks, before anything expensive


def _problem_rows(dataset: Dataset, args) -> list[dict]:
    """Validate the problems dataset and return its rows as plain dicts with ``id``/``prompt``/``answer``."""
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"`train_dataset` must be a `datasets.Dataset` of problems (columns `prompt` and `{args.answer_column}`), "
            f"got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError("`train_dataset` is empty: it must hold the problems to sample solutions for.")
    missing = [c for c in ("prompt", args.answer_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"`train_dataset` lacks the column(s) {missing}; it has {dataset.column_names}. Problems need a `prompt` "
            f"(text or chat messages) and a reference answer in `{args.answer_column}` (set `answer_column` to use "
            "another column)."
        )
    rows = []
    seen: dict[str, int] = {}
    has_ids = args.problem_id_column in dataset.column_names
    for i, row in enumerate(dataset):
        pid = str(row[args.problem_id_column]) if has_ids else str(i)
        if pid in seen:
            raise ValueError(
                f"`train_dataset` has duplicate problem id {pid!r} (rows {seen[pid]} and {i}) in column "
                f"`{args.problem_id_column}`: problem ids must be unique."
            )
        seen[pid] = i
        prompt = row["prompt"]
        if not (isinstance(prompt, str) and prompt) and not (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(m, dict) and "content" in m for m in prompt)
        ):
            raise ValueError(
                f"`train_dataset` row {i} (id {pid!r}): `prompt` must be a non-empty string or a list of chat "
                f"messages, got {type(prompt).__name__}."
            )
        answer = row[args.answer_column]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise ValueError(
                f"`train_dataset` row {i} (id {pid!r}): the reference answer in `{args.answer_column}` is empty or "
                f"not a string/number ({answer!r})."
            )
        columns = {k: v for k, v in row.items() if k not in ("prompt", args.answer_column)}
        rows.append({"id": pid, "prompt": prompt, "answer": str(answer).strip(), "columns": columns})
    return rows


def _check_output_dir(output_dir: str) -> None:
    """Fail now, not after the first phase, if ``output_dir`` cannot hold the run's files."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".hsstar-write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ValueError(
            f"`output_dir` ({output_dir}) cannot be written: {error.strerror or error}. Every phase of every "
            "iteration is saved there: pass an `output_dir` on a writable disk."
        ) from error


def _drop_unverifiable(rows: list[dict], verifier, timeout: float) -> tuple[list[dict], list[dict]]:
    """Problems whose reference answer the default verifier cannot read are left out, and counted.

    The test: a completion that boxes the reference's own answer must verify against it. A reference that fails
    it (e.g. ``"\\frac{1}{"`` or an empty box) would make every sample of its problem count as wrong, so the
    problem would look hard and waste its budget. Custom verifiers are trusted as given (not tested).
    """
    from .verify import _reference_answer

    own = verifier is None
    if not (own or isinstance(verifier, MathVerifier)):
        return rows, []
    checker = MathVerifier(timeout=timeout) if own else verifier
    try:
        extracted = [_reference_answer(r["answer"]) for r in rows]
        todo = [i for i, a in enumerate(extracted) if a is not None]
        verdicts = checker.verify_batch(
            [f"\\boxed{{{extracted[i]}}}" for i in todo], [rows[i]["answer"] for i in todo]
        )
    finally:
        if own:
            checker.close()
    ok = {i for i, v in zip(todo, verdicts) if v}
    kept = [r for i, r in enumerate(rows) if i in ok]
    skipped = [
        {
            "id": r["id"],
            "answer": r["answer"],
            "reason": "the reference answer cannot be read by the verifier",
        }
        for i, r in enumerate(rows)
        if i not in ok
    ]
    if not kept:
        raise ValueError(
            f"None of the {len(rows)} reference answers in `train_dataset` can be read by the verifier (e.g. "
            f"{rows[0]['answer']!r} of problem {rows[0]['id']!r}): check `answer_column`, or pass a `verifier` "
            "that understands your answers."
        )
    if skipped:
        logger.warning(
            "Left out %d of %d problems whose reference answer the verifier cannot read (e.g. %s); they are listed "
            "in `output_dir/skipped_problems.jsonl`.",
            len(skipped),
            len(rows),
            ", ".join(f"{s['id']!r}: {s['answer']!r}" for s in skipped[:3]),
        )
    return kept, skipped


def _split_iterations(rows: list[dict], args) -> list[list[dict]]:
    """Fresh, non-overlapping problems per iteration, from a seeded shuffle of the dataset."""
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    per_iteration = args.problems_per_iteration or len(rows) // args.num_iterations
    if per_iteration == 0 or per_iteration * args.num_iterations > len(rows):
        raise ValueError(
            f"`train_dataset` has {len(rows)} problems, too few for `num_iterations`={args.num_iterations} x "
            f"`problems_per_iteration`={args.problems_per_iteration or per_iteration} fresh problems: lower one of "
            "them or add problems."
        )
    return [
        [rows[j] for j in order[t * per_iteration : (t + 1) * per_iteration]]
        for t in range(args.num_iterations)
    ]


def _model_name(obj: Any) -> str | None:
    if isinstance(obj, str):
        return obj
    config = getattr(obj, "config", None)
    return getattr(config, "_name_or_path", None) or None


def _resolve_args(model, args, config_cls, suffix: str, train_dataset):
    """The trainer's config (a default one named after the model if none is given), checked."""
    if args is None:
        name = (_model_name(model) or "model").rstrip("/").split("/")[-1]
        args = config_cls(output_dir=f"{name}-{suffix}")
    if not isinstance(args, config_cls):
        raise TypeError(f"`args` must be an {config_cls.__name__}, got {type(args).__name__}.")
    if train_dataset is None:
        raise ValueError("`train_dataset` (the problems) is required.")
    if isinstance(model, str):
        # weights from safetensors only (no unpickling), unless the user's model_init_kwargs say otherwise
        args.model_init_kwargs = {"use_safetensors": True, **(args.model_init_kwargs or {})}
    return args


def _load_reward_model(name: str, args, device):
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

    user = getattr(args, "model_init_kwargs", None)
    user = user if isinstance(user, dict) else {}
    trust_remote_code = bool(user.get("trust_remote_code", getattr(args, "trust_remote_code", False)))
    trust = {"trust_remote_code": trust_remote_code}
    use_safetensors = user.get("use_safetensors", True)
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


# ---------------------------------------------------------------------------------------------------------------
# The loop, shared by both trainers


class _Events(PipelineEvents):
    """Forwards pipeline events to the trainer's callbacks."""

    def __init__(self, trainer: _HSStarLoop, iteration: int):
        self.trainer, self.iteration = trainer, iteration

    def levels_estimated(self, difficulties, resamples):
        self.trainer._emit(
            "on_levels_estimated", self.iteration, difficulties=difficulties, resamples=resamples
        )

    def rows_selected(self, rows):
        return self.trainer._emit("on_rows_selected", self.iteration, rows=rows)


class _HSStarLoop:
    """Mixed into a TRL trainer: holds the problems and runs the iterations around the trainer's ``train()``."""

    _hsstar_objective = "sft"

    def _hsstar_setup(
        self,
        problems: Dataset,
        args,
        reward_funcs: RewardFunc | Sequence[RewardFunc] | None,
        reward_processing_classes,
        reward_weights: Sequence[float] | None,
        verifier: Callable[[str, str], bool] | None,
        sampler: Sampler | None,
    ) -> None:
        # Everything here is cheap and runs before the parent trainer loads anything.
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and args.world_size != launched:
            raise ValueError(
                f"{launched} processes were launched (WORLD_SIZE), but the training arguments see {args.world_size}: "
                "each process would run the whole loop alone and overwrite the others' files. On a machine without "
                "a GPU set `use_cpu=True` (the HS-STaR configs do so by default) and launch with `accelerate launch "
                "--multi_gpu --num_processes N`."
            )
        _check_output_dir(args.output_dir)
        self._problem_rows, self._skipped_problems = _drop_unverifiable(
            _problem_rows(problems, args), verifier, args.verifier_timeout
        )
        self._iteration_rows = _split_iterations(self._problem_rows, args)
        funcs = (
            []
            if reward_funcs is None
            else list(reward_funcs)
            if isinstance(reward_funcs, (list, tuple))
            else [reward_funcs]
        )
        if reward_weights is not None and len(reward_weights) != len(funcs):
            raise ValueError(
                f"`reward_weights` has {len(reward_weights)} entries for {len(funcs)} reward functions: give one weight "
                "per reward function."
            )
        if not isinstance(reward_processing_classes, (list, tuple)):
            reward_processing_classes = [reward_processing_classes] * len(funcs)
        self._reward_specs = list(zip(funcs, reward_processing_classes))
        self._reward_weights = list(reward_weights) if reward_weights is not None else None
        uses_reward = args.difficulty_estimator != "accuracy"
        if uses_reward and not funcs:
            raise ValueError(
                f"`difficulty_estimator={args.difficulty_estimator!r}` needs a reward source: pass `reward_funcs` (a "
                "process reward model, its path, or a reward function), or set `difficulty_estimator='accuracy'`."
            )
        self._thresholds = None
        if uses_reward:
            if args.reward_thresholds is not None:
                self._thresholds = validate_thresholds(args.reward_thresholds)
            else:
                names = [_model_name(f) for f, _ in self._reward_specs]
                found = [lookup_thresholds(n) for n in names if n]
                if not found or found[0] is None:
                    raise ValueError(
                        "`reward_thresholds` (tau_l, tau_h) is required: no thresholds are published for the reward "
                        f"source {names[0] or funcs[0]!r}. Published pairs exist only for Skywork-o1-Open-PRM-Qwen-2.5-"
                        "7B/1.5B and Qwen2.5-Math-PRM-7B; choose thresholds on a held-out pre-sample."
                    )
                self._thresholds = found[0]
        self._verifier = verifier
        self._sampler = sampler
        self._vllm = None
        self._hsstar_control = TrainerControl()

    # -- pieces built lazily at train() time ----------------------------------------------------------------

    def _score_fn(self):
        if not self._reward_specs:
            return None
        device = self.accelerator.device
        sources = []
        for i, (func, processing_class) in enumerate(self._reward_specs):
            try:
                if isinstance(func, str):
                    sources.append(_load_reward_model(func, self.args, device))
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
                    f"`reward_funcs[{i}]` ({_model_name(func) or type(func).__name__}) cannot be used: {error}. For a "
                    "process reward model, set `reward_step_token` to the separator it was trained with."
                ) from error
        combined = (
            sources[0]
            if len(sources) == 1 and self._reward_weights is None
            else combine_rewards(sources, self._reward_weights)
        )
        name = getattr(combined, "name", None) or getattr(combined, "__name__", "reward")

        def score_fn(prompts, completions, **columns):
            values = combined(prompts, completions, **columns)
            if isinstance(values, (list, tuple)):
                # NaN (e.g. an overflow on a strange completion) counts as "cannot score", like None: one bad
                # completion must not stop a run hours in. Counted in the iteration's `scores_missing`.
                nan = [i for i, v in enumerate(values) if isinstance(v, float) and math.isnan(v)]
                if nan:
                    logger.warning(
                        "reward source %r returned NaN for %d of %d completions: they count as unscored (None).",
                        name,
                        len(nan),
                        len(values),
                    )
                    values = [None if i in set(nan) else v for i, v in enumerate(values)]
            return check_rewards(values, len(completions), name)

        return score_fn

    def _probe_rewards(self, score_fn, row: dict) -> None:
        """Call the reward source once on two tiny completions of a real problem, so that a reward function with
        the wrong output (length, type) fails here, before any sampling, and not hours into a run."""
        texts = [f"The answer is \\boxed{{{row['answer']}}}.", ""]
        completions = (
            texts
            if isinstance(row["prompt"], str)
            else [[{"role": "assistant", "content": t}] for t in texts]
        )
        columns = {k: [v] * 2 for k, v in row["columns"].items()}
        columns.setdefault("answer", [row["answer"]] * 2)
        try:
            score_fn([row["prompt"]] * 2, completions, **columns)
        except Exception as error:
            raise ValueError(
                f"The reward source failed its check on problem {row['id']!r} before sampling: {error}. Fix the "
                "reward function (`reward_funcs`): it must return one float (or None) per completion."
            ) from error

    def _make_sampler(self) -> Sampler:
        keep_bnb_4bit_weights_trainable_on_cpu(self.model)
        if self._sampler is not None:
            return self._sampler
        if self.args.use_vllm:
            if self._vllm is None:
                self._vllm = self._start_vllm()
            return self._vllm
        return TransformersSampler(
            self.model_wrapped if self.model_wrapped is not None else self.model,
            self.processing_class,
            batch_size=self.args.generation_batch_size,
            accelerator=self.accelerator,
            progress=not self.args.disable_tqdm,
        )

    def _is_peft(self) -> bool:
        try:
            from peft import PeftModel
        except ImportError:  # pragma: no cover - peft is a dependency
            return False
        return isinstance(self.accelerator.unwrap_model(self.model), PeftModel)

    def _start_vllm(self):
        """The vLLM sampler of this run: an engine on the starting checkpoint (the 16-bit base for LoRA/QLoRA,
        whose adapter is served on top; nothing is ever merged into quantized weights), or the external server,
        checked to answer before any sampling."""
        from .sampling.vllm_sampler import VLLMSampler

        args = self.args
        if args.vllm_mode == "server":
            from .sampling.vllm_server import VLLMServerSampler

            url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
            sampler = VLLMServerSampler(url, self.processing_class, timeout=args.vllm_server_timeout)
            sampler.wait_ready()
            return sampler
        base = _model_name(self.model)
        if not base:
            raise ValueError(
                "`use_vllm=True` starts the engine from the model's checkpoint, and this model has none "
                "(`config._name_or_path` is empty): pass the model as an id or path, or save it first."
            )
        engine = {
            "seed": args.seed,
            "gpu_memory_utilization": args.vllm_gpu_memory_utilization,
            "tensor_parallel_size": args.vllm_tensor_parallel_size,
            "enable_prefix_caching": True,
            "enable_sleep_mode": args.vllm_enable_sleep_mode,
        }
        if args.vllm_max_model_length:
            engine["max_model_len"] = args.vllm_max_model_length
        dtype = getattr(self.accelerator.unwrap_model(self.model), "dtype", None)
        if dtype is not None:  # the policy's own precision (vLLM's "auto" would take float32 down to 16 bits)
            engine["dtype"] = str(dtype).removeprefix("torch.")
        if self._is_peft():
            model = self.accelerator.unwrap_model(self.model)
            rank = max(int(getattr(c, "r", 8)) for c in model.peft_config.values())
            engine.update(
                enable_lora=True, max_loras=2, max_lora_rank=max(8, rank)
            )  # base and adapter requests
        engine.update(args.vllm_engine_kwargs or {})
        env = {}
        if not _accelerator_available():  # vLLM's CPU build: a small KV cache, every core
            env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
            env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get(
                "VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, os.cpu_count() or 1) - 1}"
            )
        elif torch.cuda.is_available():
            # each training process's engine on its own GPU(s), not all of them on the first one
            state = self.accelerator.state
            devices = engine_cuda_devices(
                os.environ.get("CUDA_VISIBLE_DEVICES"),
                torch.cuda.device_count(),
                state.local_process_index,
                int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)),
                args.vllm_tensor_parallel_size,
            )
            env["CUDA_VISIBLE_DEVICES"] = devices
        rank = self.accelerator.process_index
        return VLLMSampler(
            base,
            self.processing_class,
            python=args.vllm_python,
            engine_kwargs=engine,
            env=env,
            startup_timeout=args.vllm_server_timeout,
            log_path=os.path.join(args.output_dir, f"vllm-{rank}.log"),
        )

    def _sync_vllm(self, iteration: int) -> None:
        """Give the engine the policy iteration ``iteration`` samples from: the last completed iteration's model
        (its LoRA adapter, for a PEFT model). A server is shared by every process: the main one loads, the others
        wait and then use the same weights or adapter."""
        if self._vllm is None or iteration == 0:
            return
        previous = A.IterationArtifacts(self.args.output_dir, iteration - 1).model_dir
        load = self._vllm.load_adapter if self._is_peft() else self._vllm.load_weights
        if self.args.vllm_mode != "server":  # an engine of this process's own
            load(previous)
            return
        main = self.accelerator.is_main_process
        if main:
            load(previous)
        self.accelerator.wait_for_everyone()
        if not main:
            load(previous, register=False)  # recorded, to be loaded again should the server restart

    def _vllm_sleep(self, sleep: bool) -> None:
        """Free (``sleep``) or restore the engine's GPU memory around a training pass (`vllm_enable_sleep_mode`)."""
        if self._vllm is None or not self.args.vllm_enable_sleep_mode:
            return
        if self.args.vllm_mode == "server" and not self.accelerator.is_main_process:
            return
        self._vllm.sleep() if sleep else self._vllm.wake()

    def _render(self, prompt: Any) -> str:
        if isinstance(prompt, str):
            return prompt
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def _settings(self, iteration: int) -> PipelineSettings:
        args = self.args
        return PipelineSettings(
            budget=args.sampling_budget,
            num_presamples=args.num_presamples,
            allocation=args.allocation,
            difficulty_estimator=args.difficulty_estimator,
            reward_thresholds=self._thresholds,
            train_levels=tuple(args.train_levels),
            resample_levels=tuple(args.resample_levels),
            max_rows_per_problem=args.max_rows_per_problem,
            objective=self._hsstar_objective,
            seed=args.seed + iteration,
            chunk_size=args.sampling_chunk_size,
            sampling=SamplingParams(
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_completion_length,
                seed=args.seed + 1000 * (iteration + 1),
            ),
        )

    def _manifest(self) -> dict:
        args = self.args
        return {
            "objective": self._hsstar_objective,
            "num_problems": len(self._problem_rows),
            "problems_skipped": len(self._skipped_problems),
            "problem_ids_sha": _ids_digest(self._problem_rows),
            "problems_per_iteration": len(self._iteration_rows[0]),
            "sampling_budget": args.sampling_budget,
            "num_presamples": args.num_presamples,
            "allocation": args.allocation,
            "difficulty_estimator": args.difficulty_estimator,
            "reward_thresholds": list(self._thresholds) if self._thresholds else None,
            "reward_aggregation": args.reward_aggregation,
            "reward_step_token": args.reward_step_token,
            "train_levels": list(args.train_levels),
            "resample_levels": list(args.resample_levels),
            "max_rows_per_problem": args.max_rows_per_problem,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_completion_length": args.max_completion_length,
            "seed": args.seed,
        }

    # -- callbacks -----------------------------------------------------------------------------------------

    def _emit(self, event: str, iteration: int, **payload):
        assert event in HSSTAR_EVENTS
        result = payload.get("rows")
        for callback in self.callback_handler.callbacks:
            fn = getattr(callback, event, None)
            if fn is None:
                continue
            out = fn(
                self.args,
                self.state,
                self._hsstar_control,
                model=self.model,
                processing_class=self.processing_class,
                iteration=iteration,
                **payload,
            )
            if event == "on_rows_selected" and out is not None:
                if not isinstance(out, list):
                    raise TypeError(
                        f"{type(callback).__name__}.on_rows_selected returned {type(out).__name__}; return a list of "
                        "rows, or None to keep them."
                    )
                result = payload["rows"] = out
        return result

    # -- training ------------------------------------------------------------------------------------------

    def _reset_optimizer(self) -> None:
        """A fresh optimizer and LR schedule for the next pass, as each iteration of the release is a new run."""
        self.optimizer = None
        self.lr_scheduler = None
        self._created_lr_scheduler = False
        # Accelerate keeps references to what it prepared; drop the old optimizer's state with it.
        self.accelerator._optimizers.clear()
        self.accelerator._schedulers.clear()

    def _train_pass(self, store: A.IterationArtifacts, iteration: int, **train_kwargs) -> TrainOutput:
        raise NotImplementedError

    @staticmethod
    def _load_rows(store: A.IterationArtifacts) -> Dataset:
        """The iteration's training rows (written by the main process; read by every process)."""
        return Dataset.from_json(str(store.path(A.TRAIN_ROWS)), cache_dir=str(store.dir / ".cache"))

    def _restore(self, model_dir) -> None:
        logger.info("Resuming: loading the model of the last completed iteration from %s", model_dir)
        self._load_from_checkpoint(str(model_dir))

    def _save_iteration_model(self, store: A.IterationArtifacts) -> None:
        # every process calls save_model (sharded weights are gathered), only the main one writes
        tmp = store.tmp_dir(A.MODEL, create=self.accelerator.is_main_process)
        self.save_model(str(tmp))
        if self.accelerator.is_main_process:
            store.publish_dir(tmp, A.MODEL)
        self.accelerator.wait_for_everyone()

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run the HS-STaR iterations. ``resume_from_checkpoint`` is not used: a rerun resumes from ``output_dir``."""
        args = self.args
        if resume_from_checkpoint not in (None, False):
            logger.warning(
                "`resume_from_checkpoint` is ignored by HS-STaR trainers: rerunning with the same `output_dir` "
                "resumes at the first unfinished phase."
            )
        if self.accelerator.is_main_process:
            A.RunManifest(args.output_dir).check_or_write(self._manifest())
            if self._skipped_problems:
                A.atomic_write_text(
                    os.path.join(args.output_dir, "skipped_problems.jsonl"),
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._skipped_problems),
                )
        self._hsstar_control = TrainerControl()
        score_fn = _UNSET  # reward models load on the first iteration that needs them
        verifier = self._verifier
        own_verifier = verifier is None
        if own_verifier:
            verifier = MathVerifier(timeout=args.verifier_timeout)
        pending_restore = None
        output = TrainOutput(global_step=0, training_loss=float("nan"), metrics={})
        self.iteration_stats: list[dict] = []
        try:
            for t in range(args.num_iterations):
                store = A.IterationArtifacts(args.output_dir, t)
                if store.done:
                    pending_restore = store.model_dir
                    self.iteration_stats.append(store.read_json(A.STATS))
                    continue
                if pending_restore is not None:
                    self._restore(pending_restore)
                    pending_restore = None
                problems = [
                    Problem(r["id"], r["prompt"], self._render(r["prompt"]), r["answer"], r["columns"])
                    for r in self._iteration_rows[t]
                ]
                self._emit("on_iteration_begin", t, problems=problems)
                if self._hsstar_control.should_training_stop:
                    break
                if score_fn is _UNSET:
                    score_fn = self._score_fn()
                    if score_fn is not None:
                        self._probe_rewards(score_fn, self._iteration_rows[t][0])
                sampler = self._make_sampler()
                self._sync_vllm(t)
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
                stats = {"iteration": t, "sampler": sampler.name, **result.stats}
                if stats["rows"] and not self._hsstar_control.should_training_stop:
                    self._vllm_sleep(True)  # its GPU memory goes to training
                    output = self._train_pass(store, t, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
                    self._vllm_sleep(False)
                    stats["train_loss"] = output.training_loss
                    stats["train_steps"] = output.global_step
                    stats["train_runtime"] = output.metrics.get("train_runtime")
                elif not stats["rows"]:
                    logger.warning(
                        "Iteration %d selected no training rows: the model is carried over unchanged.", t
                    )
                self._save_iteration_model(store)
                if self.accelerator.is_main_process:
                    store.write_json(A.STATS, stats)
                    store.mark_done()
                self.iteration_stats.append(stats)
                self.log(_flat_metrics(stats))
                self._emit("on_iteration_end", t, stats=stats)
                if self._hsstar_control.should_training_stop:
                    break
            if pending_restore is not None:
                self._restore(pending_restore)
        finally:
            if own_verifier:
                verifier.close()
            if self._vllm is not None:
                self._vllm.close()
                self._vllm = None
        return output


def engine_cuda_devices(
    visible: str | None, device_count: int, local_index: int, local_processes: int, tensor_parallel_size: int
) -> str:
    """``CUDA_VISIBLE_DEVICES`` of the engine of training process ``local_index`` (of ``local_processes`` on this
    machine), for ``vllm_mode="colocate"``: its own GPU, or its own ``tensor_parallel_size`` GPUs, out of the ones
    visible to the trainer. A layout that does not fit is refused with the fix."""
    devices = [d.strip() for d in (visible or "").split(",") if d.strip()] or [
        str(i) for i in range(device_count)
    ]
    if local_processes == 1:  # one process: its engine may span as many visible GPUs as it asks for
        needed, mine = tensor_parallel_size, devices
    else:
        needed = local_processes * tensor_parallel_size
        mine = devices[local_index * tensor_parallel_size : (local_index + 1) * tensor_parallel_size]
    if needed > len(devices):
        raise ValueError(
            f"`vllm_tensor_parallel_size={tensor_parallel_size}` with {local_processes} training process(es) on this "
            f"machine needs {needed} GPUs for the colocated engines, and {len(devices)} are visible. Lower "
            "`vllm_tensor_parallel_size`, or run vLLM as a server on GPUs of its own (`vllm_mode='server'`, "
            "`hsstar vllm-serve`)."
        )
    return ",".join(mine)


def _ids_digest(rows: list[dict]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(r["id"] for r in rows).encode()).hexdigest()[:16]


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


class HSStarTrainer(_HSStarLoop, SFTTrainer):
    """SFTTrainer that runs HS-STaR: each iteration trains on the correct rationales of boundary problems.

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
        Everything else is passed to ``SFTTrainer``.
    """

    _hsstar_objective = "sft"

    def __init__(
        self,
        model,
        args: HSStarConfig | None = None,
        train_dataset: Dataset | None = None,
        reward_funcs: RewardFunc | Sequence[RewardFunc] | None = None,
        *,
        reward_processing_classes=None,
        reward_weights: Sequence[float] | None = None,
        verifier: Callable[[str, str], bool] | None = None,
        sampler: Sampler | None = None,
        **kwargs,
    ):
        args = _resolve_args(model, args, HSStarConfig, "HSStar", train_dataset)
        self._hsstar_setup(
            train_dataset, args, reward_funcs, reward_processing_classes, reward_weights, verifier, sampler
        )
        first = self._problem_rows[0]["prompt"]
        placeholder = Dataset.from_list(
            [
                {
                    "prompt": first,
                    "completion": " " if isinstance(first, str) else [{"role": "assistant", "content": " "}],
                }
            ]
        )
        super().__init__(model=model, args=args, train_dataset=placeholder, **kwargs)

    def _train_pass(self, store: A.IterationArtifacts, iteration: int, **train_kwargs) -> TrainOutput:
        with (
            self.accelerator.main_process_first()
        ):  # one process fills the datasets cache, the others read it
            dataset = self._load_rows(store).select_columns(["prompt", "completion"])
            self.train_dataset = self._prepare_dataset(
                dataset, self.processing_class, self.args, self.args.packing, None, f"iteration-{iteration}"
            )
        self._reset_optimizer()
        return SFTTrainer.train(self, **train_kwargs)


class HSStarDPOTrainer(_HSStarLoop, DPOTrainer):
    """DPOTrainer that runs HS-STaR on the authors' DPO pairs of boundary problems.

    The reference of iteration t is the policy at its start, M_t: with ``precompute_ref_log_probs=True`` (the
    default) its log-probabilities are computed once per iteration before training, so no second model is held;
    with PEFT the adapter is copied to a ``"ref"`` adapter first. Arguments as for :class:`HSStarTrainer`, plus
    ``ref_model`` (a fixed reference instead).
    """

    _hsstar_objective = "dpo"

    def __init__(
        self,
        model,
        args: HSStarDPOConfig | None = None,
        train_dataset: Dataset | None = None,
        reward_funcs: RewardFunc | Sequence[RewardFunc] | None = None,
        *,
        ref_model=None,
        reward_processing_classes=None,
        reward_weights: Sequence[float] | None = None,
        verifier: Callable[[str, str], bool] | None = None,
        sampler: Sampler | None = None,
        **kwargs,
    ):
        args = _resolve_args(model, args, HSStarDPOConfig, "HSStar-DPO", train_dataset)
        if ref_model is None and not args.precompute_ref_log_probs:
            raise ValueError(
                "Without `ref_model`, HSStarDPOTrainer needs `precompute_ref_log_probs=True`: the reference of each "
                "iteration is the policy at its start, computed once per iteration."
            )
        self._hsstar_setup(
            train_dataset, args, reward_funcs, reward_processing_classes, reward_weights, verifier, sampler
        )
        first = self._problem_rows[0]["prompt"]
        if isinstance(first, str):
            pair = {"prompt": first, "chosen": " ", "rejected": "  "}
        else:
            pair = {
                "prompt": first,
                "chosen": [{"role": "assistant", "content": " "}],
                "rejected": [{"role": "assistant", "content": "  "}],
            }
        self._hsstar_placeholder = True
        super().__init__(
            model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list([pair]), **kwargs
        )
        self._hsstar_placeholder = False

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # The constructor's one-row placeholder needs no reference log-probs (each iteration computes its own), and
        # precomputing them would cache an in-memory dataset in a temporary directory other processes cannot see.
        if getattr(self, "_hsstar_placeholder", False):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _snapshot_reference(self) -> None:
        """With PEFT, copy the current adapter to "ref" so that the reference is M_t, not the base model."""
        from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

        model = self.accelerator.unwrap_model(self.model)
        if self.ref_model is not None or not isinstance(model, PeftModel):
            return
        active = model.active_adapter
        if "ref" not in model.peft_config:
            model.add_adapter("ref", model.peft_config[active])
        set_peft_model_state_dict(
            model, get_peft_model_state_dict(model, adapter_name=active), adapter_name="ref"
        )
        model.set_adapter(active)
        for name, param in model.named_parameters():
            if ".ref." in name:
                param.requires_grad_(False)

    def _train_pass(self, store: A.IterationArtifacts, iteration: int, **train_kwargs) -> TrainOutput:
        with (
            self.accelerator.main_process_first()
        ):  # one process fills the datasets cache, the others read it
            dataset = self._load_rows(store).select_columns(["prompt", "chosen", "rejected"])
            dataset = self._prepare_dataset(
                dataset, self.processing_class, self.args, f"iteration-{iteration}"
            )
        if self.args.precompute_ref_log_probs:
            self._snapshot_reference()
            # The reference is the model as it is now, M_t; the hash keys the cache of this iteration's log-probs.
            self._precompute_model_hash = f"hsstar-{store.dir.resolve()}"
            dataset = self._precompute_ref_logps(
                dataset, "train", self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
            )
        self.train_dataset = dataset
        self._reset_optimizer()
        return DPOTrainer.train(self, **train_kwargs)
