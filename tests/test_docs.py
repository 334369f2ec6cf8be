"""The README's examples run and print what they say they print."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run_as_written(reasoner_dir, tmp_path, monkeypatch):
    # the trainer example builds the toy reasoner: reuse the session's (a cold build, never a developer's cache)
    monkeypatch.setenv("TRL_HSSTAR_CACHE", str(Path(reasoner_dir).parent))
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
