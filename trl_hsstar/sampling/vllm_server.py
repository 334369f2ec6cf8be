"""Sampling from an external vLLM server (``vllm serve``), reloaded once per iteration through its dev endpoints.

For a policy too large to share its GPUs with a generation engine, or to generate with tensor or data
parallelism on other GPUs or another node: the server runs on its own (``vllm serve``, the server TRL's GRPO
server mode uses too), and :class:`VLLMServerSampler` talks to its HTTP API over keep-alive connections.

- Generation: one ``POST /v1/completions`` per prompt (as token ids, ``n`` = its samples, seeded so that sample
  ``j`` draws with :func:`~trl_hsstar.sampling.base.request_seed`'s seed, as the child engine's would), many in
  flight at once, so that vLLM batches them and no two samples share random draws.
- New weights each iteration: ``POST /collective_rpc`` with ``hsstar_reload`` (the checkpoint directory must be
  readable by the server: a shared file system), then ``POST /reset_prefix_cache``. Needs the server started
  with ``VLLM_SERVER_DEV_MODE=1`` and the worker extension ``hsstar_vllm.WorkerExtension``, which is what
  :func:`launch_vllm_server` and ``hsstar vllm-serve`` do.
- LoRA: each iteration's adapter is loaded with ``POST /v1/load_lora_adapter`` under a name of its own (the
  server would serve a cached adapter again under a reused name) and requested by that name; the 16-bit base is
  never merged into.
- Sleep: ``POST /sleep?level=1`` and ``POST /wake_up`` free and restore the server's GPU memory.

Failures: a server that is not reachable within ``timeout`` seconds raises :class:`EngineError` naming the URL,
before any sampling. A server that drops a request (it died) is waited for (up to ``timeout`` seconds, as a
supervisor restarts it), given the current weights or adapter again, and the request is sent again once;
otherwise :class:`EngineError`. A server that keeps a request without answering for ``request_timeout`` seconds
(alive but stuck) raises :class:`EngineTimeout`, naming ``vllm_request_timeout``. In the HS-STaR loop a request
belongs to one chunk of a phase: the chunks already saved are kept, and a rerun resumes.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from . import vllm_ext
from .base import Completion
from .vllm_sampler import EngineError, EngineTimeout, VLLMBackend, log_tail, stop_process_group, vllm_env

__all__ = ["VLLMServer", "VLLMServerSampler", "launch_vllm_server"]


class _Unreachable(EngineError):
    """No answer from the server at all (refused, reset): it may be restarting."""


class _HTTPError(EngineError):
    """The server answered with an HTTP error status (``status``)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _session(pool: int) -> requests.Session:
    """Keep-alive connections, ``pool`` of them, and no retries: a request resent to a server that restarted
    would sample from the checkpoint it started from, so a resend waits until this iteration's weights are back
    (:meth:`VLLMServerSampler._recover`)."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=pool, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _http(session, method: str, url: str, body: dict | None = None, timeout: float | None = 30.0) -> Any:
    """One JSON request; the decoded reply (``None`` for an empty body, text for a plain-text one). Raises
    :class:`_Unreachable` if the server does not answer, :class:`EngineTimeout` if it accepted the request and
    did not answer within ``timeout`` seconds, :class:`_HTTPError` if it answered with an error status."""
    try:
        reply = session.request(method, url, json=body, timeout=(10.0, timeout))
    except requests.exceptions.ReadTimeout as error:
        raise EngineTimeout(
            f"{method} {url} got no answer within {timeout:.0f} s (`vllm_request_timeout`): the server is alive "
            "but stuck or overloaded. The samples saved so far are kept: rerun the same command to resume from the "
            "last saved chunk; raise `vllm_request_timeout` if a chunk really takes this long, or lower "
            "`sampling_chunk_size`."
        ) from error
    except requests.exceptions.RequestException as error:  # refused, reset, or no connection in 10 s
        raise _Unreachable(f"{method} {url}: no answer ({error})") from error
    if reply.status_code >= 400:
        raise _HTTPError(
            f"{method} {url} failed with HTTP {reply.status_code}: {reply.text[:2000]}", reply.status_code
        )
    if not reply.content.strip():
        return None
    try:
        return reply.json()
    except ValueError:  # some endpoints answer in plain text ("Success: LoRA adapter ... added")
        return reply.text


class VLLMServerSampler(VLLMBackend):
    """A :class:`~trl_hsstar.sampling.Sampler` backed by a running vLLM server.

    Args:
        base_url: the server's address, e.g. ``"http://127.0.0.1:8000"``.
        tokenizer: the policy's tokenizer (prompts are tokenized here and sent as token ids).
        model: the served model name to request (default: the first one the server lists).
        timeout: seconds to wait for the server to answer ``/health``, at the start and after it stopped answering.
        request_timeout: seconds the server may take to answer one request (one prompt's samples) before the run
            stops with :class:`~trl_hsstar.sampling.EngineTimeout`.
        max_concurrency: requests (prompts) in flight at once (vLLM batches them).
        stop_strings: strings that end a completion, as EOS does (not included in the text).
    """

    name = "vllm-server"

    def __init__(
        self,
        base_url: str,
        tokenizer: Any,
        *,
        model: str | None = None,
        timeout: float = 240.0,
        request_timeout: float = 1800.0,
        max_concurrency: int = 128,
        stop_strings: str | Sequence[str] | None = None,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"`vllm_server_base_url` must be an http(s) URL such as 'http://127.0.0.1:8000', got {base_url!r}."
            )
        super().__init__(tokenizer, stop_strings)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = float(timeout)
        self.request_timeout = float(request_timeout)
        self.max_concurrency = int(max_concurrency)
        self._session = _session(self.max_concurrency)
        self.weights: str | None = None
        self.adapter: str | None = None  # the served name of the LoRA adapter in use
        self._adapter_path: str | None = None
        self.reload_seconds: list[float] = []
        self.retries = 0
        self._lock = threading.RLock()
        self._epoch = 0

    # -- the server --------------------------------------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> None:
        """Return once the server answers ``GET /health`` (and learn its model name); raise :class:`EngineError`
        naming the URL if it does not within ``timeout`` seconds (default: the sampler's)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                _http(self._session, "GET", f"{self.base_url}/health", timeout=10)
                break
            except EngineError as error:
                last = error
            if time.monotonic() >= deadline:
                raise EngineError(
                    f"the vLLM server at {self.base_url} did not answer within {timeout:.0f} s ({last}). Start it "
                    "first (`hsstar vllm-serve --model <the policy's starting checkpoint>`), or fix "
                    "`vllm_server_base_url` / `vllm_server_host` / `vllm_server_port`; `vllm_server_timeout` sets "
                    "how long to wait."
                )
            time.sleep(0.5)
        if self.model is None:
            models = _http(self._session, "GET", f"{self.base_url}/v1/models")
            self.model = models["data"][0]["id"]

    def _post(self, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        """A request that survives one server restart: if the server does not answer, wait until it does (up to
        ``timeout`` seconds), give it this sampler's weights or adapter again, and send the request again once."""
        url = f"{self.base_url}{path}"
        epoch = self._epoch
        try:
            return _http(self._session, "POST", url, body, timeout or self.request_timeout)
        except _Unreachable:
            self._recover(epoch)
            try:
                return _http(self._session, "POST", url, body, timeout or self.request_timeout)
            except _Unreachable as error:
                raise EngineError(
                    f"the vLLM server at {self.base_url} stopped answering ({error}). The samples saved so far are "
                    "kept: rerun the same command once the server is back, and the phase resumes from its last "
                    "saved chunk."
                ) from error

    def _recover(self, epoch: int) -> None:
        """After the server stopped answering: wait for it, and (once, for all the threads that saw it) load the
        weights or adapter in use again, since a restarted server starts from its own checkpoint."""
        with self._lock:
            if self._epoch != epoch:
                return  # another thread already recovered
            self.retries += 1
            self.wait_ready()
            weights, adapter = self.weights, self._adapter_path
            self._epoch += 1
            if weights is not None:
                self.weights = None
                self.load_weights(weights)
            if adapter is not None:
                self.load_adapter(adapter)

    def _dev(self, path: str, body: dict | None = None) -> Any:
        try:
            return self._post(path, body)
        except _HTTPError as error:
            if error.status in (404, 405):
                raise EngineError(
                    f"the vLLM server at {self.base_url} has no {path.split('?')[0]} endpoint: start it with "
                    "`VLLM_SERVER_DEV_MODE=1` (`hsstar vllm-serve` does)."
                ) from error
            raise

    # -- weights -----------------------------------------------------------------------------------------

    def load_weights(self, path: str | os.PathLike, *, register: bool = True) -> float:
        """Reload the server in place from a checkpoint directory it can read, then reset its prefix cache.
        ``register=False`` only records it (another process of the run reloaded the server), so that this sampler
        can load it again if the server restarts."""
        path = str(path)
        if self.weights == path:
            return 0.0
        if not register:
            self.weights, self.adapter, self._adapter_path = path, None, None
            return 0.0
        start = time.perf_counter()
        try:
            self._dev("/collective_rpc", {"method": "hsstar_reload", "kwargs": {"weights_path": path}})
        except _HTTPError as error:
            raise EngineError(
                f"the vLLM server at {self.base_url} could not reload {path} in place ({error}). The checkpoint must "
                "be readable by the server, and the server started with trl-hsstar's worker extension, which "
                "reloads in place and re-ties tied embeddings: start it with `hsstar vllm-serve`, or add "
                f"`--worker-extension-cls {vllm_ext.WORKER_EXTENSION}` with {vllm_ext.PATH} on PYTHONPATH."
            ) from error
        self._dev("/reset_prefix_cache")
        self.weights, self.adapter, self._adapter_path = path, None, None
        seconds = time.perf_counter() - start
        self.reload_seconds.append(seconds)
        return seconds

    @staticmethod
    def adapter_name(path: str | os.PathLike) -> str:
        """The served name of an adapter directory: the same on every process of a run, new for new files."""
        path = Path(path).resolve()
        stamp = [
            f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}"
            for p in sorted(path.iterdir())
            if p.is_file()
        ]
        return "hsstar-" + hashlib.sha1(f"{path}|{'|'.join(stamp)}".encode()).hexdigest()[:12]

    def load_adapter(self, path: str | os.PathLike | None, *, register: bool = True) -> None:
        """Serve a LoRA adapter (a PEFT directory the server can read) on the base from now on; ``None`` serves the
        base. ``register=False`` only requests it (another process of the run registered it)."""
        if path is None:
            self.adapter = self._adapter_path = None
            return
        name = self.adapter_name(path)
        if register:
            try:
                self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
            except _HTTPError as error:
                if not (
                    error.status == 400 and "already" in str(error).lower()
                ):  # loaded before: the same files
                    raise EngineError(
                        f"the vLLM server at {self.base_url} could not load the LoRA adapter {path}: {error}. Start it "
                        "with `--enable-lora --max-lora-rank <r>` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` "
                        "(`hsstar vllm-serve --enable-lora` does)."
                    ) from error
        self.adapter, self._adapter_path = name, str(path)

    def sleep(self) -> None:
        """Free the server's GPU memory (``--enable-sleep-mode``) while the policy trains."""
        self._dev("/sleep?level=1")

    def wake(self) -> None:
        self._dev("/wake_up")

    # -- the interface -----------------------------------------------------------------------------------

    def _complete(self, ids: list[int], n: int, seed: int | None, fields: dict) -> list[Completion]:
        """The ``n`` samples of one prompt in one request: vLLM seeds sample ``j`` with ``seed + j``, which is
        :func:`~trl_hsstar.sampling.base.request_seed`'s rule, so they are the samples per-sample seeds would give."""
        body = {
            "model": self.adapter or self.model,
            "prompt": ids,
            "n": n,
            "temperature": fields["temperature"],
            "top_p": fields["top_p"] if fields["temperature"] > 0 else 1.0,
            "max_tokens": fields["max_tokens"],
            "stop": fields["stop"] or None,
            "seed": seed,
            "skip_special_tokens": True,
            "return_token_ids": True,
            "top_k": fields.get("top_k", -1),
            "min_p": fields.get("min_p", 0.0),
            "repetition_penalty": fields.get("repetition_penalty", 1.0),
            **(fields.get("extra") or {}),  # the user's generation_kwargs override the rest
        }
        reply = self._post("/v1/completions", body)
        choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise EngineError(
                f"the vLLM server at {self.base_url} returned {len(choices)} completions for n={n}."
            )
        out = []
        for choice in choices:
            reason = "length" if choice.get("finish_reason") == "length" else "stop"
            tokens = choice.get("token_ids")
            count = len(tokens) if tokens is not None else int(reply["usage"]["completion_tokens"]) // n
            out.append(Completion(choice["text"], count, reason))
        return out

    def _generate_ids(self, ids: list[list[int]], seeds: list[list], fields: dict) -> list[list[Completion]]:
        if self.model is None:
            self.wait_ready()
        jobs = [(prompt, len(s), s[0]) for prompt, s in zip(ids, seeds)]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs))) as pool:
            return list(pool.map(lambda job: self._complete(*job, fields), jobs))


# ---------------------------------------------------------------------------------------------------------------
# Starting a server


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """A vLLM server process started by :func:`launch_vllm_server`; ``close()`` (or leaving a ``with``) stops it."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process, self.url, self.log_path = process, url, log_path

    def log_tail(self, n: int = 3000) -> str:
        return log_tail(self.log_path, n)

    def close(self, timeout: float = 30.0) -> None:
        stop_process_group(self.process, grace=timeout)

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def server_command(
    model: str | os.PathLike, *, python: str | None = None, host: str = "127.0.0.1", port: int = 8000, args=()
) -> list[str]:
    """The command line of a vLLM OpenAI-compatible server with trl-hsstar's worker extension. It is started
    through Python (``python -m vllm.entrypoints.openai.api_server``), which also works where the ``vllm serve``
    script cannot find its own package (vLLM's CPU build is published under another name)."""
    return [
        python or sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--worker-extension-cls",
        vllm_ext.WORKER_EXTENSION,
        *[str(a) for a in args],
    ]


def server_env(extra: dict | None = None) -> dict:
    """The server's environment: the dev endpoints (reload, prefix-cache reset, sleep) and runtime LoRA loading
    on, the worker extension importable."""
    return vllm_env(
        {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **(extra or {})}
    )


def launch_vllm_server(
    model: str | os.PathLike,
    *,
    python: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    args: Sequence[str] = (),
    env: dict | None = None,
    log_path: str | os.PathLike | None = None,
    timeout: float = 600.0,
) -> VLLMServer:
    """Start a vLLM server for HS-STaR and return once it answers (see :func:`server_command`).

    Args:
        model: the policy's starting checkpoint (for LoRA, the 16-bit base).
        python: the interpreter with vLLM (default: this one).
        host: the address it binds to: loopback unless you say otherwise.
        port: its port (default: a free one).
        args: more ``vllm serve`` arguments, e.g. ``["--tensor-parallel-size", "8", "--enable-lora"]``.
        env: extra environment variables.
        log_path: where its output goes (default: a temporary file); its tail is quoted in errors.
        timeout: seconds it may take to start.
    """
    port = port or _free_port(host)
    log_path = (
        Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="hsstar-vllm-server-", suffix=".log")[1])
    )
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            server_command(model, python=python, host=host, port=port, args=args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(env),
            start_new_session=True,
        )
    server = VLLMServer(process, f"http://{host}:{port}", log_path)
    session = _session(1)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise EngineError(
                f"the vLLM server exited (code {process.returncode}) while starting. Its log ({log_path}) ends "
                f"with:\n{server.log_tail()}"
            )
        try:
            _http(session, "GET", f"{server.url}/health", timeout=5)
            return server
        except EngineError:
            pass
        if time.monotonic() >= deadline:
            server.close()
            raise EngineError(
                f"the vLLM server did not start within {timeout:.0f} s and was stopped. Its log ({log_path}) ends "
                f"with:\n{server.log_tail()}"
            )
        time.sleep(1.0)
