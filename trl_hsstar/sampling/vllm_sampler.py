"""Sampling with vLLM in an engine process the sampler owns, kept alive across iterations.

The engine runs :mod:`trl_hsstar.sampling.vllm_ext.hsstar_vllm` as a child process, under this interpreter or another
one (``python=``: a virtual environment with vLLM whose pins would fight TRL's). The weights of an HS-STaR policy
change once per iteration, not once per step, so the engine is started once and given each iteration's saved
checkpoint with :meth:`VLLMSampler.load_weights` (an in-place reload that takes well under a second, tied
embeddings tied again, followed by a prefix-cache reset), or each iteration's LoRA adapter with :meth:`VLLMSampler.load_adapter` (served on the 16-bit
base, never merged into quantized weights).

Prompts are tokenized here, with the same rule as the transformers backend
(:func:`~trl_hsstar.sampling.base.encode_prompt`), and sent as token ids, so both backends see the same tokens.
With ``params.seed`` set, every sample gets its own seed (:func:`~trl_hsstar.sampling.base.request_seed`): a rerun
reproduces, and no two samples share random draws.

A model the engine cannot reload in place (vLLM's in-place reload does not cover every architecture and load
format) falls back to a fresh engine on the new checkpoint, with a warning: the same weights, slower.

Failures: an engine that does not start within ``startup_timeout`` seconds, or does not answer a request within
``request_timeout``, is killed and reported with the tail of its log. An engine that dies in the middle of a
request is restarted (up to ``max_restarts`` times over the sampler's life, with the current weights or adapter)
and the request is sent again: in the HS-STaR loop a request is one chunk of a phase, and the chunks already
saved are kept, so nothing is lost or repeated.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._utils import read_line
from . import vllm_ext
from .base import (
    Completion,
    Sampler,
    SamplingParams,
    encode_prompt,
    request_seed,
    stop_list,
    text_tokenizer,
    validate_request,
)

__all__ = ["EngineError", "EngineReplyError", "EngineTimeout", "VLLMSampler"]

logger = logging.getLogger(__name__)

WORKER = Path(vllm_ext.PATH) / "hsstar_vllm.py"


def vllm_env(extra: dict | None = None) -> dict:
    """The environment of a process that runs vLLM for trl-hsstar: this one's, plus ``extra``, with the worker
    extension's folder first on ``PYTHONPATH`` (so that vLLM imports ``hsstar_vllm.WorkerExtension`` in every
    process it starts)."""
    env = dict(os.environ)
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (vllm_ext.PATH, env.get("PYTHONPATH")) if p)
    return env


def vllm_request(tokenizer, prompts: Sequence[str], num_samples: Sequence[int], params: SamplingParams, stop):
    """What every vLLM backend sends for one request: the indices of the prompts with samples, their token ids
    (:func:`~trl_hsstar.sampling.base.encode_prompt`, the same tokens as the transformers backend), one seed per
    sample (:func:`~trl_hsstar.sampling.base.request_seed`, or ``None`` unseeded) and vLLM's sampling fields."""
    wanted = [i for i, n in enumerate(num_samples) if n > 0]
    ids = [encode_prompt(tokenizer, prompts[i], i) for i in wanted]
    seeds = [
        [None if params.seed is None else request_seed(params.seed, i, j) for j in range(num_samples[i])]
        for i in wanted
    ]
    fields = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "stop": list(stop or []),
        "top_k": params.top_k if params.top_k > 0 else -1,
        "min_p": float(params.min_p or 0.0),
        "repetition_penalty": float(params.repetition_penalty),
        "extra": dict(params.generation_kwargs or {}),  # vLLM SamplingParams fields, overriding the above
    }
    return wanted, ids, seeds, fields


def stop_process_group(proc: subprocess.Popen, grace: float = 0.0) -> None:
    """Stop a process started with ``start_new_session=True`` and all it started: SIGTERM and up to ``grace``
    seconds to exit (with none, straight to SIGKILL), then SIGKILL."""
    if proc.poll() is None and grace > 0:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
    proc.wait()


def log_tail(path: Path, n: int = 3000) -> str:
    """The last ``n`` characters of a log file ("" if it cannot be read), to quote in an error."""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class EngineError(RuntimeError):
    """The vLLM engine failed to start, died, or did not answer in time."""


class EngineTimeout(EngineError):
    """The vLLM engine or server did not answer a request in time (a child engine is stopped, not restarted)."""


class EngineReplyError(RuntimeError):
    """The vLLM engine is alive and answered a request with an error (its traceback is the message)."""


class VLLMBackend(Sampler):
    """What the vLLM backends share: a request becomes token ids, one seed per sample and vLLM's sampling fields
    (:func:`vllm_request`); a backend implements :meth:`_generate_ids` to draw the samples of such a request."""

    def __init__(self, tokenizer: Any, stop_strings: str | Sequence[str] | None = None):
        self.tokenizer = text_tokenizer(tokenizer)
        self.stop_strings = stop_list(stop_strings)

    @abc.abstractmethod
    def _generate_ids(self, ids: list[list[int]], seeds: list[list], fields: dict) -> list[list[Completion]]:
        """For each prompt (token ids), one completion per seed in its list, in order."""

    def generate(
        self, prompts: Sequence[str], num_samples: Sequence[int], params: SamplingParams
    ) -> list[list[Completion]]:
        validate_request(prompts, num_samples, params)
        start = time.perf_counter()
        results: list[list[Completion]] = [[] for _ in prompts]
        wanted, ids, seeds, fields = vllm_request(
            self.tokenizer, prompts, num_samples, params, self.stop_strings
        )
        if wanted:
            for i, completions in zip(wanted, self._generate_ids(ids, seeds, fields)):
                results[i] = completions
        self._record(results, time.perf_counter() - start)
        return results


class VLLMSampler(VLLMBackend):
    """A :class:`~trl_hsstar.sampling.Sampler` backed by a vLLM engine in a child process.

    Args:
        model: the checkpoint the engine starts from (a directory or a Hub id): for LoRA, the 16-bit base.
        tokenizer: its tokenizer (prompts are tokenized here).
        python: the interpreter that runs the engine (default: this one). It needs vLLM, not trl-hsstar.
        engine_kwargs: keyword arguments of ``vllm.LLM`` (``dtype``, ``gpu_memory_utilization``,
            ``tensor_parallel_size``, ``max_model_len``, ``enable_lora``, ``max_lora_rank``, ``enable_sleep_mode``,
            ``seed``...). ``model`` and ``tokenizer`` are filled in.
        env: extra environment variables of the engine process (e.g. ``VLLM_CPU_KVCACHE_SPACE``).
        startup_timeout: seconds the engine may take to start.
        request_timeout: seconds one request (one chunk of a phase) may take before the engine is stopped and
            :class:`EngineTimeout` raised (``None``: no limit).
        max_restarts: how many times a dead engine is restarted over the sampler's life.
        stop_strings: strings that end a completion, as EOS does (not included in the text).
        log_path: where the engine's output goes (default: a temporary file); its tail is quoted in errors.
    """

    name = "vllm"

    def __init__(
        self,
        model: str | os.PathLike,
        tokenizer: Any,
        *,
        python: str | None = None,
        engine_kwargs: dict | None = None,
        env: dict | None = None,
        startup_timeout: float = 600.0,
        request_timeout: float | None = 1800.0,
        max_restarts: int = 1,
        stop_strings: str | Sequence[str] | None = None,
        log_path: str | os.PathLike | None = None,
    ):
        super().__init__(tokenizer, stop_strings)
        self.model = str(model)
        self.python = python or sys.executable
        if not Path(self.python).exists():
            raise ValueError(
                f"`python` ({self.python}) does not exist: pass the interpreter of an environment with vLLM."
            )
        self.engine_kwargs = dict(engine_kwargs or {})
        self.engine_kwargs.setdefault("model", self.model)
        self.engine_kwargs.setdefault("tokenizer", self.model)  # also after a restart on a later checkpoint
        self.env = dict(env or {})
        if int(self.engine_kwargs.get("tensor_parallel_size", 1)) == 1:
            # the engine core in the worker process: an in-place reload can then re-tie tied embeddings
            self.env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self.max_restarts = max_restarts
        self.restarts = 0
        self.log_path = (
            Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="hsstar-vllm-", suffix=".log")[1])
        )
        self.weights: str | None = None  # a checkpoint loaded after start, reloaded after a restart
        self.adapter: list | None = None  # [name, id, path] of the LoRA adapter in use
        self._adapter_ids = 0
        self._proc: subprocess.Popen | None = None
        self.reload_seconds: list[float] = []
        self.fresh_starts = 0  # reloads that fell back to a fresh engine

    # -- the engine process --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the engine (done on the first request); a no-op if it is running. An engine started after
        :meth:`load_weights` starts from those weights."""
        if self._proc is not None and self._proc.poll() is None:
            return
        env = vllm_env(self.env)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.python, str(WORKER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        try:
            engine = dict(self.engine_kwargs)
            if self.weights is not None:
                engine["model"] = self.weights
            self._request({"cmd": "start", "engine": engine}, self.startup_timeout, "start")
        except EngineError:
            self._kill()
            raise

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process_group(proc)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()

    def _request(self, request: dict, timeout: float | None, what: str) -> dict:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise EngineError(f"the vLLM engine is not running ({what})")
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise EngineError(f"the vLLM engine died before the {what} request: {error}") from error
        try:
            line = read_line(proc.stdout.fileno(), timeout)
        except EOFError:
            raise EngineError(
                f"the vLLM engine exited (code {proc.wait()}) during the {what} request. Its log "
                f"({self.log_path}) ends with:\n{log_tail(self.log_path)}"
            ) from None
        except TimeoutError:
            self._kill()
            setting = "vllm_server_timeout" if what == "start" else "vllm_request_timeout"
            raise EngineTimeout(
                f"the vLLM engine did not answer the {what} request within {timeout:.0f} s (`{setting}`) and "
                "was stopped. The samples saved so far are kept: rerun the same command to resume from the last "
                f"saved chunk; raise `{setting}` if it really takes this long. Its log ({self.log_path}) ends "
                f"with:\n{log_tail(self.log_path)}"
            ) from None
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise EngineReplyError(f"the vLLM engine failed the {what} request:\n{reply['error']}")
        return reply

    def _call(self, request: dict, what: str) -> dict:
        """Send a request, restarting a dead engine (within ``max_restarts``) and sending it again."""
        self.start()
        try:
            return self._request(request, self.request_timeout, what)
        except EngineTimeout:
            raise
        except EngineError:
            if self.restarts >= self.max_restarts:
                raise
            self.restarts += 1
            self._kill()
            self.start()
            return self._request(request, self.request_timeout, what)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(EngineError, RuntimeError):
                self._request({"cmd": "close"}, 30, "close")
        self._kill()

    # -- weights -----------------------------------------------------------------------------------------

    def load_weights(self, path: str | os.PathLike) -> float:
        """Load a full checkpoint directory into the running engine (started from it if not running yet)."""
        path = str(path)
        if self.weights == path:
            return 0.0
        self.weights, self.adapter = path, None
        if self._proc is None or self._proc.poll() is not None:
            return 0.0  # the engine loads it when it starts
        start = time.perf_counter()
        try:
            self._call({"cmd": "reload", "path": path}, "reload")
        except EngineReplyError as error:  # the engine cannot reload this model in place: the fallback
            logger.warning(
                "The vLLM engine could not reload %s in place; starting a fresh engine on it instead (about 30 s "
                "on a small model). The engine said:\n%s",
                path,
                str(error)[-2000:],
            )
            self._kill()
            self.start()
            self.fresh_starts += 1
        seconds = time.perf_counter() - start
        self.reload_seconds.append(seconds)
        return seconds

    def load_adapter(self, path: str | os.PathLike | None) -> None:
        """Serve a LoRA adapter (a PEFT directory) on the base from now on; ``None`` serves the base alone. A new
        adapter id every time: vLLM would serve a cached adapter again under a reused id."""
        if path is None:
            self.adapter = None
            return
        self._adapter_ids += 1
        self.adapter = [f"adapter-{self._adapter_ids}", self._adapter_ids, str(path)]

    def sleep(self) -> None:
        """Free the engine's GPU memory (``enable_sleep_mode``) while the policy trains."""
        if self._proc is not None and self._proc.poll() is None:
            self._call({"cmd": "sleep", "level": 1}, "sleep")

    def wake(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._call({"cmd": "wake"}, "wake")

    # -- the interface -----------------------------------------------------------------------------------

    def _generate_ids(self, ids: list[list[int]], seeds: list[list], fields: dict) -> list[list[Completion]]:
        request = {"cmd": "generate", "prompts": ids, "seeds": seeds, "params": fields, "lora": self.adapter}
        reply = self._call(request, "generate")
        return [[Completion(text, int(n), reason) for text, n, reason in cs] for cs in reply["completions"]]
