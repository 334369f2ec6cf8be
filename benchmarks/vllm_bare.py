"""The baseline of ``bench_vllm.py``: a bare ``vllm.LLM.generate`` on a request file, timed inside its process.

Runs under the interpreter that has vLLM (standard library + vLLM only):

    python benchmarks/vllm_bare.py REQUEST.json

``REQUEST.json`` holds ``{"engine": {...LLM kwargs}, "prompts": [[token ids]...], "seeds": [[seed per sample]...],
"params": {temperature, top_p, max_tokens, stop}}``. After the engine is built it prints ``ready``; then each
line ``go`` on stdin runs one ``LLM.generate`` over every sample (one ``SamplingParams`` with its own seed per
sample, the prompt as token ids) and prints ``{"seconds": ..., "tokens": ..., "samples": ...}``; ``quit`` ends.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    with open(sys.argv[1]) as f:
        request = json.load(f)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's own printing goes to stderr
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**request["engine"])
    fields = request["params"]
    prompts, sampling = [], []
    for ids, seeds in zip(request["prompts"], request["seeds"]):
        for seed in seeds:
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            sampling.append(
                SamplingParams(
                    n=1,
                    temperature=fields["temperature"],
                    top_p=fields["top_p"],
                    max_tokens=fields["max_tokens"],
                    stop=fields["stop"] or None,
                    seed=seed,
                    skip_special_tokens=True,
                )
            )
    out.write("ready\n")
    for line in sys.stdin:
        if line.strip() != "go":
            break
        start = time.perf_counter()
        outputs = llm.generate(prompts, sampling_params=sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        out.write(json.dumps({"seconds": seconds, "tokens": tokens, "samples": len(outputs)}) + "\n")
    out.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
