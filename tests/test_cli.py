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


def test_vllm_serve_hands_unknown_arguments_to_the_server(monkeypatch, capsys):
    """`hsstar vllm-serve` starts the server of `launch_vllm_server` (the vLLM tests run that one for real) with
    our options, and passes every option it does not know to vLLM."""
    import subprocess as sp

    from trl_hsstar.sampling import vllm_server

    seen = {}

    class Exited:  # a launched server whose process has already ended, as `launch_vllm_server` returns it
        url, log_path = "http://127.0.0.1:8123", "server.log"

        def __init__(self):
            self.process = sp.Popen([sys.executable, "-c", "pass"])
            self.process.wait()

        def close(self):
            seen["closed"] = True

    def launch(model, **kwargs):
        seen.update(model=model, **kwargs)
        return Exited()

    monkeypatch.setattr(vllm_server, "launch_vllm_server", launch)
    argv = ["vllm-serve", "--model", "m", "--port", "8123", "--tensor-parallel-size", "2", "--enable-lora"]
    assert main(argv) == 0
    assert seen["model"] == "m" and seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    assert seen["args"] == ["--tensor-parallel-size", "2", "--enable-lora"] and seen["closed"]
    assert "vllm_server_base_url: http://127.0.0.1:8123" in capsys.readouterr().out


def test_eval_help_documents_the_command(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["eval", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--model",
        "--dataset",
        "--k",
        "--group-by",
        "--use-vllm",
        "--chat-template-kwargs",
        "--output-dir",
    ):
        assert flag in out
