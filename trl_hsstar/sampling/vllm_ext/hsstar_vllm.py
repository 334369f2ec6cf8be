"""What runs inside vLLM: the engine process of :class:`~trl_hsstar.sampling.VLLMSampler` and the worker extension.

A standalone module (standard library + vLLM only), so it runs under any interpreter that has vLLM, including a
separate virtual environment whose pins would conflict with TRL's.

:class:`WorkerExtension` is given to vLLM as ``worker_extension_cls="hsstar_vllm.WorkerExtension"`` (the engine of
:class:`~trl_hsstar.sampling.VLLMSampler` and a server started by :func:`~trl_hsstar.sampling.launch_vllm_server`
both do it, with this folder on ``PYTHONPATH``). It adds one call to vLLM's workers, ``hsstar_reload``: an in-place
reload of a checkpoint directory that also re-ties tied word embeddings (vLLM's own ``reload_weights`` refills the
input embedding and leaves the output head with the old weights). It is reached with ``collective_rpc``, in process
or through a server's ``POST /collective_rpc`` (``VLLM_SERVER_DEV_MODE=1``).

``python hsstar_vllm.py`` is the engine process. It talks JSON Lines: one request per line on stdin, one reply
per line on the original stdout. Everything vLLM prints goes to stderr (the stdout file descriptor is pointed
there), so logs can never corrupt a reply.

Requests (``{"cmd": ..., ...}``) and what they do:

- ``start``: build ``vllm.LLM(**engine)``;
- ``generate``: ``prompts`` (token ids), ``seeds`` (one list per prompt, one seed per sample, or ``null``),
  ``params`` (temperature, top_p, max_tokens, stop), optional ``lora`` ``[name, id, path]``; returns for each
  prompt its completions ``[text, num_tokens, finish_reason]``;
- ``reload``: load new weights from a checkpoint directory into the running engine
  (``collective_rpc("hsstar_reload")``), then reset the prefix cache (without it, cached prefixes of the old
  weights come back as garbage);
- ``sleep`` / ``wake``: free and restore the engine's GPU memory while training runs;
- ``ping``; ``close``.

Every reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": "<traceback>"}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _sampling_params(params: dict, seed, n: int = 1):
    from vllm import SamplingParams

    fields = dict(
        n=n,
        temperature=float(params["temperature"]),
        top_p=float(params["top_p"]) if params["temperature"] > 0 else 1.0,
        top_k=params.get("top_k", -1),
        min_p=float(params.get("min_p", 0.0)),
        max_tokens=int(params["max_tokens"]),
        stop=params.get("stop") or None,
        seed=seed,
        skip_special_tokens=True,
        repetition_penalty=float(params.get("repetition_penalty", 1.0)),
    )
    fields.update(params.get("extra") or {})  # the user's generation_kwargs override the rest
    return SamplingParams(**fields)


def retie_word_embeddings(worker) -> bool:
    """Runs inside vLLM's worker after an in-place reload. With tied word embeddings the reload refills the input
    embedding but leaves the output head with the old weights (the checkpoint has no separate head), so the two
    are tied again here. Returns whether anything was tied."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    if not getattr(text_config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
        return False
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    embeddings = [
        m
        for m in model.modules()
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    ]
    if len(heads) != 1 or len(embeddings) != 1 or heads[0].weight.shape != embeddings[0].weight.shape:
        return False
    head = heads[0]
    if head.weight.data_ptr() != embeddings[0].weight.data_ptr():
        head.weight.data.copy_(embeddings[0].weight.data)
    # backends that prepare their own copy of the weight (vLLM's CPU build packs it for its GEMM) redo it
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
    return True


class WorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): the calls trl-hsstar makes with ``collective_rpc``.

    Only string arguments, so that the call also works through a server's ``POST /collective_rpc``.
    """

    def hsstar_reload(self, weights_path: str) -> dict:
        """Reload the weights in place from a checkpoint directory and re-tie tied word embeddings."""
        self.reload_weights(weights_path=weights_path)
        return {"retied": retie_word_embeddings(self)}


def _finish(output) -> list:
    reason = "length" if output.finish_reason == "length" else "stop"
    return [output.text, len(output.token_ids), reason]


class Engine:
    def __init__(self) -> None:
        self.llm = None

    def start(self, engine: dict) -> dict:
        import vllm

        engine.setdefault("worker_extension_cls", "hsstar_vllm.WorkerExtension")
        self.llm = vllm.LLM(**engine)
        return {"version": vllm.__version__}

    def generate(self, prompts: list, seeds, params: dict, lora=None) -> dict:
        from vllm.inputs import TokensPrompt

        requests, sampling, owners = [], [], []
        for i, ids in enumerate(prompts):
            for seed in seeds[i]:
                requests.append(TokensPrompt(prompt_token_ids=ids))
                sampling.append(_sampling_params(params, seed))
                owners.append(i)
        kwargs = {}
        if lora is not None:
            from vllm.lora.request import LoRARequest

            kwargs["lora_request"] = LoRARequest(lora[0], int(lora[1]), lora[2])
        results: list[list] = [[] for _ in prompts]
        if requests:
            outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False, **kwargs)
            for i, out in zip(owners, outputs):
                results[i].append(_finish(out.outputs[0]))
        return {"completions": results}

    def reload(self, path: str) -> dict:
        """Reload in place on every worker (tied embeddings tied again), then reset the prefix cache."""
        results = self.llm.collective_rpc("hsstar_reload", kwargs={"weights_path": path})
        self.llm.reset_prefix_cache()
        return {"retied": bool(results and results[0].get("retied"))}

    def sleep(self, level: int = 1) -> dict:
        self.llm.sleep(level=level)
        return {}

    def wake(self) -> dict:
        self.llm.wake_up()
        return {}


def main() -> None:  # pragma: no cover - runs in the engine process
    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # anything printed to stdout (Python or C) goes to stderr
    sys.stdout = sys.stderr
    engine = Engine()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "close":
            replies.write(json.dumps({"ok": True}) + "\n")
            break
        try:
            reply = {} if cmd == "ping" else getattr(engine, cmd)(**request)
            reply["ok"] = True
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
    replies.flush()
    os._exit(0)  # vLLM's engine threads must not keep the process alive


if __name__ == "__main__":
    main()
