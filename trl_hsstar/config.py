"""Configurations: :class:`HSStarConfig` (on ``trl.SFTConfig``) and :class:`HSStarDPOConfig` (on ``trl.DPOConfig``).

Both carry the same HS-STaR fields, declared once in :class:`HSStarArguments`, and validate them in
``__post_init__`` before any model is loaded, so a bad value fails in seconds with a message that
names the field and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from trl import DPOConfig, SFTConfig

from ._utils import accelerator_available
from .budget import STRATEGIES, presamples_for
from .checks import check_int
from .difficulty import ESTIMATORS, validate_levels, validate_thresholds
from .rewards import AGGREGATIONS
from .sampling.base import SamplingParams
from .verify import resolve_last_number_fallback

__all__ = ["HSStarArguments", "HSStarConfig", "HSStarDPOConfig"]

# TRL GRPO's vLLM field names and our defaults.
_VLLM_FIELDS = {
    "use_vllm": False,
    "vllm_mode": "colocate",
    "vllm_server_base_url": None,
    "vllm_server_host": "127.0.0.1",  # loopback unless the user says otherwise
    "vllm_server_port": 8000,
    "vllm_server_timeout": 240.0,
    "vllm_gpu_memory_utilization": 0.3,
    "vllm_tensor_parallel_size": 1,
    "vllm_max_model_length": None,
    "vllm_enable_sleep_mode": False,
}


DATA_FIELDS = (
    "sampling_budget",
    "num_presamples",
    "resample_rounds",
    "allocation",
    "difficulty_estimator",
    "reward_aggregation",
    "reward_step_token",
    "train_levels",
    "resample_levels",
    "max_rows_per_problem",
    "temperature",
    "top_p",
    "max_completion_length",
    "last_number_fallback",
    "seed",
)
DATA_FIELDS_WHEN_SET = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "generation_kwargs",
    "chat_template_kwargs",
)


@dataclass
class HSStarArguments:
    r"""
    The HS-STaR fields shared by [`HSStarConfig`] and [`HSStarDPOConfig`]. Defaults are the authors' release.

    Parameters:
        > Parameters that control the iterations

        num_iterations (`int`, *optional*, defaults to `3`):
            Number of HS-STaR iterations. Each samples, scores, selects, then runs one ordinary training pass
            (`num_train_epochs` epochs, its own optimizer and learning-rate schedule) continuing from the previous
            iteration's model.
        problems_per_iteration (`int`, *optional*):
            Fresh problems per iteration, taken in order from the shuffled dataset without overlap. If unset, the
            dataset is split evenly into `num_iterations` parts.
        answer_column (`str`, *optional*, defaults to `"answer"`):
            Column of the dataset holding the reference answer.
        problem_id_column (`str`, *optional*, defaults to `"id"`):
            Column with a unique id per problem; if the dataset has no such column, the row index is used.

        > Parameters that control sampling

        sampling_budget (`int`, *optional*, defaults to `8`):
            B: the average number of samples per problem per iteration. An iteration spends exactly B × N samples.
        num_presamples (`int`, *optional*, defaults to `3`):
            n_p: samples per problem in the pre-sampling phase, which estimates difficulty.
        resample_rounds (`int`, *optional*):
            Re-sampling rounds after pre-sampling. Before each, every problem's level is re-estimated from all its
            samples so far and an even slice of the remaining budget is allocated. Default: 4 for
            `allocation="hsstar_adaptive"`, else 1 (the release).
        temperature (`float`, *optional*, defaults to `0.7`):
            Sampling temperature.
        top_p (`float`, *optional*, defaults to `0.95`):
            Nucleus sampling probability.
        top_k (`int`, *optional*, defaults to `0`):
            Keep only the k most likely tokens; `0` keeps all (as GRPOConfig).
        min_p (`float`, *optional*):
            Minimum token probability relative to the most likely token, in [0, 1] (as GRPOConfig).
        repetition_penalty (`float`, *optional*, defaults to `1.0`):
            Penalty on tokens already in the prompt or completion (`1.0`: none).
        generation_kwargs (`dict`, *optional*):
            More keyword arguments for `generate` (transformers) or `SamplingParams` (vLLM); they override the
            fields above (as GRPOConfig).
        chat_template_kwargs (`dict`, *optional*):
            Keyword arguments for `apply_chat_template` when chat prompts are rendered, e.g.
            `{"enable_thinking": false}` for Qwen3.
        max_completion_length (`int`, *optional*, defaults to `512`):
            Maximum number of tokens generated per sample.
        generation_batch_size (`int`, *optional*, defaults to `64`):
            Sequences generated per `generate` call (per process).
        sampling_chunk_size (`int`, *optional*, defaults to `512`):
            Samples generated (and scored) per chunk. Sampling and scoring are shared out across processes a chunk
            at a time, and each finished chunk is saved, so a run killed mid-phase loses at most one chunk per
            process. Larger chunks batch better on vLLM; smaller ones lose less work to a kill.

        > Parameters that control difficulty estimation and budget allocation

        difficulty_estimator (`str`, *optional*, defaults to `"hsstar"`):
            `"hsstar"` (answer accuracy and reward), `"accuracy"` or `"reward"` (the paper's ablations).
        reward_thresholds (`list[float]`, *optional*):
            (tau_l, tau_h), with 0 <= tau_l < tau_h <= 1. Taken from the published table when the process reward
            model is one of the released ones; required otherwise when the estimator uses rewards, unless
            `calibrate_thresholds`.
        calibrate_thresholds (`bool`, *optional*, defaults to `False`):
            Take (tau_l, tau_h) from each iteration's pre-samples, for any reward model and policy: tau_h is the
            lower quartile of phi_r over the problems answered right every time, tau_l the upper quartile over
            those answered wrong every time. When they cross, that iteration falls back to answer accuracy.
        reward_aggregation (`str`, *optional*, defaults to `"min"`):
            How a process reward model's step rewards make S(r): `"min"`, `"prod"` or `"last"`.
        reward_step_token (`str`, *optional*):
            The token a process reward model reads each step's reward at: the separator it was trained with (TRL's
            former `PRMConfig.step_separator`, e.g. `"\\n"`). Default: `"<step>"` when its tokenizer has it, and
            `"<extra_0>"` for Qwen2.5-Math-PRM.
        allocation (`str`, *optional*, defaults to `"hsstar"`):
            Budget strategy: `"hsstar"` (the release), `"hsstar_adaptive"` (over `resample_rounds` rounds, a
            problem stops receiving samples once it has `max_rows_per_problem` rows), or the equal-budget baselines
            `"uniform"` (STaR/RFT), `"prop2diff"` (DART-Math), `"band"` (non-zero pass-rate variance) and
            `"knapsack"` (Knapsack RL).
        reward_batch_size (`int`, *optional*, defaults to `16`):
            Sequences per forward pass of a reward model.
        verifier_timeout (`float`, *optional*, defaults to `5.0`):
            Seconds one answer check may take before it counts as wrong.
        eval_num_samples (`int`, *optional*, defaults to `0`):
            With an `eval_dataset` of problems, the model is evaluated on them before the first iteration and after
            each one (greedy accuracy, plus avg@k, pass@k and maj@k with k = this many samples), logged to `report_to`.
        last_number_fallback (`bool` or `None`, *optional*, defaults to `None`):
            For the default verifier: without a `\boxed{}` or a GSM8K `#### n` line, the last number of a completion
            is its answer. `None` turns it on when the problems' prompts are chat messages (an instruct model answers
            "7 + 5 = 12") and off for plain-text prompts (a model trained to box its answer).

        resample_levels (`list[str]`, *optional*, defaults to `["boundary"]`):
            With `allocation="hsstar"`, the levels whose problems receive the re-sampling budget. `["easy"]` or
            `["hard"]` gives the paper's utility study.

        > Parameters that control training data

        max_rows_per_problem (`int`, *optional*, defaults to `4`):
            Most SFT rows (or DPO pairs) kept per problem, best S(r) first. `None` keeps all.
        min_row_score (`float`, *optional*):
            SFT: keep only correct rationales whose S(r) is at least this (a process reward model cleans what the
            answer check lets through); the number dropped is in each iteration's statistics. `None` keeps all.
        train_levels (`list[str]`, *optional*, defaults to `["boundary"]`):
            Levels whose problems give training data.

        > Parameters that control generation with vLLM (TRL GRPO's names, so a GRPO YAML carries over)

        use_vllm (`bool`, *optional*, defaults to `False`):
            Sample with vLLM instead of transformers `generate`.
        vllm_mode (`str`, *optional*, defaults to `"colocate"`):
            `"colocate"`: the trainer owns a vLLM engine in a child process on the training machine, started once,
            given each iteration's checkpoint (or LoRA adapter) in place, and asleep while the policy trains if
            `vllm_enable_sleep_mode`. Each process of a multi-process run has its own engine.
            `"server"`: an external vLLM server (`hsstar vllm-serve`, on other GPUs or another node, with tensor or
            data parallelism) that every process sends its share of the samples to; the main process gives it
            each iteration's checkpoint (or LoRA adapter) through its dev endpoints. The checkpoints in
            `output_dir` must be readable by the server.
        vllm_server_base_url (`str`, *optional*):
            The server's URL, e.g. `"http://10.0.0.5:8000"`. Overrides `vllm_server_host` and `vllm_server_port`.
        vllm_server_host (`str`, *optional*, defaults to `"127.0.0.1"`):
            The server's host, when `vllm_server_base_url` is not set.
        vllm_server_port (`int`, *optional*, defaults to `8000`):
            The server's port, when `vllm_server_base_url` is not set.
        vllm_python (`str`, *optional*):
            The Python interpreter that runs the engine: one with vLLM installed, e.g. a separate virtual
            environment whose pins would conflict with TRL's. Default: this interpreter.
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            Share of the GPU memory the engine may take.
        vllm_tensor_parallel_size (`int`, *optional*, defaults to `1`):
            GPUs one engine spans.
        vllm_max_model_length (`int`, *optional*):
            The engine's context length. Default: the model's.
        vllm_enable_sleep_mode (`bool`, *optional*, defaults to `False`):
            Put the engine to sleep (its GPU memory freed) during each training pass.
        vllm_engine_kwargs (`dict` or `str`, *optional*):
            More keyword arguments of `vllm.LLM` for the engine the trainer owns (a dict, or its JSON on the command
            line), e.g. `{"enforce_eager": true, "max_num_seqs": 256}`. By default the engine runs in the policy's own
            dtype, so that it samples what the policy would.
        vllm_server_timeout (`float`, *optional*, defaults to `240.0`):
            Seconds the engine may take to start (or the server to answer) before the run stops with a clear error,
            before any sampling.
        vllm_request_timeout (`float`, *optional*, defaults to `1800.0`):
            Seconds the engine may take over one chunk of a phase (the server: over one prompt's samples) before
            the run stops with a clear error; the chunks saved before are kept, and rerunning the same command
            resumes. An engine that is alive but stuck would otherwise stall the run.
    """

    # iterations
    num_iterations: int = field(default=3, metadata={"help": "Number of HS-STaR iterations."})
    problems_per_iteration: int | None = field(
        default=None,
        metadata={
            "help": "Fresh problems per iteration (no overlap). Unset: the dataset split evenly over iterations."
        },
    )
    answer_column: str = field(
        default="answer", metadata={"help": "Dataset column with the reference answer."}
    )
    problem_id_column: str = field(
        default="id", metadata={"help": "Dataset column with a unique problem id (row index if absent)."}
    )
    # sampling
    sampling_budget: int = field(
        default=8, metadata={"help": "B: average samples per problem per iteration."}
    )
    num_presamples: int = field(default=3, metadata={"help": "n_p: pre-samples per problem."})
    resample_rounds: int | None = field(
        default=None,
        metadata={
            "help": "Re-sampling rounds after pre-sampling, each re-estimating levels and taking an even slice of "
            "the remaining budget. Default: 4 under allocation='hsstar_adaptive', else 1 (the release)."
        },
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling probability."})
    top_k: int = field(default=0, metadata={"help": "Top-k filtering; 0 keeps every token."})
    min_p: float | None = field(
        default=None, metadata={"help": "Minimum token probability relative to the most likely token."}
    )
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty (1.0: none)."})
    generation_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "More generate (transformers) or SamplingParams (vLLM) arguments; a dict or its JSON."
        },
    )
    chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": 'apply_chat_template arguments, e.g. {"enable_thinking": false}; a dict or its JSON.'
        },
    )
    max_completion_length: int = field(default=512, metadata={"help": "Maximum tokens generated per sample."})
    generation_batch_size: int = field(
        default=64, metadata={"help": "Sequences per generate call (per process)."}
    )
    sampling_chunk_size: int = field(
        default=512,
        metadata={"help": "Samples generated (and scored) per saved chunk: a kill loses at most one chunk."},
    )
    # difficulty and allocation
    difficulty_estimator: str = field(
        default="hsstar", metadata={"help": f"Difficulty estimator, one of {ESTIMATORS}."}
    )
    reward_thresholds: list[float] | None = field(
        default=None,
        metadata={"help": "(tau_l, tau_h). Default: the published pair for a released PRM, else required."},
    )
    calibrate_thresholds: bool = field(
        default=False,
        metadata={
            "help": "Take (tau_l, tau_h) from each iteration's pre-samples (quartiles; docs/method.md)."
        },
    )
    reward_aggregation: str = field(
        default="min", metadata={"help": f"Step reward aggregation, one of {AGGREGATIONS}."}
    )
    reward_step_token: str | None = field(
        default=None,
        metadata={"help": "The token a PRM reads step rewards at (its training separator). Default: <step>."},
    )
    allocation: str = field(default="hsstar", metadata={"help": f"Budget strategy, one of {STRATEGIES}."})
    resample_levels: list[str] = field(
        default_factory=lambda: ["boundary"],
        metadata={
            "help": "allocation='hsstar': the levels that receive the re-sampling budget (utility study)."
        },
    )
    reward_batch_size: int = field(default=16, metadata={"help": "Sequences per reward-model forward pass."})
    verifier_timeout: float = field(
        default=5.0, metadata={"help": "Seconds per answer check before it counts as wrong."}
    )
    eval_num_samples: int = field(
        default=0,
        metadata={
            "help": "Held-out evaluation (an `eval_dataset` of problems): samples per problem for avg@k, pass@k and "
            "maj@k beside greedy accuracy (0: greedy only)."
        },
    )
    last_number_fallback: bool | None = field(
        default=None,
        metadata={
            "help": "Default verifier: without \\boxed{} or '#### n', a completion's last number is its answer. "
            "Unset: on for chat prompts (instruct models answer in free text), off for text prompts."
        },
    )
    # training data
    max_rows_per_problem: int | None = field(
        default=4,
        metadata={"help": "Most SFT rows / DPO pairs per problem (best S(r) first). None keeps all."},
    )
    train_levels: list[str] = field(
        default_factory=lambda: ["boundary"], metadata={"help": "Levels whose problems give training data."}
    )
    min_row_score: float | None = field(
        default=None, metadata={"help": "SFT: keep only correct rationales with S(r) at least this."}
    )
    # vLLM (TRL GRPO names)
    use_vllm: bool = field(
        default=False, metadata={"help": "Sample with vLLM instead of transformers generate."}
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "'colocate': an engine the trainer owns, in a child process; 'server': an external vLLM server.",
            "choices": ["colocate", "server"],
        },
    )
    vllm_python: str | None = field(
        default=None, metadata={"help": "Interpreter with vLLM that runs the engine (default: this one)."}
    )
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "URL of the vLLM server (vllm_mode='server'); overrides host and port."},
    )
    vllm_server_host: str = field(
        default="127.0.0.1", metadata={"help": "Host of the vLLM server, without vllm_server_base_url."}
    )
    vllm_server_port: int = field(
        default=8000, metadata={"help": "Port of the vLLM server, without vllm_server_base_url."}
    )
    vllm_server_timeout: float = field(
        default=240.0,
        metadata={"help": "Seconds the vLLM engine may take to start (or the server to answer)."},
    )
    vllm_request_timeout: float = field(
        default=1800.0,
        metadata={
            "help": "Seconds the vLLM engine may take over one chunk (the server: one prompt) of a phase."
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Share of the GPU memory the vLLM engine may take."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs one vLLM engine spans."})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "The vLLM engine's context length (default: the model's)."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Free the vLLM engine's GPU memory during each training pass."}
    )
    vllm_engine_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "More vllm.LLM keyword arguments for the engine the trainer owns (a dict, or JSON)."
        },
    )

    def _validate_hsstar(self) -> None:
        """Check every HS-STaR field; raise ``ValueError`` naming the field and the fix."""

        def positive_int(name: str, allow_none: bool = False) -> None:
            check_int(getattr(self, name), name, allow_none=allow_none)

        if self.resample_rounds is None:
            self.resample_rounds = 4 if self.allocation == "hsstar_adaptive" else 1
        for name in (
            "num_iterations",
            "sampling_budget",
            "resample_rounds",
            "max_completion_length",
            "generation_batch_size",
            "sampling_chunk_size",
            "reward_batch_size",
        ):
            positive_int(name)
        positive_int("problems_per_iteration", allow_none=True)
        positive_int("max_rows_per_problem", allow_none=True)
        # the budget and the sampling settings are checked by the functions that own them, with the same messages
        presamples_for(self.allocation, self.sampling_budget, self.num_presamples)
        for name in ("generation_kwargs", "chat_template_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"`{name}` must be a dict or its JSON, got {value!r}: {error}."
                    ) from error
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"`{name}` must be a dict, got {type(value).__name__}.")
            setattr(self, name, value)
        self.sampling_params(seed=None)  # SamplingParams checks its own fields
        if not self.verifier_timeout > 0:
            raise ValueError(f"`verifier_timeout` must be positive, got {self.verifier_timeout!r}.")
        if self.difficulty_estimator not in ESTIMATORS:
            raise ValueError(
                f"`difficulty_estimator` must be one of {ESTIMATORS}, got {self.difficulty_estimator!r}."
            )
        if self.reward_aggregation not in AGGREGATIONS:
            raise ValueError(
                f"`reward_aggregation` must be one of {AGGREGATIONS}, got {self.reward_aggregation!r}."
            )
        if self.reward_thresholds is not None:
            self.reward_thresholds = list(validate_thresholds(self.reward_thresholds))
            if self.calibrate_thresholds:
                raise ValueError(
                    "`reward_thresholds` and `calibrate_thresholds=True` both set the thresholds: keep one."
                )
        if self.min_row_score is not None and (
            isinstance(self.min_row_score, bool) or not isinstance(self.min_row_score, (int, float))
        ):
            raise ValueError(
                f"`min_row_score` must be a number (S(r) of a kept row) or None, got {self.min_row_score!r}."
            )
        for name in ("train_levels", "resample_levels"):
            validate_levels(getattr(self, name), name=name, allow_empty=False)
        if not self.answer_column:
            raise ValueError("`answer_column` must name the dataset column with the reference answers.")
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError(
                f"`vllm_mode` must be 'colocate' (an engine the trainer owns) or 'server' (an external vLLM "
                f"server), got {self.vllm_mode!r}."
            )
        if self.vllm_server_base_url is not None and not str(self.vllm_server_base_url).startswith(
            ("http://", "https://")
        ):
            raise ValueError(
                f"`vllm_server_base_url` must be an http(s) URL such as 'http://127.0.0.1:8000', got "
                f"{self.vllm_server_base_url!r}."
            )
        if not self.vllm_server_host:
            raise ValueError("`vllm_server_host` must name the server's host, e.g. '127.0.0.1'.")
        port = self.vllm_server_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"`vllm_server_port` must be a port number in 1..65535, got {port!r}.")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(
                f"`vllm_gpu_memory_utilization` must be in (0, 1], got {self.vllm_gpu_memory_utilization!r}."
            )
        positive_int("vllm_tensor_parallel_size")
        positive_int("vllm_max_model_length", allow_none=True)
        for name in ("vllm_server_timeout", "vllm_request_timeout"):
            if isinstance(getattr(self, name), bool) or not getattr(self, name) > 0:
                raise ValueError(
                    f"`{name}` must be a positive number of seconds, got {getattr(self, name)!r}."
                )
        if isinstance(self.vllm_engine_kwargs, str):
            try:
                self.vllm_engine_kwargs = json.loads(self.vllm_engine_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`vllm_engine_kwargs` must be a dict or its JSON, got {self.vllm_engine_kwargs!r}: {error}."
                ) from error
        if self.vllm_engine_kwargs is not None and not isinstance(self.vllm_engine_kwargs, dict):
            raise ValueError(
                f"`vllm_engine_kwargs` must be a dict, got {type(self.vllm_engine_kwargs).__name__}."
            )
        if self.vllm_engine_kwargs and "model" in self.vllm_engine_kwargs:
            raise ValueError(
                "`vllm_engine_kwargs` must not set `model`: the engine starts from the policy's checkpoint."
            )
        if self.vllm_python is not None and self.vllm_mode == "server":
            raise ValueError(
                "`vllm_python` names the interpreter of an engine the trainer starts (`vllm_mode='colocate'`); with "
                "`vllm_mode='server'` the server runs on its own: remove `vllm_python`, or start the server with "
                "`hsstar vllm-serve --python ...`."
            )
        if self.vllm_python is not None and not os.path.exists(self.vllm_python):
            raise ValueError(
                f"`vllm_python` ({self.vllm_python}) does not exist: give the interpreter of an environment with "
                "vLLM installed (e.g. .vllm-venv/bin/python)."
            )

    # -- what the run derives from these fields, each read here once

    def sampling_params(self, seed: int | None) -> SamplingParams:
        """How the run samples (GRPOConfig's sampling fields), with ``seed``."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_completion_length,
            seed=seed,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            generation_kwargs=self.generation_kwargs,
        )

    def data_settings(self) -> dict:
        """The fields that shape the data, which a resume must match (see :class:`~trl_hsstar.artifacts.RunManifest`)."""
        settings = {name: getattr(self, name) for name in DATA_FIELDS}
        # in the manifest only when set, so that runs started before these fields existed still resume
        settings.update(
            {n: getattr(self, n) for n in DATA_FIELDS_WHEN_SET if getattr(self, n) not in (None, 0, 1.0)}
        )
        settings.update({} if self.min_row_score is None else {"min_row_score": self.min_row_score})
        settings.update({"calibrate_thresholds": True} if self.calibrate_thresholds else {})
        return settings

    def answer_fallback(self, problem_rows: list[dict]) -> bool:
        """``last_number_fallback``, resolved: unset, it is on for chat prompts (instruct models answer in free text)."""
        chat = bool(problem_rows) and not isinstance(problem_rows[0]["prompt"], str)
        return resolve_last_number_fallback(self.last_number_fallback, chat)

    def _defaults_for_this_machine(self) -> None:
        """On a machine without an accelerator: bf16 off (TRL turns it on by default, which fails on a CPU), and
        ``use_cpu`` on, so that ``accelerate launch --multi_gpu --num_processes N`` runs N CPU processes (gloo)
        rather than N independent single-process runs."""
        if accelerator_available():
            return
        if getattr(self, "bf16", None) is None and not getattr(self, "fp16", False):
            self.bf16 = False
        self.use_cpu = True


@dataclass
class HSStarConfig(SFTConfig, HSStarArguments):
    r"""
    Configuration of [`HSStarTrainer`]: every [`~trl.SFTConfig`] field (each iteration's training pass is an
    ordinary SFT run on the selected rows, completion-only loss) plus the HS-STaR fields of [`HSStarArguments`].
    Each iteration trains one epoch with a fresh optimizer and its own cosine schedule with 3% warm-up, as in the
    authors' release.

    Example:
        ```python
        from trl_hsstar import HSStarConfig

        args = HSStarConfig(output_dir="out", num_iterations=3, sampling_budget=8, num_presamples=3)
        ```
    """

    lr_scheduler_type: str = field(default="cosine", metadata={"help": "The scheduler type to use."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Warm-up steps; below 1, a fraction of the steps."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs per iteration."})

    def __post_init__(self):
        self._validate_hsstar()
        self._defaults_for_this_machine()
        super().__post_init__()


@dataclass
class HSStarDPOConfig(DPOConfig, HSStarArguments):
    r"""
    Configuration of [`HSStarDPOTrainer`]: every [`~trl.DPOConfig`] field plus the HS-STaR fields of
    [`HSStarArguments`]. The defaults follow the authors' release: learning rate 5e-7, cosine schedule with 3%
    warm-up, one epoch per iteration; the reference model of iteration t is the policy at its start (reference
    log-probabilities are precomputed, so no second model is held in memory).
    """

    learning_rate: float = field(default=5e-7, metadata={"help": "The initial learning rate for AdamW."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "The scheduler type to use."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Warm-up steps; below 1, a fraction of the steps."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs per iteration."})
    max_rows_per_problem: int | None = field(
        default=None, metadata={"help": "Most DPO pairs per problem. None keeps all, as the release does."}
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={"help": "Precompute the reference (the policy at the start of each iteration) log-probs."},
    )

    def __post_init__(self):
        self._validate_hsstar()
        self._defaults_for_this_machine()
        super().__post_init__()
