"""The `hsstar` console script."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from trl_hsstar import __version__
from trl_hsstar.cli import main


def test_help_without_a_command(capsys):
    assert main([]) == 0
    assert "usage: hsstar" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_world_prints_reference_rationales(capsys):
    assert main(["world", "--num-problems", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("The answer is \\boxed{") == 2
    assert "step labels: [True" in out and "False" not in out


def test_console_script_is_installed():
    exe = shutil.which("hsstar") or shutil.which(
        "hsstar", path=str(__import__("pathlib").Path(sys.executable).parent)
    )
    assert exe, "the `hsstar` console script is not installed; run `pip install -e .`"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "usage: hsstar" in out.stdout
