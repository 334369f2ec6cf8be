"""Recipes: every YAML parses and validates through TrlParser; the toy recipe runs under `accelerate launch`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from helpers import cpu_launch_args, run_group

from trl_hsstar.cli import main as cli_main
from trl_hsstar.config import HSStarConfig, HSStarDPOConfig
from trl_hsstar.recipe import HSStarScriptArguments, parse

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").rglob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


def test_the_expected_recipes_exist():
    names = {p.relative_to(ROOT / "recipes" / "configs").as_posix() for p in CONFIGS}
    assert {
        "toy_cpu.yaml",
        "grpo_toy_cpu.yaml",
        "qwen2.5_math/1.5b_qlora_single.yaml",
        "qwen2.5/7b_full_multi.yaml",
    } <= names
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
    if raw.get("objective") == "grpo":
        from trl_hsstar import HSStarGRPOConfig

        assert type(script_args).__name__ == "HSStarGRPOScriptArguments"
        assert type(training_args) is HSStarGRPOConfig
        assert not hasattr(script_args, "reward_weights")  # GRPOConfig's own field, one meaning
    else:
        assert isinstance(script_args, HSStarScriptArguments)
        expected_cls = HSStarDPOConfig if raw.get("objective") == "dpo" else HSStarConfig
        assert type(training_args) is expected_cls
    # every key of the YAML reached one of the three dataclasses (TrlParser would also reject unknown keys)
    for key in raw:
        if key == "output_dir":
            continue
        holders = [obj for obj in (script_args, training_args, model_args) if hasattr(obj, key)]
        assert holders, f"{path.name}: `{key}` is not a field"
    assert (
        training_args.generation_batch_size
        if raw.get("objective") == "grpo"
        else training_args.sampling_budget * training_args.problems_per_iteration
    ) > 0
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


def test_hsstar_train_runs_the_toy_recipe(reasoner_dir, tmp_path, capsys, caplog):
    argv = [
        "train",
        "--config",
        str(ROOT / "recipes/configs/toy_cpu.yaml"),
        *_toy_overrides(reasoner_dir, tmp_path),
        "--disable_tqdm",
        "true",
    ]
    assert cli_main(argv) == 0
    stats = json.loads((tmp_path / "iteration-0" / "stats.json").read_text())
    assert stats["budget_spent"] == stats["budget_planned"] == 64
    assert (tmp_path / "model.safetensors").exists()  # the final model, saved by the recipe
    out, err = capsys.readouterr()
    assert "easy/boundary/hard" in out and "{'hsstar/" not in out  # a table, not the raw dict of figures
    assert "%|" not in out + err  # disable_tqdm: no progress bar of ours, transformers' or datasets'

    with caplog.at_level("WARNING"):
        assert cli_main(argv) == 0  # a rerun of a finished run
    out = capsys.readouterr().out
    assert "nothing to do, this run finished earlier (1 iterations)" in out
    assert "missing keys" not in caplog.text


def test_hsstar_train_runs_the_grpo_recipe(reasoner_dir, tmp_path, capsys):
    """`objective: grpo`: HSStarGRPOTrainer from the shipped recipe, GRPOConfig's names on the command line."""
    argv = ["train", "--config", "grpo_toy_cpu", "--model_name_or_path", str(reasoner_dir)]
    argv += ["--toy_num_problems", "8", "--num_generations", "4", "--per_device_train_batch_size", "16"]
    argv += ["--max_completion_length", "16", "--num_train_epochs", "2", "--output_dir", str(tmp_path)]
    assert cli_main([*argv, "--disable_tqdm", "true"]) == 0
    out = capsys.readouterr().out
    # 8 prompts, 4 a round, 2 epochs: 4 steps of 16 completions, the first epoch pre-sampling every prompt once
    assert "HS-STaR GRPO finished: 4 steps" in out and "'unprobed': 32" in out
    assert (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match="allocation"):
        parse(["--config", "grpo_toy_cpu", "--allocation", "everything", "--output_dir", str(tmp_path)])


def test_one_progress_bar_per_phase(reasoner_dir, tmp_path, capsys):
    """The sampling phases and the training pass have a bar each: no sampler bar inside a phase's bar, no bars for
    the datasets bookkeeping of a training pass."""
    argv = [
        "train",
        "--config",
        "toy_cpu",
        *_toy_overrides(reasoner_dir, tmp_path),
        "--disable_tqdm",
        "false",
    ]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    bars = {line.split(":")[0].strip() for line in err.splitlines() if "%|" in line}
    assert {"pre-sampling (iteration 0)", "re-sampling round 1 (iteration 0)"} <= bars
    assert not [b for b in bars if b == "sampling" or "dataset" in b or "split" in b], bars


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------------------------
# As TRL's command line: --help, shipped configs by name, GRPO recipes, several processes


def test_hsstar_train_help_lists_the_fields(capsys):
    with pytest.raises(SystemExit) as exit:
        cli_main(["train", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hsstar train" in out and "--sampling_budget" in out and "--reward_funcs" in out


def test_hsstar_env_prints_versions(capsys):
    assert cli_main(["env"]) == 0
    out = capsys.readouterr().out
    for key in (
        "trl-hsstar version",
        "PyTorch version",
        "trl version",
        "transformers version",
        "accelerator(s)",
    ):
        assert f"- {key}: " in out


def test_shipped_configs_resolve_by_name(tmp_path):
    from trl_hsstar.recipe import shipped

    assert Path(shipped("recipes", "toy_cpu")).resolve() == (ROOT / "recipes/configs/toy_cpu.yaml").resolve()
    assert Path(shipped("recipes", "qwen2.5_math/1.5b_qlora_single")).is_file()
    assert (
        Path(shipped("accelerate", "multi_gpu")).resolve()
        == (ROOT / "accelerate_configs/multi_gpu.yaml").resolve()
    )
    with pytest.raises(ValueError, match=r"toy_cpu"):
        shipped("recipes", "toy_gpu")
    script_args, _, _ = parse(["--config", "toy_cpu", "--output_dir", str(tmp_path)])
    assert script_args.dataset_name == "toy"


def test_the_wheel_ships_the_recipes_and_accelerate_configs(tmp_path):
    import subprocess
    import zipfile

    pytest.importorskip("setuptools")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for p in CONFIGS:
        assert "trl_hsstar/configs/recipes/" + p.relative_to(ROOT / "recipes" / "configs").as_posix() in names
    for p in ACCELERATE_CONFIGS:
        assert f"trl_hsstar/configs/accelerate/{p.name}" in names


def test_a_grpo_recipe_carries_over(tmp_path):
    grpo = tmp_path / "grpo.yaml"
    grpo.write_text(
        yaml.safe_dump(
            {
                "dataset_name": "toy",
                "model_name_or_path": "toy",
                "num_generations": 6,
                "num_presamples": 2,
                "top_k": 20,
                "min_p": 0.05,
                "chat_template_kwargs": {"enable_thinking": False},
                "reward_funcs": ["accuracy_reward"],
                "reward_weights": [1.0],
                "reward_thresholds": [0.3, 0.7],
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    script_args, args, _ = parse(["--config", str(grpo)])
    assert (args.sampling_budget, args.top_k, args.min_p) == (6, 20, 0.05)
    assert args.chat_template_kwargs == {"enable_thinking": False}
    assert script_args.reward_weights == [1.0]
    _, args, _ = parse(["--config", str(grpo), "--num_generations", "4"])
    assert args.sampling_budget == 4
    grpo.write_text(
        yaml.safe_dump({"dataset_name": "toy", "vllm_group_port": 51216, "output_dir": str(tmp_path)})
    )
    with pytest.raises(ValueError, match=r"`vllm_group_port`.*no meaning in HS-STaR.*NCCL.*sampling_budget"):
        parse(["--config", str(grpo)])
    with pytest.raises(ValueError, match=r"`epsilon`.*sampling_budget"):
        parse(["--config", "toy_cpu", "--epsilon", "0.2", "--output_dir", str(tmp_path)])


@pytest.mark.slow
def test_hsstar_train_launches_several_processes(reasoner_dir, tmp_path):
    """Arguments that are not fields go to `accelerate launch`, as with `trl sft`: two processes from the CLI."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "trl_hsstar.cli",
        "train",
        "--config",
        "toy_cpu",
        *_toy_overrides(reasoner_dir, tmp_path),
        *cpu_launch_args(2),
    ]
    out = run_group(cmd, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stats = json.loads((tmp_path / "iteration-0" / "stats.json").read_text())
    assert stats["num_processes"] == 2 and len(stats["generated_per_process"]) == 2


def test_the_iteration_table_of_a_run_without_pre_samples():
    """num_presamples=0 leaves no pre-sample accuracy: the row shows '-' (it used to raise mid-run)."""
    from trl_hsstar.trainer import iteration_table

    stats = {"iteration": 0, "levels": {"easy": 0, "boundary": 4, "hard": 0}, "budget_spent": 32}
    stats |= {"budget_planned": 32, "rows": 7, "presample_accuracy": None, "train_loss": 0.5}
    row = iteration_table([stats], header=False)
    assert row.split() == ["0", "0/4/0", "32/32", "7", "-", "0.5000", "-"]
