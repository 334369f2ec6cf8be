"""Safe defaults: no remote code unless asked, safetensors only, nothing unpickled, servers on loopback.

Each test fails if its guarantee breaks: the loaders are run on real directories (a tiny model saved as a
pickle-based ``pytorch_model.bin``, a config whose ``auto_map`` points at code that leaves a sentinel file), the
source scans are checked against snippets that must trip them, and the verifier's worker is inspected through
``/proc``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers.dynamic_module_utils as dynamic_module_utils
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from trl_hsstar.config import _VLLM_FIELDS, HSStarArguments, HSStarConfig, HSStarDPOConfig
from trl_hsstar.recipe import main as recipe_main
from trl_hsstar.recipe import parse
from trl_hsstar.rewards import ProcessRewardModel
from trl_hsstar.scoring import load_reward_model as _load_reward_model
from trl_hsstar.toy import build_char_tokenizer, build_tiny_model
from trl_hsstar.verify import MathVerifier

PACKAGE = Path(__file__).resolve().parents[1] / "trl_hsstar"
SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16, intermediate_size=64)
CPU = torch.device("cpu")


def reward_args(tmp_path, **overrides):
    """Real trainer arguments, as the trainer passes them to ``_load_reward_model``."""
    return HSStarConfig(output_dir=str(tmp_path / "out"), report_to="none", **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a pickle-only checkpoint and a checkpoint that asks to run its own code


@pytest.fixture(scope="module")
def bin_only_dir(tmp_path_factory):
    """A tiny token-classification model saved the old way: ``pytorch_model.bin`` (pickle) + config.json.

    transformers 5.24 dropped ``save_pretrained(safe_serialization=False)``, so the state dict is written with
    ``torch.save`` (which is what that option did).
    """
    d = tmp_path_factory.mktemp("bin-only")
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, task="token-classification", seed=0, **SMALL)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    model.config.architectures = [type(model).__name__]  # what save_pretrained records
    model.config.save_pretrained(d)
    tok.save_pretrained(d)
    assert not list(d.glob("*.safetensors"))
    return d


def write_remote_code_dir(root: Path, sentinel: Path) -> Path:
    """A model directory whose config needs ``evil.py``, which creates ``sentinel`` when imported."""
    d = root / "remote-code-model"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "hsstar_evil",
                "architectures": ["EvilForTokenClassification"],
                "auto_map": {
                    "AutoConfig": "evil.EvilConfig",
                    "AutoModelForTokenClassification": "evil.EvilModel",
                    "AutoModelForCausalLM": "evil.EvilModel",
                },
            }
        )
    )
    (d / "evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(sentinel)!r}).write_text('remote code ran')\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'hsstar_evil'\n"
    )
    return d


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Where transformers copies remote code before importing it: a temporary folder, not ~/.cache."""
    path = tmp_path / "hf-modules"
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(path))
    return path


def recipe_args(tmp_path, model_dir, *extra):
    """Parsed recipe arguments for the toy problems and ``model_dir`` (what ``hsstar train`` hands to main)."""
    return parse(
        [
            "--model_name_or_path",
            str(model_dir),
            "--dataset_name",
            "toy",
            "--toy_num_problems",
            "8",
            "--difficulty_estimator",
            "accuracy",
            "--report_to",
            "none",
            "--output_dir",
            str(tmp_path / "run"),
            *extra,
        ]
    )


# ---------------------------------------------------------------------------------------------------------------
# trust_remote_code is off unless the user sets it


@pytest.mark.parametrize("cls", [HSStarConfig, HSStarDPOConfig])
def test_trust_remote_code_defaults_to_false(cls, tmp_path):
    assert cls(output_dir=str(tmp_path)).trust_remote_code is False
    _, training_args, _ = parse(["--output_dir", str(tmp_path)])
    assert training_args.trust_remote_code is False


def test_reward_model_loader_does_not_run_remote_code_by_default(tmp_path, modules_cache):
    sentinel = tmp_path / "SENTINEL"
    d = write_remote_code_dir(tmp_path, sentinel)
    with pytest.raises(ValueError, match="trust_remote_code"):
        _load_reward_model(str(d), reward_args(tmp_path), CPU)
    assert not sentinel.exists()
    # the bare namespace the loader also accepts, without the field at all: still off
    bare = SimpleNamespace(reward_aggregation="min", reward_batch_size=2)
    with pytest.raises(ValueError, match="trust_remote_code"):
        _load_reward_model(str(d), bare, CPU)
    assert not sentinel.exists()


def test_reward_model_loader_passes_the_users_trust_remote_code(tmp_path, modules_cache):
    """The positive control: the directory above really does run code once the user trusts it."""
    sentinel = tmp_path / "SENTINEL"
    d = write_remote_code_dir(tmp_path, sentinel)
    with pytest.raises(Exception):  # noqa: B017 - evil.py defines no model; what matters is that it ran
        _load_reward_model(str(d), reward_args(tmp_path, trust_remote_code=True), CPU)
    assert sentinel.read_text() == "remote code ran"


def test_recipe_does_not_run_the_policys_remote_code_by_default(tmp_path, modules_cache):
    sentinel = tmp_path / "SENTINEL"
    d = write_remote_code_dir(tmp_path, sentinel)
    script_args, training_args, model_args = recipe_args(tmp_path, d)
    with pytest.raises(ValueError, match="trust_remote_code"):
        recipe_main(script_args, training_args, model_args)
    assert training_args.model_init_kwargs["trust_remote_code"] is False
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------------------------
# Weights come from safetensors only


def test_the_bin_checkpoint_itself_is_loadable(bin_only_dir):
    """Control: transformers' own default still loads this directory, so the refusals below are ours."""
    model = AutoModelForTokenClassification.from_pretrained(bin_only_dir)
    assert model.config.num_labels == 2


def test_reward_model_loader_refuses_pickle_weights(bin_only_dir, tmp_path):
    with pytest.raises(OSError, match=r"no safetensors weights.*use_safetensors"):
        _load_reward_model(str(bin_only_dir), reward_args(tmp_path), CPU)


def test_reward_model_loader_loads_pickle_weights_only_when_the_user_opts_in(bin_only_dir, tmp_path):
    args = reward_args(tmp_path, model_init_kwargs={"use_safetensors": False})
    source = _load_reward_model(str(bin_only_dir), args, CPU)
    assert isinstance(source, ProcessRewardModel)
    scores = source(["Q: 1+2\nA: "], ["1+2=3\n\nThe answer is \\boxed{3}."])
    assert isinstance(scores[0], float) and 0.0 <= scores[0] <= 1.0


def test_recipe_refuses_a_pickle_only_policy(bin_only_dir, tmp_path):
    script_args, training_args, model_args = recipe_args(tmp_path, bin_only_dir)
    with pytest.raises(OSError, match=r"model\.safetensors"):
        recipe_main(script_args, training_args, model_args)
    assert training_args.model_init_kwargs["use_safetensors"] is True


@pytest.mark.parametrize(
    ("extra", "trust_remote_code", "use_safetensors"),
    [
        ([], False, True),
        (["--trust_remote_code", "true"], True, True),
        (["--model_init_kwargs", '{"use_safetensors": false}'], False, False),
    ],
    ids=["defaults", "user-trusts-remote-code", "user-allows-bin"],
)
def test_recipe_model_init_kwargs_take_the_users_values(tmp_path, extra, trust_remote_code, use_safetensors):
    """What main hands the trainer's model loader (read back after the loader fails on a missing folder)."""
    script_args, training_args, model_args = recipe_args(tmp_path, tmp_path / "no-such-model", *extra)
    with pytest.raises(OSError):
        recipe_main(script_args, training_args, model_args)
    kwargs = training_args.model_init_kwargs
    assert (kwargs["trust_remote_code"], kwargs["use_safetensors"]) == (trust_remote_code, use_safetensors)


def test_the_toy_world_saves_safetensors(reasoner_dir):
    names = {p.name for p in Path(reasoner_dir).rglob("*")}
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))], names
    assert AutoModelForCausalLM.from_pretrained(reasoner_dir, use_safetensors=True) is not None


# ---------------------------------------------------------------------------------------------------------------
# No unpickling, no eval/exec of anything


FORBIDDEN_TEXT = [
    (re.compile(r"\bpickle\.loads?\b"), "pickle.load"),
    (re.compile(r"\btorch\.load\("), "torch.load("),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"weights_only\s*=\s*False"), "weights_only=False"),
    (re.compile(r"(?<![\w.])eval\("), "eval("),  # model.eval() is a method call, not the builtin
    (re.compile(r"(?<![\w.])exec\("), "exec("),
]
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
ALLOWED: dict[tuple[str, str], str] = {}
"""(file relative to trl_hsstar/, finding) -> why it is safe. Empty: nothing in the package needs it."""


def scan_source(source: str) -> list[str]:
    """What in ``source`` could unpickle or execute data: text patterns, then the syntax tree (calls to
    ``eval``/``exec``/``compile``, ``*.load*`` of a pickling module, ``torch.load``, ``numpy.load`` with
    ``allow_pickle=True``, imports of pickling modules)."""
    found = [name for pattern, name in FORBIDDEN_TEXT if pattern.search(source)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {m}" for m in modules if m.split(".")[0] in UNPICKLING_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in {"eval", "exec", "compile", "__import__"}:
            found.append(f"{func.id}()")
        if isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if owner in UNPICKLING_MODULES and func.attr.startswith(("load", "Unpickler", "open")):
                found.append(f"{owner}.{func.attr}()")
            if owner == "torch" and func.attr == "load":
                found.append("torch.load()")
            if owner in {"builtins", "__builtins__"} and func.attr in {"eval", "exec", "compile"}:
                found.append(f"{owner}.{func.attr}()")
            if func.attr == "load" and any(
                k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                found.append(f"{owner}.load(allow_pickle=...)")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.loads(b)",
        "from pickle import loads",
        "import joblib\njoblib.load(path)",
        "import torch\ntorch.load(path)",
        "torch.load(path, weights_only=False)",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
        "eval(text)",
        "exec(text)",
        "import builtins\nbuiltins.eval(text)",
        "compile(text, 'f', 'exec')",
        "import dill\ndill.load(f)",
    ],
)
def test_the_scanner_catches_each_pattern(snippet):
    assert scan_source(snippet), f"the scan missed {snippet!r}"


def test_the_scanner_leaves_model_eval_alone():
    assert scan_source("model.eval()\nimport json\njson.loads(s)\nnp.load(path)\n") == []


def test_the_package_never_unpickles_or_evaluates():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20 and (PACKAGE / "verify.py") in files
    findings = [
        (str(path.relative_to(PACKAGE)), finding)
        for path in files
        for finding in scan_source(path.read_text(encoding="utf-8"))
    ]
    unexplained = [f for f in findings if f not in ALLOWED]
    assert not unexplained, f"unpickling / code execution in the package: {unexplained}"


# ---------------------------------------------------------------------------------------------------------------
# Servers bind to loopback unless told otherwise


@pytest.mark.parametrize("cls", [HSStarConfig, HSStarDPOConfig])
def test_the_server_host_defaults_to_loopback(cls, tmp_path):
    assert cls(output_dir=str(tmp_path)).vllm_server_host == "127.0.0.1"
    assert _VLLM_FIELDS["vllm_server_host"] == "127.0.0.1"
    defaults = {f.name: f.default for f in dataclasses.fields(HSStarArguments)}
    assert {name: defaults[name] for name in _VLLM_FIELDS} == _VLLM_FIELDS  # dict and fields agree


ANY_ADDRESS = {"0.0.0.0", "::", "[::]"}


def test_the_package_binds_nothing_to_all_interfaces():
    """No all-interfaces address anywhere; the one ``bind`` is the free-port probe of the vLLM server launcher, on
    the host it is given (loopback by default, see the next test)."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        allowed = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and (path.name, f.name) == ("vllm_server.py", "_free_port")
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ANY_ADDRESS:
                hits.append((path.name, node.value))
            if (
                isinstance(node, ast.Attribute)
                and node.attr in {"bind", "listen"}
                and id(node) not in allowed
            ):
                hits.append((path.name, f".{node.attr}"))
        if "0.0.0.0" in source or "INADDR_ANY" in source:
            hits.append((path.name, "0.0.0.0 / INADDR_ANY"))
    assert not hits, hits


def test_the_vllm_server_binds_to_loopback_unless_told_otherwise():
    import inspect

    from trl_hsstar.cli import make_parser
    from trl_hsstar.sampling import launch_vllm_server
    from trl_hsstar.sampling.vllm_server import server_command

    assert inspect.signature(launch_vllm_server).parameters["host"].default == "127.0.0.1"
    command = server_command("some/model")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    args, _ = make_parser().parse_known_args(["vllm-serve", "--model", "m"])
    assert args.host == "127.0.0.1"
    command = server_command("m", host="10.1.2.3", port=9000)  # told otherwise
    assert command[command.index("--host") + 1 :][:3] == ["10.1.2.3", "--port", "9000"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_verifier_worker_talks_over_pipes_not_sockets():
    with MathVerifier(timeout=5.0) as v:
        assert v("\\boxed{x+1}", "1+x") is True  # goes through the worker
        (worker,) = v._all
        fds = Path(f"/proc/{worker.proc.pid}/fd")
        targets = [os.readlink(fd) for fd in fds.iterdir()]
    assert any(t.startswith("pipe:") for t in targets), targets
    assert not [t for t in targets if t.startswith("socket:")], targets
