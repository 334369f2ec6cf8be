"""The README's examples run and print what they say they print."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


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
