"""The world's shipped checkpoints: what ships, how it was built, that it loads from a wheel and builds nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_world import TINY_M0  # M_0's recipe on a model small enough for a test

from trl_hsstar.toy import world
from trl_hsstar.toy.world import CHECKPOINTS, WORLD_VERSION, shipped, toy_prm_path, toy_reasoner_path

ROOT = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["tiny", "m0", "prm"])
def test_each_shipped_checkpoint_matches_its_build_record(name):
    path = shipped(name)
    assert path is not None, f"trl_hsstar/toy/checkpoints/{name} is missing: run `hsstar world build`"
    build = json.loads((path / "build.json").read_text())
    assert build["sha256"] == _sha256(path / "model.safetensors")  # the weights are the ones recorded
    assert build["command"].startswith("hsstar world build") and isinstance(build["seed"], int)
    assert build["world_version"] == WORLD_VERSION and build["torch"] and build["cpu"]
    if name != "prm":
        assert build["steps_trained"] > 0
    size = (path / "model.safetensors").stat().st_size
    assert size < 8 * 2**20, f"{name} is {size} bytes: the package ships small checkpoints"


def test_the_world_loads_the_shipped_files_and_builds_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("TRL_HSSTAR_WORLD_SEED", raising=False)
    assert toy_reasoner_path(tmp_path, preset="tiny") == CHECKPOINTS / "tiny"
    m0 = toy_reasoner_path(tmp_path, preset="m0")
    assert m0 == CHECKPOINTS / "m0" and toy_prm_path(m0, tmp_path) == CHECKPOINTS / "prm"
    assert not any(tmp_path.iterdir())  # nothing was trained here


def test_a_world_seed_rebuilds_the_models_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_HSSTAR_WORLD_SEED", "5")
    path = toy_reasoner_path(tmp_path, preset="m0", **TINY_M0)
    assert path.parent == tmp_path
    assert json.loads((path / "toy_reasoner.json").read_text())["seed"] == 5
    other = toy_reasoner_path(tmp_path / "other", preset="m0", **{**TINY_M0, "seed": 5})
    assert load_file(path / "model.safetensors").keys() == load_file(other / "model.safetensors").keys()
    a, b = load_file(path / "model.safetensors"), load_file(other / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the switch is the seed, nothing else
    assert (
        json.loads(
            (
                toy_reasoner_path(tmp_path, preset="m0", **{**TINY_M0, "seed": 2}) / "toy_reasoner.json"
            ).read_text()
        )["seed"]
        == 2
    )  # an explicit seed wins
    monkeypatch.setenv("TRL_HSSTAR_WORLD_SEED", "five")
    with pytest.raises(ValueError, match="TRL_HSSTAR_WORLD_SEED"):
        toy_reasoner_path(tmp_path, preset="tiny")


def test_the_cache_is_keyed_by_the_world_version(tmp_path, monkeypatch):
    monkeypatch.delenv("TRL_HSSTAR_WORLD_SEED", raising=False)
    monkeypatch.setattr(world, "WORLD_VERSION", 1)
    first = toy_reasoner_path(tmp_path, preset="m0", **TINY_M0)
    monkeypatch.setattr(world, "WORLD_VERSION", 2)
    second = toy_reasoner_path(tmp_path, preset="m0", **TINY_M0)
    assert first != second  # a model of another world is never reused
    assert json.loads((second / "toy_reasoner.json").read_text())["world_version"] == 2


def test_hsstar_world_build_writes_the_checkpoints_and_their_records(tmp_path, monkeypatch, capsys):
    from trl_hsstar.cli import main

    presets = {name: {**settings, **TINY_M0} for name, settings in world.REASONER_PRESETS.items()}
    presets["tiny"]["target_accuracy"] = None
    monkeypatch.setattr(world, "REASONER_PRESETS", presets)
    small_prm = dict(problems_per_level=4, samples_per_problem=2, num_train_epochs=1)
    monkeypatch.setattr(world, "DEFAULT_PRM", {**world.DEFAULT_PRM, **small_prm})
    monkeypatch.setattr(
        sys, "argv", ["hsstar", "world", "build", "--output-dir", str(tmp_path), "--seed", "3"]
    )
    assert main(sys.argv[1:]) == 0
    for name in ("tiny", "m0", "prm"):
        build = json.loads((tmp_path / name / "build.json").read_text())
        assert build["command"] == f"hsstar world build --output-dir {tmp_path} --seed 3"
        assert build["seed"] == 3 and build["torch"] == torch.__version__
        assert build["sha256"] == _sha256(tmp_path / name / "model.safetensors")
    assert json.loads((tmp_path / "m0" / "levels.json").read_text())["all"] >= 0
    with pytest.raises(SystemExit):
        main(["world", "build", "--only", "huge"])


@pytest.mark.slow
def test_shipped_m0_greedy_accuracy_is_the_same_under_1_and_2_threads():
    code = (
        "import json, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        "from trl_hsstar.toy.world import CHECKPOINTS, evaluate_levels, held_out_problems; "
        "p = CHECKPOINTS / 'm0'; "
        "print(json.dumps([torch.get_num_threads(), evaluate_levels(AutoModelForCausalLM.from_pretrained(p), "
        "AutoTokenizer.from_pretrained(p), held_out_problems())]))"
    )
    tables = {}
    for threads in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        ran_with, tables[threads] = json.loads(out.stdout.strip().splitlines()[-1])
        assert ran_with == threads
    assert tables[1] == tables[2]
    # and it is the table recorded when M_0 was built, which the demo prints as M_0's row
    assert tables[1] == json.loads((CHECKPOINTS / "m0" / "levels.json").read_text())


@pytest.mark.slow
def test_a_wheel_install_carries_the_checkpoints(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(ROOT)], check=True
    )
    (wheel,) = dist.glob("trl_hsstar-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, str(wheel)],
        check=True,
    )
    # torch and transformers from this environment, after the wheel's own files (no editable finder runs here)
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import hashlib, json, trl_hsstar; from pathlib import Path; "
        "from transformers import AutoModelForCausalLM, AutoModelForTokenClassification; "
        "from trl_hsstar.toy.world import toy_prm_path, toy_reasoner_path; "
        "m0 = toy_reasoner_path(preset='m0'); prm = toy_prm_path(m0); tiny = toy_reasoner_path(); "
        "AutoModelForCausalLM.from_pretrained(m0); AutoModelForCausalLM.from_pretrained(tiny); "
        "AutoModelForTokenClassification.from_pretrained(prm); "
        "ok = [hashlib.sha256((p / 'model.safetensors').read_bytes()).hexdigest() "
        "== json.loads((p / 'build.json').read_text())['sha256'] for p in (m0, prm, tiny)]; "
        "print(json.dumps([trl_hsstar.__file__, str(m0), ok]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRL_HSSTAR_WORLD_SEED"}
    env["TRL_HSSTAR_CACHE"] = str(tmp_path / "cache")
    out = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    package, m0, ok = json.loads(out.stdout.strip().splitlines()[-1])
    assert package.startswith(site) and m0.startswith(site)  # the wheel's own copy, not this checkout
    assert ok == [True, True, True] and not (tmp_path / "cache").exists()  # loaded, nothing built
