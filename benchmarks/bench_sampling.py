"""Throughput of the sample-and-verify phase against a bare ``model.generate`` loop.

Target: ``TransformersSampler.generate`` plus ``MathVerifier().verify_batch`` on every completion runs at
>= 0.9x the throughput of a bare loop that tokenizes, generates and decodes the same expanded prompt list
(in its original order) at the same batch size and sampling settings.

Both sides sample the same distribution (temperature, top-p, top-k off) from the default-size toy model
of ``trl_hsstar.toy``, once per ``--pretrain-steps`` value: untrained (0: random characters, mostly cut
by ``--max-new-tokens``, which the verifier rejects at once) and briefly trained (real rationales that end
in EOS and are checked for real). Runs alternate baseline / candidate after one warm-up of each, and the
medians are reported.

    python benchmarks/bench_sampling.py                                   # the record, and the section printed
    python benchmarks/bench_sampling.py --output docs/benchmarks.md       # (re)write its section there
    python benchmarks/bench_sampling.py --report-only --output docs/benchmarks.md   # the section from the record

Every run writes its record (``--results``, default ``benchmarks/results/bench_sampling.json``); the section is
rendered from that record alone. Run it on an otherwise idle machine: the load average before and after is
reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench_methods import add_report_only, commit_line, publish, republish, script_meta

ROOT = Path(__file__).resolve().parents[1]
MARKS = ("<!-- bench_sampling:start -->", "<!-- bench_sampling:end -->")
RESULTS = "benchmarks/results/bench_sampling.json"

if TYPE_CHECKING:  # the measuring imports torch; the rendering does not
    from trl_hsstar.sampling import SamplingParams


def count_tokens(new_tokens, eos_id: int) -> int:
    """Generated tokens up to and including the first EOS of each row (the sampler's rule)."""
    import torch

    is_eos = new_tokens == eos_id
    has = is_eos.any(dim=1)
    first = is_eos.to(torch.int8).argmax(dim=1)
    return int(torch.where(has, first + 1, new_tokens.shape[1]).sum())


def run_baseline(model, tok, prompts: list[str], batch_size: int, params: SamplingParams, seed: int):
    """The bare loop: batches in input order, left padding, generate, decode. Returns (seconds, tokens)."""
    import torch

    torch.manual_seed(seed)
    tok.padding_side = "left"
    start = time.perf_counter()
    tokens = 0
    texts: list[str] = []
    with torch.no_grad():
        for b in range(0, len(prompts), batch_size):
            enc = tok(prompts[b : b + batch_size], return_tensors="pt", padding=True)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,
                max_new_tokens=params.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            tokens += count_tokens(new, tok.eos_token_id)
            texts += tok.batch_decode(new, skip_special_tokens=True)
    seconds = time.perf_counter() - start
    tok.padding_side = "right"
    assert len(texts) == len(prompts)
    return seconds, tokens


def run_candidate(sampler, verifier, problems, samples_per_prompt: int, params: SamplingParams, seed: int):
    """Sampler + verification of every completion. Returns (seconds, tokens, generate_s, verify_s, correct)."""
    from trl_hsstar.sampling import SamplingParams

    params = SamplingParams(
        temperature=params.temperature, top_p=params.top_p, max_new_tokens=params.max_new_tokens, seed=seed
    )
    start = time.perf_counter()
    results = sampler.generate([p.prompt for p in problems], [samples_per_prompt] * len(problems), params)
    generated = time.perf_counter()
    texts = [c.text for r in results for c in r]
    references = [str(p.answer) for p, r in zip(problems, results) for _ in r]
    verdicts = verifier.verify_batch(texts, references)
    end = time.perf_counter()
    tokens = sum(c.num_tokens for r in results for c in r)
    return end - start, tokens, generated - start, end - generated, sum(verdicts)


def measure(args, pretrain_steps: int) -> dict:
    """Time both sides on the toy model trained for ``pretrain_steps`` (0: untrained)."""
    from trl_hsstar.sampling import SamplingParams, TransformersSampler
    from trl_hsstar.toy import build_char_tokenizer, build_tiny_model, generate_problems
    from trl_hsstar.verify import MathVerifier

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=args.seed)
    if pretrain_steps:
        from trl_hsstar.toy.train import pretrain_reasoner

        pretrain_reasoner(model, tok, steps=pretrain_steps, seed=args.seed)
    model.eval()
    problems = generate_problems(args.num_prompts, operands=(2, 4), digits=1, seed=args.seed)
    flat_prompts = [p.prompt for p in problems for _ in range(args.samples_per_prompt)]
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens
    )
    sampler = TransformersSampler(model, tok, batch_size=args.batch_size, progress=False)
    verifier = MathVerifier()
    verifier("\\boxed{\\sqrt{4}}", "2")  # start the math-verify worker outside the timed runs

    # one warm-up of each side, then alternate
    run_baseline(model, tok, flat_prompts, args.batch_size, params, seed=args.seed)
    run_candidate(sampler, verifier, problems, args.samples_per_prompt, params, seed=args.seed)
    base_runs, cand_runs = [], []
    for r in range(args.repeats):
        seed = args.seed + 1 + r
        base_runs.append(run_baseline(model, tok, flat_prompts, args.batch_size, params, seed))
        cand_runs.append(run_candidate(sampler, verifier, problems, args.samples_per_prompt, params, seed))
        print(
            f"[pretrain {pretrain_steps}] run {r}: baseline {base_runs[-1][0]:.2f}s {base_runs[-1][1]} tok | "
            f"candidate {cand_runs[-1][0]:.2f}s {cand_runs[-1][1]} tok "
            f"(generate {cand_runs[-1][2]:.2f}s, verify {cand_runs[-1][3]:.3f}s, correct {cand_runs[-1][4]})",
            file=sys.stderr,
        )
    verifier.close()

    n = len(flat_prompts)
    med = statistics.median
    base = {"seconds": med(s for s, _ in base_runs), "samples_s": med(n / s for s, _ in base_runs)}
    base["tokens_s"] = med(t / s for s, t in base_runs)
    base["tokens_per_sample"] = statistics.mean(t for _, t in base_runs) / n
    base["best_samples_s"] = max(n / s for s, _ in base_runs)
    base["spread"] = (min(s for s, _ in base_runs), max(s for s, _ in base_runs))
    cand = {"seconds": med(c[0] for c in cand_runs), "samples_s": med(n / c[0] for c in cand_runs)}
    cand["tokens_s"] = med(c[1] / c[0] for c in cand_runs)
    cand["tokens_per_sample"] = statistics.mean(c[1] for c in cand_runs) / n
    cand["best_samples_s"] = max(n / c[0] for c in cand_runs)
    cand["spread"] = (min(c[0] for c in cand_runs), max(c[0] for c in cand_runs))
    return {
        "pretrain_steps": pretrain_steps,
        "num_params": sum(p.numel() for p in model.parameters()),
        "baseline": base,
        "candidate": cand,
        "generate_s": med(c[2] for c in cand_runs),
        "verify_s": med(c[3] for c in cand_runs),
        "correct": statistics.mean(c[4] for c in cand_runs) / n,
        "ratio_samples": cand["samples_s"] / base["samples_s"],
        "ratio_tokens": cand["tokens_s"] / base["tokens_s"],
    }


def table(result: dict) -> str:
    base, cand = result["baseline"], result["candidate"]
    steps = result["pretrain_steps"]
    title = (
        f"Toy model trained for {steps} steps (`pretrain_reasoner`): real rationales ending in EOS"
        if steps
        else "Untrained toy model: random characters, ended by a chance EOS or by `max_new_tokens`"
    )
    return f"""**{title}**

| | baseline: bare generate loop | candidate: sampler + verify | candidate / baseline |
|---|---:|---:|---:|
| samples/s | {base["samples_s"]:.1f} | {cand["samples_s"]:.1f} | **{result["ratio_samples"]:.2f}x** |
| completion tokens/s | {base["tokens_s"]:.0f} | {cand["tokens_s"]:.0f} | **{result["ratio_tokens"]:.2f}x** |
| tokens per sample | {base["tokens_per_sample"]:.1f} | {cand["tokens_per_sample"]:.1f} | |
| samples/s, best run | {base["best_samples_s"]:.1f} | {cand["best_samples_s"]:.1f} | {cand["best_samples_s"] / base["best_samples_s"]:.2f}x |
| seconds per run (min - max) | {base["seconds"]:.2f} ({base["spread"][0]:.2f} - {base["spread"][1]:.2f}) | {cand["seconds"]:.2f} ({cand["spread"][0]:.2f} - {cand["spread"][1]:.2f}) | |

Candidate breakdown (medians): generate {result["generate_s"]:.2f} s, verify {result["verify_s"] * 1000:.1f} ms;
{result["correct"]:.1%} of completions correct.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side, alternating")
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        nargs="+",
        default=[0, 300],
        help="one measurement per value: the toy model trained for that many steps first (0: untrained)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="markdown file whose section to (re)write")
    parser.add_argument("--results", default=str(ROOT / RESULTS))
    add_report_only(parser)
    args = parser.parse_args(argv)
    output = None if args.output is None else str(args.output)
    if args.report_only:
        republish(render, results=args.results, output=output, marks=MARKS)
        return 0

    import transformers

    started = time.monotonic()
    load_before = os.getloadavg()
    results = [measure(args, steps) for steps in args.pretrain_steps]
    load_after = os.getloadavg()
    meta = script_meta(
        "bench_sampling.py",
        argv,
        started,
        load_before=load_before[:2],
        load_after=load_after[:2],
        transformers=transformers.__version__,
        python=platform.python_version(),
    )
    settings = {
        k: getattr(args, k)
        for k in (
            "num_prompts",
            "samples_per_prompt",
            "batch_size",
            "max_new_tokens",
            "temperature",
            "top_p",
            "repeats",
            "pretrain_steps",
            "seed",
        )
    }
    record = {"meta": meta, "settings": settings, "results": results}
    publish(render, record, results=args.results, output=output, marks=MARKS)
    return 0


def render(record: dict) -> str:
    """The docs section, from the record alone."""
    meta, args, results = record["meta"], argparse.Namespace(**record["settings"]), record["results"]
    load_before, load_after = meta["load_before"], meta["load_after"]
    n = args.num_prompts * args.samples_per_prompt
    tables = "\n".join(table(r) for r in results)
    return f"""{MARKS[0]}
## Sampling throughput (`benchmarks/bench_sampling.py`)

Target: the whole sample-and-verify phase (`TransformersSampler.generate`, then
`MathVerifier().verify_batch` on every completion) at >= 0.9x the throughput of a bare
`model.generate` loop over the same expanded prompts (input order, left padding, decode) at the same
batch size and sampling settings.

```bash
{meta["command"]}
```

{commit_line(meta)}

Setup: the default toy Llama ({results[0]["num_params"] / 1e6:.2f}M parameters, float32);
{args.num_prompts} toy prompts (2 to 4 one-digit operands) x {args.samples_per_prompt} samples = {n}
samples per run, batch size {args.batch_size}, temperature {args.temperature}, top-p {args.top_p}
(top-k off on both sides), `max_new_tokens={args.max_new_tokens}`; {args.repeats} timed runs per side,
alternating, after one warm-up each; medians. Tokens are counted up to and including the first EOS on
both sides.

{tables}
Environment: {meta["machine"]}, `torch.get_num_threads()` = {meta["threads"]}; load average
(1 / 5 min) {load_before[0]:.2f} / {load_before[1]:.2f} before, {load_after[0]:.2f} / {load_after[1]:.2f}
after; torch {meta["torch"]}, transformers {meta["transformers"]}, Python {meta["python"]}.
{MARKS[1]}"""


if __name__ == "__main__":
    sys.exit(main())
