"""HSStarConfig / HSStarDPOConfig: TRL-style fields, validation before anything loads, CPU defaults."""

from __future__ import annotations

import dataclasses

import pytest
from trl import DPOConfig, SFTConfig, TrlParser

from trl_hsstar.config import HSStarArguments, HSStarConfig, HSStarDPOConfig

HSSTAR_FIELDS = [f.name for f in dataclasses.fields(HSStarArguments)]


def test_subclasses_of_trl_configs_with_one_set_of_fields():
    assert issubclass(HSStarConfig, SFTConfig) and issubclass(HSStarDPOConfig, DPOConfig)
    for cls in (HSStarConfig, HSStarDPOConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(HSSTAR_FIELDS) <= names
    for f in dataclasses.fields(HSStarArguments):
        assert f.metadata.get("help"), f"`{f.name}` has no help text"
        assert f"{f.name} (" in HSStarArguments.__doc__ or f.name.startswith("vllm_"), (
            f"`{f.name}` undocumented"
        )


def test_release_defaults(tmp_path):
    args = HSStarConfig(output_dir=str(tmp_path))
    assert (args.num_iterations, args.sampling_budget, args.num_presamples) == (3, 8, 3)
    assert (args.temperature, args.top_p) == (0.7, 0.95)
    assert (args.difficulty_estimator, args.allocation, args.reward_aggregation) == (
        "hsstar",
        "hsstar",
        "min",
    )
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.03 and args.num_train_epochs == 1
    dpo = HSStarDPOConfig(output_dir=str(tmp_path))
    assert dpo.learning_rate == 5e-7 and dpo.precompute_ref_log_probs and dpo.beta == 0.1
    assert dpo.max_rows_per_problem is None  # the release keeps every pair


def test_the_adaptive_allocation_spends_over_four_rounds_by_default(tmp_path):
    assert HSStarConfig(output_dir=str(tmp_path), allocation="hsstar_adaptive").resample_rounds == 4
    assert HSStarConfig(output_dir=str(tmp_path)).resample_rounds == 1  # the release
    assert (
        HSStarConfig(output_dir=str(tmp_path), allocation="knapsack", resample_rounds=2).resample_rounds == 2
    )


def test_bf16_is_switched_off_without_an_accelerator(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert HSStarConfig(output_dir=str(tmp_path)).bf16 is False
    assert HSStarDPOConfig(output_dir=str(tmp_path)).bf16 is False


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_presamples": 9}, "`num_presamples` .9. exceeds `sampling_budget` .8."),
        ({"num_iterations": 0}, "`num_iterations` must be a positive integer"),
        ({"sampling_budget": 0}, "`sampling_budget`"),
        ({"reward_thresholds": [0.6, 0.2]}, "tau_l < tau_h"),
        ({"reward_thresholds": [0.1, 1.2]}, r"\[0, 1\]"),
        ({"difficulty_estimator": "vibes"}, "`difficulty_estimator`"),
        ({"allocation": "greedy"}, "`allocation`"),
        ({"reward_aggregation": "mean"}, "`reward_aggregation`"),
        ({"top_p": 0.0}, "`top_p`"),
        ({"temperature": -1.0}, "`temperature`"),
        ({"problems_per_iteration": 0}, "`problems_per_iteration`"),
        ({"max_rows_per_problem": 0}, "`max_rows_per_problem`"),
        ({"train_levels": ["medium"]}, "`train_levels`"),
        ({"resample_levels": []}, "`resample_levels`"),
        ({"resample_levels": ["medium"]}, "`resample_levels`"),
        ({"vllm_mode": "remote"}, "`vllm_mode` must be 'colocate' .* or 'server'"),
        ({"vllm_server_base_url": "x:8000"}, "`vllm_server_base_url` must be an http"),
        ({"vllm_server_port": 0}, "`vllm_server_port` must be a port number"),
        ({"vllm_server_host": ""}, "`vllm_server_host` must name"),
        (
            {"vllm_mode": "server", "vllm_python": "/usr/bin/env"},
            "`vllm_python` names the interpreter of an engine",
        ),
        ({"vllm_gpu_memory_utilization": 1.5}, "`vllm_gpu_memory_utilization` must be in"),
        ({"vllm_python": "/no/such/python"}, "`vllm_python` .* does not exist"),
        (
            {"reward_thresholds": [0.2, 0.6], "calibrate_thresholds": True},
            "`reward_thresholds` and `calibrate_thresholds=True` both set",
        ),
        ({"min_row_score": "high"}, "`min_row_score` must be a number"),
        ({"resample_rounds": 0}, "`resample_rounds` must be a positive integer"),
    ],
)
@pytest.mark.parametrize("cls", [HSStarConfig, HSStarDPOConfig])
def test_bad_values_are_named(cls, overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        cls(output_dir=str(tmp_path), **overrides)


def test_the_server_mode_reads_trl_grpo_fields(tmp_path):
    """A GRPO YAML's server fields carry over: the mode, the URL (or host and port) and the timeout."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "use_vllm: true\nvllm_mode: server\nvllm_server_base_url: http://10.0.0.5:8000\nvllm_server_timeout: 30\n"
    )
    (args,) = TrlParser((HSStarConfig,)).parse_args_and_config(
        ["--config", str(config), "--output_dir", str(tmp_path)]
    )
    assert (args.use_vllm, args.vllm_mode, args.vllm_server_base_url) == (
        True,
        "server",
        "http://10.0.0.5:8000",
    )
    assert args.vllm_server_timeout == 30
    (args,) = TrlParser((HSStarConfig,)).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--vllm_engine_kwargs", '{"enforce_eager": true}']
    )
    assert args.vllm_engine_kwargs == {"enforce_eager": True}  # JSON on the command line


def test_trl_parser_reads_yaml_and_command_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("sampling_budget: 16\nnum_presamples: 4\nreward_thresholds: [0.2, 0.6]\n")
    (args,) = TrlParser((HSStarConfig,)).parse_args_and_config(
        ["--config", str(config), "--output_dir", str(tmp_path), "--num_presamples", "5"]
    )
    assert (args.sampling_budget, args.num_presamples, args.reward_thresholds) == (16, 5, [0.2, 0.6])
    assert "--sampling_budget" in TrlParser((HSStarConfig,)).format_help()


@pytest.mark.parametrize(
    ("visible", "count", "local", "processes", "tp", "expected"),
    [
        (None, 8, 0, 1, 1, "0,1,2,3,4,5,6,7"),  # one process: its engine sees every GPU it may span
        (None, 8, 3, 8, 1, "3"),  # eight processes: engine k on GPU k
        ("4,5,6,7", 4, 1, 2, 2, "6,7"),  # two processes x tensor parallel 2, out of the visible ones
        ("2, 5", 2, 1, 2, 1, "5"),
    ],
)
def test_each_colocated_engine_gets_its_own_gpus(visible, count, local, processes, tp, expected):
    from trl_hsstar.sampling.engine import engine_cuda_devices

    assert engine_cuda_devices(visible, count, local, processes, tp) == expected


def test_a_colocated_layout_that_does_not_fit_is_refused():
    from trl_hsstar.sampling.engine import engine_cuda_devices

    with pytest.raises(ValueError, match=r"needs 16 GPUs .* 8 are visible.*vllm_mode='server'"):
        engine_cuda_devices(None, 8, 7, 8, 2)


def test_one_levels_rule_for_config_selection_and_budget(tmp_path):
    """The config, the selection and the allocation refuse an unknown level with the same message, naming their
    own field; only the config refuses an empty list."""
    from trl_hsstar.budget import allocate
    from trl_hsstar.difficulty import Difficulty, Level, validate_levels
    from trl_hsstar.selection import select_sft_rows

    assert validate_levels(["easy", Level.HARD], name="x") == {Level.EASY, Level.HARD}
    rule = "must be a list of levels among \\['easy', 'boundary', 'hard'\\], got \\['medium'\\]"
    with pytest.raises(ValueError, match=f"`train_levels` {rule}"):
        select_sft_rows([], {}, train_levels=["medium"])
    with pytest.raises(ValueError, match=f"`target_levels` {rule}"):
        allocate(
            [Difficulty(Level.BOUNDARY, None, None, 3, 0, 0)],
            budget=8,
            num_presamples=3,
            target_levels=["medium"],
        )
    for name in ("train_levels", "resample_levels"):
        with pytest.raises(ValueError, match=f"`{name}` must be a non-empty list of levels"):
            HSStarConfig(output_dir=str(tmp_path), **{name: []})
        with pytest.raises(ValueError, match=f"`{name}` must be a non-empty list of levels .*'medium'"):
            HSStarConfig(output_dir=str(tmp_path), **{name: ["medium"]})
    assert select_sft_rows([], {}, train_levels=[]) == []
