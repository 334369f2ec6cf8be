"""Tables and plots of a run on the embedded world (what ``hsstar demo`` prints and draws).

The tables are plain text / Markdown. The plots need matplotlib (in the ``dev`` and ``demo`` extras); without it
:func:`plot_run` returns ``None`` and says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .world import LEVELS

__all__ = ["comparison_table", "plot_comparison", "plot_run", "run_markdown_table"]

logger = logging.getLogger(__name__)


def run_markdown_table(result: Mapping[str, Any]) -> str:
    """One run as a Markdown table: per iteration the level counts, budget planned and spent, rows kept and the
    held-out accuracy per level after the iteration (the first row is M_0)."""
    levels = [lv for lv in LEVELS if lv in result["initial"]]
    head = ["iteration", "easy", "boundary", "hard", "budget spent/planned", "rows", *levels, "all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def accuracy(table):
        return [f"{table[lv]:.2f}" for lv in levels] + [f"**{table['all']:.3f}**"]

    lines.append("| M_0 | | | | | | " + " | ".join(accuracy(result["initial"])) + " |")
    for it in result["iterations"]:
        lv = it["levels"]
        cells = [
            str(it["iteration"]),
            str(lv.get("easy", 0)),
            str(lv.get("boundary", 0)),
            str(lv.get("hard", 0)),
            f"{it['budget_spent']}/{it['budget_planned']}",
            str(it["rows"]),
            *accuracy(it["held_out"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Runs of several methods side by side: held-out accuracy (all levels) and rows per iteration, and the first
    method's difference from each other one."""
    methods = list(results)
    first = results[methods[0]]
    head = [
        "after iteration",
        *methods,
        *(f"{methods[0]} - {m}" for m in methods[1:]),
        *(f"rows, {m}" for m in methods),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def accuracy(result, i):
        return result["initial"]["all"] if i == 0 else result["iterations"][i - 1]["held_out"]["all"]

    for i in range(len(first["iterations"]) + 1):
        cells = ["M_0" if i == 0 else str(i)]
        cells += [f"{accuracy(results[m], i):.3f}" for m in methods]
        cells += [f"{accuracy(first, i) - accuracy(results[m], i):+.3f}" for m in methods[1:]]
        cells += ["" if i == 0 else str(results[m]["iterations"][i - 1]["rows"]) for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'trl-hsstar[demo]').")
        return None
    return plt


def plot_run(result: Mapping[str, Any], output_dir: str | Path) -> list[Path] | None:
    """``levels.png`` (difficulty distribution and samples spent per world level, per iteration) and
    ``accuracy.png`` (held-out accuracy per level, per iteration) for one run."""
    plt = _pyplot()
    if plt is None:
        return None
    output_dir = Path(output_dir)
    iterations = result["iterations"]
    world = [lv for lv in LEVELS if any(lv in it["samples_by_world_level"] for it in iterations)]
    n = len(iterations)
    fig, axes = plt.subplots(2, n, figsize=(4 * n, 6.5), squeeze=False, sharey="row")
    colors = {"easy": "#4daf4a", "boundary": "#ff7f00", "hard": "#e41a1c"}
    for j, it in enumerate(iterations):
        ax = axes[0][j]
        bottom = [0] * len(world)
        for level in ("easy", "boundary", "hard"):
            counts = [it["levels_by_world_level"].get(w, {}).get(level, 0) for w in world]
            ax.bar(world, counts, bottom=bottom, color=colors[level], label=level)
            bottom = [b + c for b, c in zip(bottom, counts)]
        ax.set_title(f"iteration {it['iteration']}: estimated level")
        ax.tick_params(axis="x", labelrotation=45)
        axes[1][j].bar(world, [it["samples_by_world_level"].get(w, 0) for w in world], color="#377eb8")
        axes[1][j].set_title(f"iteration {it['iteration']}: samples spent")
        axes[1][j].tick_params(axis="x", labelrotation=45)
    axes[0][0].set_ylabel("problems")
    axes[1][0].set_ylabel("samples")
    axes[0][-1].legend()
    fig.tight_layout()
    levels_png = output_dir / "levels.png"
    fig.savefig(levels_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tables = [result["initial"], *(it["held_out"] for it in iterations)]
    xs = list(range(len(tables)))
    for lv in [lv for lv in LEVELS if lv in result["initial"]]:
        ax.plot(xs, [t[lv] for t in tables], marker="o", label=lv)
    ax.plot(xs, [t["all"] for t in tables], marker="s", color="black", linewidth=2.5, label="all")
    ax.set_xticks(xs, ["M_0", *(str(it["iteration"] + 1) for it in iterations)])
    ax.set_xlabel("after iteration")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(ncol=2, fontsize="small")
    fig.tight_layout()
    accuracy_png = output_dir / "accuracy.png"
    fig.savefig(accuracy_png, dpi=100)
    plt.close(fig)
    return [levels_png, accuracy_png]


def plot_comparison(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path | None:
    """Held-out accuracy (all levels) per iteration, one line per method."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, result in results.items():
        ys = [result["initial"]["all"], *(it["held_out"]["all"] for it in result["iterations"])]
        ax.plot(range(len(ys)), ys, marker="o", label=method)
    ax.set_xticks(range(len(ys)), ["M_0", *(str(i) for i in range(1, len(ys)))])
    ax.set_xlabel("after iteration")
    ax.set_ylabel("held-out greedy accuracy (all levels)")
    ax.set_title("same M_0, same problems, same sampling budget (one seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
