"""The Hub: what an HS-STaR run uploads (one model folder and its card, never caches or partial folders).

The trainer pushes the model of the last finished iteration at most once per iteration end (``push_to_hub=True``;
with ``hub_strategy="end"`` only after the last one). The card names HS-STaR and the paper, the base model, the
reward source and each iteration's figures.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CITATION", "model_card", "upload_files"]

CITATION = """\
@inproceedings{xiong-etal-2025-hs,
  title     = {{HS}-{ST}a{R}: Hierarchical Sampling for Self-Taught Reasoners via Difficulty Estimation and Budget
               Reallocation},
  author    = {Xiong, Feng and Xu, Hongling and Wang, Yifei and Cheng, Runxi and Wang, Yong and Chu, Xiangxiang},
  booktitle = {Proceedings of the 2025 Conference on Empirical Methods in Natural Language Processing},
  year      = {2025},
  pages     = {5539--5555},
  url       = {https://aclanthology.org/2025.emnlp-main.282/}
}"""

# written by the stack while saving or training, never part of a model on the Hub
_NEVER = (".cache", ".partial", "checkpoint-", "pass", "runs")


def upload_files(folder: str | os.PathLike) -> list[str]:
    """The files of ``folder`` that a push uploads (relative paths, sorted): a model folder without the caches,
    half-written folders and checkpoints the stack leaves beside it."""
    root = Path(folder)
    out = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(_NEVER) or ".partial" in part for part in rel.parts):
            out.append(rel.as_posix())
    return sorted(out)


def model_card(
    *,
    repo_id: str | None,
    base_model: str | None,
    objective: str,
    reward_source: str | None,
    iteration_stats: list[dict],
    allocation: str,
    adapter: bool,
) -> str:
    """The README.md of a pushed HS-STaR model: metadata, the method, the reward source, each iteration's figures."""
    trainer = "SFT" if objective == "sft" else "DPO"
    header = ["---"]
    if base_model:
        header.append(f"base_model: {base_model}")
    header += [
        f"library_name: {'peft' if adapter else 'transformers'}",
        "tags:",
        "- trl",
        "- trl-hsstar",
        "- hs-star",
        f"- {objective}",
        "---",
        "",
    ]
    name = repo_id or "this model"
    body = [
        f"# {name}",
        "",
        f"Fine-tuned{' from [' + base_model + '](https://huggingface.co/' + base_model + ')' if base_model else ''} "
        f"with **HS-STaR** (hierarchical sampling for self-taught reasoners, "
        f"[arXiv 2505.19866](https://arxiv.org/abs/2505.19866)) using trl-hsstar: each iteration the model samples "
        "its own solutions, each problem's difficulty is estimated from answer accuracy and a reward score, the "
        f"sampling budget moves to the boundary problems, and TRL's {trainer}Trainer trains on what that yields "
        f"({'an adapter' if adapter else 'full weights'}).",
        "",
        f"- Objective: {trainer}",
        f"- Budget allocation: {allocation}",
        f"- Reward source: {reward_source or 'none (difficulty from answer accuracy only)'}",
        "",
        "## Iterations",
        "",
        "| iteration | levels (easy/boundary/hard) | budget spent/planned | rows | sample accuracy | held-out greedy |",
        "|---|---|---|---|---|---|",
    ]
    for s in iteration_stats:
        lv = s.get("levels", {})
        ev = (s.get("eval") or {}).get("greedy")
        body.append(
            f"| {s.get('iteration')} | {lv.get('easy', 0)}/{lv.get('boundary', 0)}/{lv.get('hard', 0)} | "
            f"{s.get('budget_spent')}/{s.get('budget_planned')} | {s.get('rows')} | "
            f"{s.get('sample_accuracy', float('nan')):.3f} | {'-' if ev is None else f'{ev:.3f}'} |"
        )
    body += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(header + body)
