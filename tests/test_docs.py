"""The README's and the docs' examples run and print what they say they print; the docs site builds."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"
BLOCK = re.compile(
    r"(?:<!-- docs-test: skip(?: \((?P<reason>[^)]*)\))? -->\n)?```python\n(?P<code>.*?)```", re.DOTALL
)
SLOW_PAGES = {
    "trainer.md",
    "verification.md",
    "grpo.md",
}  # trained iterations or epochs; a 5 s verifier bound


def _blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(line, code, skip reason or None) of each Python block of a page; a skip marker without a reason is ""."""
    text = page.read_text()
    return [
        (
            text[: m.start("code")].count("\n"),
            m.group("code"),
            m.group("reason") if "docs-test" in m.group(0) else None,
        )
        for m in BLOCK.finditer(text)
    ]


def _pages() -> list:
    pages = [p for p in sorted(DOCS.glob("*.md")) if any(skip is None for _, _, skip in _blocks(p))]
    return [pytest.param(p.name, marks=pytest.mark.slow) if p.name in SLOW_PAGES else p.name for p in pages]


def test_readme_python_examples_run_as_written(world_cache, tmp_path, monkeypatch):
    # the trainer example loads the toy reasoner: anything it builds goes to the session's cache
    monkeypatch.setenv("TRL_HSSTAR_CACHE", str(world_cache))
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2, "the README lost its runnable examples"
    for code in blocks:
        expected = [line.split("# ", 1)[1] for line in code.splitlines() if line.startswith("# ")]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), {})
        if expected:
            assert out.getvalue().strip().splitlines() == expected
    assert (tmp_path / "runs" / "readme" / "iteration-1" / "DONE").exists()


def test_every_test_named_in_reliability_md_exists():
    """docs/reliability.md lists each guarantee beside its test: every test it names must exist."""
    text = (README.parent / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"(tests/test_\w+\.py)::(test_\w+)", text))
    named |= {("tests/test_bad_input.py", name) for name in re.findall(r"`(test_\w+)[\[`]", text)}
    assert len(named) >= 30
    for path, name in sorted(named):
        source = (README.parent / path).read_text()
        assert f"def {name}(" in source, f"docs/reliability.md names {path}::{name}, which does not exist"


@pytest.mark.parametrize("page", _pages())
def test_the_python_examples_of_each_docs_page_run_as_written(page, world_cache, tmp_path, monkeypatch):
    """A page's blocks run in order in one namespace (a later block may use an earlier one's names); each
    ``print(...)  # prints X`` prints X."""
    monkeypatch.setenv("TRL_HSSTAR_CACHE", str(world_cache))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for line, code, skip in _blocks(DOCS / page):
        if skip is not None:
            continue
        expected = [text.split("# prints ", 1)[1] for text in code.splitlines() if "# prints " in text]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{DOCS / page}:{line}", "exec"), namespace)
        printed = out.getvalue().strip().splitlines()
        assert [p for p in printed if p in expected] == expected, f"docs/{page}:{line} printed {printed}"


def test_every_docs_example_runs_or_says_why_not():
    """Every Python block of the docs is run by the test above, unless a marker before it gives the reason."""
    blocks = {p.name: _blocks(p) for p in sorted(DOCS.glob("*.md"))}
    total = sum(len(b) for b in blocks.values())
    skipped = [(page, line, skip) for page, b in blocks.items() for line, _, skip in b if skip is not None]
    assert total >= 15, "the docs lost their examples"
    assert all(reason.strip() for _, _, reason in skipped), f"a skip marker without its reason: {skipped}"
    assert len(skipped) <= 2, f"more examples skipped than the two that need vLLM or a download: {skipped}"


@pytest.mark.slow
def test_the_docs_site_builds_strict(tmp_path):
    """mkdocs with the generated API and configuration references: a broken link, anchor or docstring fails."""
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=README.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    for name in ("sampling_budget", "num_presamples", "reward_thresholds", "vllm_request_timeout"):
        assert f"<code>{name}</code>" in config, f"the configuration reference lacks {name}"
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "estimate_difficulty" in api and "HSStarTrainer" in api
