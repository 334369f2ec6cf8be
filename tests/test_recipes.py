"""Recipes: every YAML parses and validates through TrlParser; the toy recipe runs under `accelerate launch`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from helpers import run_group

from trl_hsstar.cli import main as cli_main
from trl_hsstar.config import HSStarConfig, HSStarDPOConfig
from trl_hsstar.recipe import HSStarScriptArguments, parse

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").rglob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


def test_the_expected_recipes_exist():
    names = {p.relative_to(ROOT / "recipes" / "configs").as_posix() for p in CONFIGS}
    assert {"toy_cpu.yaml", "qwen2.5_math/1.5b_qlora_single.yaml", "qwen2.5/7b_full_multi.yaml"} <= names
    assert {p.stem for p in ACCELERATE_CONFIGS} == {
        "single_gpu",
        "multi_gpu",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "fsdp2",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_yaml_parses_and_validates(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    script_args, training_args, model_args = parse(["--config", str(path), "--output_dir", str(tmp_path)])
    assert isinstance(script_args, HSStarScriptArguments)
    expected_cls = HSStarDPOConfig if raw.get("objective") == "dpo" else HSStarConfig
    assert type(training_args) is expected_cls
    # every key of the YAML reached one of the three dataclasses (TrlParser would also reject unknown keys)
    for key in raw:
        if key == "output_dir":
            continue
        holders = [obj for obj in (script_args, training_args, model_args) if hasattr(obj, key)]
        assert holders, f"{path.name}: `{key}` is not a field"
    assert training_args.sampling_budget * training_args.problems_per_iteration > 0
    assert "accelerate launch" in path.read_text().split("\n\n")[0], (
        f"{path.name}: no launch command in its header"
    )


def test_gpu_recipes_carry_the_release_numbers(tmp_path):
    _, dpo, model = parse(
        ["--config", str(ROOT / "recipes/configs/qwen2.5/7b_full_multi.yaml"), "--output_dir", str(tmp_path)]
    )
    assert (dpo.learning_rate, dpo.sampling_budget, dpo.num_presamples, dpo.num_iterations) == (5e-7, 8, 3, 3)
    assert dpo.reward_thresholds == [0.15, 0.65] and dpo.precompute_ref_log_probs
    assert dpo.per_device_train_batch_size * dpo.gradient_accumulation_steps * 8 == 256
    _, sft, model = parse(
        [
            "--config",
            str(ROOT / "recipes/configs/qwen2.5_math/1.5b_qlora_single.yaml"),
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert model.load_in_4bit and model.use_peft and sft.temperature == 0.7


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1


def test_bad_objective_is_named(tmp_path):
    with pytest.raises(ValueError, match="objective"):
        parse(
            [
                "--config",
                str(ROOT / "recipes/configs/toy_cpu.yaml"),
                "--objective",
                "ppo",
                "--output_dir",
                str(tmp_path),
            ]
        )


def _toy_overrides(reasoner_dir, output_dir):
    return [
        "--model_name_or_path",
        str(reasoner_dir),
        "--toy_num_problems",
        "16",
        "--num_iterations",
        "1",
        "--problems_per_iteration",
        "16",
        "--sampling_budget",
        "4",
        "--num_presamples",
        "2",
        "--output_dir",
        str(output_dir),
    ]


def test_hsstar_train_runs_the_toy_recipe(reasoner_dir, tmp_path):
    argv = [
        "train",
        "--config",
        str(ROOT / "recipes/configs/toy_cpu.yaml"),
        *_toy_overrides(reasoner_dir, tmp_path),
    ]
    assert cli_main(argv) == 0
    stats = json.loads((tmp_path / "iteration-0" / "stats.json").read_text())
    assert stats["budget_spent"] == stats["budget_planned"] == 64
    assert (tmp_path / "model.safetensors").exists()  # the final model, saved by the recipe


def test_accelerate_launch_runs_the_toy_recipe(reasoner_dir, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--cpu",
        str(ROOT / "recipes" / "hsstar.py"),
        "--config",
        str(ROOT / "recipes/configs/toy_cpu.yaml"),
        *_toy_overrides(reasoner_dir, tmp_path),
    ]
    out = run_group(cmd, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "HS-STaR finished: 1 iterations" in out.stdout
    assert (tmp_path / "iteration-0" / "DONE").exists()
