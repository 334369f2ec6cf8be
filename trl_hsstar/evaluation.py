"""``hsstar eval``: greedy accuracy, avg@k, unbiased pass@k and maj@k of a model on a problem set.

The problems come from anything ``datasets`` loads (a local ``.json``/``.jsonl``/``.parquet`` file or a Hub id),
with the question and answer columns configurable; GSM8K's ``#### n`` answers are read by the verifier. Generation
goes through the same samplers as training (transformers ``generate``, or vLLM), and answers through the same
verifier. The metrics, per problem with ``n = k`` samples of which ``c`` are correct:

- greedy: one sample at temperature 0, right or wrong;
- avg@k: ``c / n``;
- pass@j (j = 1, 2, 4, ... up to k): the unbiased estimate ``1 - C(n - c, j) / C(n, j)`` (Chen et al., 2021);
- maj@k: the most frequent extracted answer among the k samples is right.

Each is averaged over problems, and over the problems of each group when ``group_by`` names a column. Results:
``eval_rows.jsonl`` (one row per problem: its samples, answers and verdicts) and ``eval_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import make_problems
from .records import Problem
from .sampling import Sampler, SamplingParams
from .verify import MathVerifier, extract_answer, resolve_last_number_fallback

__all__ = ["evaluate", "evaluate_held_out", "load_problems", "main", "markdown_table", "pass_at_k", "save"]

BOXED_SYSTEM_PROMPT = "Solve the problem step by step. Put the final answer in \\boxed{}."


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (``k <= n``)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _pass_ks(k: int) -> list[int]:
    ks = [2**i for i in range(k.bit_length()) if 2**i <= k]
    return ks if ks[-1] == k else [*ks, k]


def load_problems(
    dataset: str,
    *,
    split: str = "test",
    question_column: str = "question",
    answer_column: str = "answer",
    limit: int | None = None,
    chat: bool = False,
    system_prompt: str | None = None,
    tokenizer: Any = None,
    chat_template_kwargs: dict | None = None,
) -> list[Problem]:
    """The problems of ``dataset``, their prompts rendered for generation (the tokenizer's chat template with
    ``chat``)."""
    from datasets import load_dataset

    suffix = Path(dataset).suffix
    if suffix in (".json", ".jsonl", ".parquet"):
        data = load_dataset("parquet" if suffix == ".parquet" else "json", data_files=dataset, split="train")
    else:
        data = load_dataset(dataset, split=split)
    for column in (question_column, answer_column):
        if column not in data.column_names:
            raise ValueError(
                f"{dataset} has no column {column!r} (it has {data.column_names}): set `--question-column` and "
                "`--answer-column`."
            )
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    rows = []
    for i, row in enumerate(data):
        question = str(row[question_column])
        if chat:
            prompt: Any = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": question}
            ]
        else:
            prompt = question if not system_prompt else f"{system_prompt}\n\n{question}"
        columns = {k: v for k, v in row.items() if k not in (question_column, answer_column)}
        pid = str(row["id"]) if "id" in row else str(i)
        rows.append(
            {"problem_id": pid, "prompt": prompt, "answer": str(row[answer_column]), "columns": columns}
        )
    return make_problems(rows, tokenizer, chat_template_kwargs)


def evaluate(
    problems: Sequence[Problem],
    sampler: Sampler,
    verifier=None,
    *,
    k: int = 8,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    seed: int = 0,
    group_by: str | None = None,
    params: SamplingParams | None = None,
) -> tuple[list[dict], dict]:
    """Greedy and k sampled completions per problem, checked; returns ``(rows, summary)`` (see the module doc).
    ``params`` (how the k samples are drawn) replaces ``temperature``, ``top_p``, ``max_new_tokens`` and ``seed``."""
    params = params or SamplingParams(temperature, top_p, max_new_tokens, seed)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"`k` must be a non-negative integer (0: greedy only), got {k!r}.")
    own = verifier is None
    verifier = verifier or MathVerifier()
    extract = getattr(verifier, "extract", extract_answer)
    texts = [p.prompt_text for p in problems]
    started = time.monotonic()
    try:
        greedy = sampler.generate(
            texts, [1] * len(texts), SamplingParams(0.0, 1.0, params.max_new_tokens, params.seed)
        )
        sampled = sampler.generate(texts, [k] * len(texts), params) if k else [[] for _ in texts]
        answers = [p.answer for p in problems]
        flat = [c.text for g in greedy for c in g] + [c.text for s in sampled for c in s]
        refs = answers + [a for a in answers for _ in range(k)]
        verdicts = (
            verifier.verify_batch(flat, refs)
            if hasattr(verifier, "verify_batch")
            else [verifier(c, r) for c, r in zip(flat, refs)]
        )
    finally:
        if own:
            verifier.close()
    rows = []
    for i, problem in enumerate(problems):
        mine = verdicts[len(problems) + i * k : len(problems) + (i + 1) * k]
        samples = [
            {
                "completion": c.text,
                "answer": extract(c.text),
                "correct": bool(v),
                "finish_reason": c.finish_reason,
            }
            for c, v in zip(sampled[i], mine)
        ]
        row = {
            "problem_id": problem.problem_id,
            "reference": problem.answer,
            "group": None if group_by is None else str(problem.columns.get(group_by)),
            "greedy": {
                "completion": greedy[i][0].text,
                "answer": extract(greedy[i][0].text),
                "correct": bool(verdicts[i]),
            },
            "samples": samples,
        }
        if k:
            c = sum(s["correct"] for s in samples)
            row[f"avg@{k}"] = c / k
            row.update({f"pass@{j}": pass_at_k(k, c, j) for j in _pass_ks(k)})
            votes = Counter(s["answer"] for s in samples if s["answer"] is not None)
            top = votes.most_common(1)[0][0] if votes else None
            row[f"maj@{k}"] = float(
                any(s["correct"] for s in samples if top is not None and s["answer"] == top)
            )
        rows.append(row)
    summary = {
        **_means(rows, k),
        "num_problems": len(rows),
        "k": k,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_new_tokens": params.max_new_tokens,
        "seed": params.seed,
        "no_answer_share": _mean(
            [float(r["greedy"]["answer"] is None) for r in rows]
            + [float(s["answer"] is None) for r in rows for s in r["samples"]]
        ),
        "seconds": round(time.monotonic() - started, 1),
    }
    if group_by is not None:
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(row["group"], []).append(row)
        summary["by_group"] = {
            g: {**_means(rs, k), "num_problems": len(rs)} for g, rs in sorted(groups.items())
        }
    return rows, summary


def evaluate_held_out(problems, sampler, verifier, args, output_dir: str, *, on_main: bool) -> dict | None:
    """A trainer's held-out evaluation: greedy and ``args.eval_num_samples`` samples drawn as the run samples,
    on the main process (``None`` elsewhere); rows and summary saved in ``output_dir``."""
    summary = None
    if hasattr(sampler, "progress"):  # here the sampler's bar is the only one
        sampler.progress = not args.disable_tqdm
    if on_main:
        rows, summary = evaluate(
            problems, sampler, verifier, k=args.eval_num_samples, params=args.sampling_params(seed=args.seed)
        )
        save(rows, summary, output_dir)
    if hasattr(sampler, "progress"):
        sampler.progress = False
    return summary


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _means(rows: list[dict], k: int) -> dict[str, float | None]:
    out = {"greedy": _mean([float(r["greedy"]["correct"]) for r in rows])}
    if k:
        for key in (f"avg@{k}", *(f"pass@{j}" for j in _pass_ks(k)), f"maj@{k}"):
            out[key] = _mean([r[key] for r in rows])
    return out


def save(rows: list[dict], summary: dict, output_dir: str | os.PathLike) -> Path:
    """Write ``eval_rows.jsonl`` and ``eval_summary.json`` into ``output_dir`` (each atomically); return it."""
    from .artifacts import atomic_write_text

    out = Path(output_dir)
    atomic_write_text(
        out / "eval_rows.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    atomic_write_text(out / "eval_summary.json", json.dumps(summary, indent=2) + "\n")
    return out


def markdown_table(summary: dict) -> str:
    """The summary as a Markdown table: one row for all problems, one per group."""
    keys = [key for key in summary if key == "greedy" or "@" in key]
    lines = ["| problems | n | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]

    def line(name: str, stats: dict) -> str:
        cells = " | ".join("" if stats.get(key) is None else f"{stats[key]:.3f}" for key in keys)
        return f"| {name} | {stats['num_problems']} | {cells} |"

    lines.append(line("all", summary))
    for group, stats in (summary.get("by_group") or {}).items():
        lines.append(line(group, stats))
    return "\n".join(lines)


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="hsstar eval", description=__doc__)
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True, help="a model directory or Hub id, or a .gguf file")
    parser.add_argument(
        "--adapter", default=None, help="a LoRA adapter directory to apply (e.g. iteration-2/model)"
    )
    parser.add_argument("--dataset", required=True, help="a .json/.jsonl/.parquet file or a Hub dataset id")
    parser.add_argument("--split", default="test", help="the split of a Hub dataset (default: test)")
    parser.add_argument("--question-column", default="question")
    parser.add_argument(
        "--answer-column", default="answer", help="reference answers (GSM8K's '#### n' is read)"
    )
    parser.add_argument("--group-by", default=None, help="a column to break the figures down by (e.g. level)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    parser.add_argument(
        "--k", type=int, default=8, help="samples per problem for avg@k, pass@k, maj@k (0: none)"
    )
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0, help="top-k filtering of the k samples (0: off)")
    parser.add_argument("--min-p", type=float, default=None, help="min-p filtering of the k samples")
    parser.add_argument(
        "--chat-template-kwargs",
        type=json.loads,
        default=None,
        help="apply_chat_template arguments as JSON, e.g. '{\"enable_thinking\": false}' for Qwen3",
    )
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="sequences per generate call (transformers)"
    )
    parser.add_argument(
        "--chat",
        choices=["auto", "yes", "no"],
        default="auto",
        help="render prompts with the tokenizer's chat template (auto: when it has one)",
    )
    parser.add_argument(
        "--system-prompt",
        default=BOXED_SYSTEM_PROMPT,
        help="the system turn (chat) or the text before each question; '' for none",
    )
    parser.add_argument(
        "--last-number-fallback",
        choices=["auto", "yes", "no"],
        default="auto",
        help="without \\boxed{} or '#### n', the last number is the answer (auto: on for chat prompts)",
    )
    parser.add_argument(
        "--use-vllm", action="store_true", help="generate with vLLM (an engine in a child process)"
    )
    parser.add_argument("--vllm-python", default=None, help="the interpreter with vLLM (default: this one)")
    parser.add_argument(
        "--output-dir", default="runs/eval", help="where eval_rows.jsonl and eval_summary.json go"
    )
    return parser


def main(args: argparse.Namespace) -> dict:
    """Run ``hsstar eval`` from parsed arguments; returns the summary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import resolve_model

    model_path, _ = resolve_model(args.model, {})
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    chat = args.chat == "yes" or (args.chat == "auto" and bool(getattr(tokenizer, "chat_template", None)))
    problems = load_problems(
        args.dataset,
        split=args.split,
        question_column=args.question_column,
        answer_column=args.answer_column,
        limit=args.limit,
        chat=chat,
        system_prompt=args.system_prompt or None,
        tokenizer=tokenizer,
        chat_template_kwargs=args.chat_template_kwargs,
    )
    if args.use_vllm:
        from .sampling.engine import cpu_engine_env
        from .sampling.vllm_sampler import VLLMSampler

        sampler = VLLMSampler(
            model_path,
            tokenizer,
            python=args.vllm_python,
            engine_kwargs={"seed": args.seed},
            env=cpu_engine_env(),
        )
    else:
        from .sampling import TransformersSampler

        model = AutoModelForCausalLM.from_pretrained(model_path)
        if args.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.adapter)
        sampler = TransformersSampler(model, tokenizer, batch_size=args.batch_size)
    fallback = resolve_last_number_fallback({"yes": True, "no": False}.get(args.last_number_fallback), chat)
    with sampler, MathVerifier(last_number_fallback=fallback) as verifier:
        rows, summary = evaluate(
            problems,
            sampler,
            verifier,
            k=args.k,
            group_by=args.group_by,
            params=SamplingParams(
                args.temperature,
                args.top_p,
                args.max_new_tokens,
                args.seed,
                top_k=args.top_k,
                min_p=args.min_p,
            ),
        )
    summary.update(
        model=args.model,
        adapter=args.adapter,
        dataset=args.dataset,
        chat=chat,
        last_number_fallback=fallback,
        command=" ".join(["hsstar", "eval", *sys.argv[2:]]) if sys.argv[1:2] == ["eval"] else None,
    )
    out = save(rows, summary, args.output_dir)
    print(markdown_table(summary))
    print(
        f"\n{len(rows)} problems in {summary['seconds']} s; rows: {out / 'eval_rows.jsonl'}, summary: "
        f"{out / 'eval_summary.json'}",
        flush=True,
    )
    if summary["no_answer_share"] and summary["no_answer_share"] > 0.5:
        print(
            f"warning: {summary['no_answer_share']:.0%} of the completions hold no answer the verifier can read; "
            "ask for \\boxed{} in --system-prompt or use --last-number-fallback yes.",
            file=sys.stderr,
        )
    return summary


if __name__ == "__main__":  # pragma: no cover
    main(make_parser().parse_args())
