"""Multi-process runs: sampling and scoring sharded over two CPU processes (gloo) under ``accelerate launch``.

The same toy run goes once in one process and once in two; both must spend the budget exactly, generate each
(problem, slot) exactly once, and agree on what they generated. Levels and allocation fed the same samples
must be identical.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cpu_launch_args, run_group

from trl_hsstar import artifacts as A

REPO = Path(__file__).resolve().parents[1]


def _config(path: Path, model: Path, output_dir: Path, **overrides) -> Path:
    config = {
        "objective": "sft",
        "model_name_or_path": str(model),
        "dataset_name": "toy",
        "toy_num_problems": 48,
        "toy_operands": [2, 6],
        "toy_digits": [1, 1],
        "reward_funcs": ["oracle"],
        "output_dir": str(output_dir),
        "num_iterations": 2,
        "problems_per_iteration": 24,
        "sampling_budget": 8,
        "num_presamples": 3,
        "max_completion_length": 64,
        "generation_batch_size": 32,
        "sampling_chunk_size": 16,
        "reward_thresholds": [0.25, 0.5],
        "learning_rate": 3.0e-4,
        "per_device_train_batch_size": 8,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _config_file(name: str, num_processes: int) -> list[str]:
    """``accelerate launch`` arguments for a shipped config, on ``num_processes`` processes in float32."""
    return [
        "--config_file",
        str(REPO / "accelerate_configs" / name),
        "--num_processes",
        str(num_processes),
        "--mixed_precision",
        "no",
        "--main_process_port",
        "0",
    ]


def _launch(
    config: Path, num_processes: int, launch_args: list[str] | None = None
) -> subprocess.CompletedProcess:
    if num_processes == 1:
        cmd = [sys.executable, "-m", "trl_hsstar.cli", "train", "--config", str(config)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *(launch_args or cpu_launch_args(num_processes)),
            str(
                REPO
                / "recipes"
                / (
                    "hsstar_dpo.py"
                    if yaml.safe_load(config.read_text())["objective"] == "dpo"
                    else "hsstar.py"
                )
            ),
            "--config",
            str(config),
        ]
    out = run_group(cmd, env=_env(), timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _samples(run: Path, t: int) -> list[dict]:
    store = A.IterationArtifacts(run, t)
    return store.read_jsonl(A.samples_file(0)) + store.read_jsonl(A.samples_file(1))


def _check_iteration(run: Path, t: int, num_processes: int) -> set[tuple[str, int]]:
    """Budget exact, every (problem, slot) the allocation asked for generated exactly once; returns the keys."""
    store = A.IterationArtifacts(run, t)
    stats = store.read_json(A.STATS)
    problems = [r["problem_id"] for r in store.read_jsonl(A.PROBLEMS)]
    levels = {r["problem_id"]: r for r in store.read_jsonl(A.plan_file(1))}
    samples = _samples(run, t)
    keys = [(s["problem_id"], s["slot"]) for s in samples]
    assert len(keys) == len(set(keys)), "a (problem, slot) appears twice"
    assert len({s["sample_id"] for s in samples}) == len(samples)
    n_p = stats["num_presamples"]
    wanted = {(p, slot) for p in problems for slot in range(n_p + levels[p]["next_samples"])}
    assert set(keys) == wanted
    assert stats["budget_spent"] == stats["budget_planned"] == 8 * len(problems) == len(samples)
    # generated exactly once: the processes together generated as many samples as the iteration holds
    assert stats["num_processes"] == num_processes
    assert sum(stats["generated_per_process"]) == stats["generated_this_run"] == len(samples)
    assert len(stats["generated_per_process"]) == num_processes
    assert all(n > 0 for n in stats["generated_per_process"]), "a process generated nothing"
    scores = store.read_jsonl(A.scored_file(0)) + store.read_jsonl(A.scored_file(1))
    assert sorted(s["sample_id"] for s in scores) == sorted(s["sample_id"] for s in samples)
    assert store.done and (store.model_dir / "config.json").exists()
    assert not list(store.dir.glob(".*.chunks")), "chunk directories are removed once a phase is merged"
    return set(keys)


@pytest.mark.slow
def test_two_processes_shard_sampling_and_match_one_process(reasoner_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(_config(tmp_path / "one.yaml", reasoner_dir, one), 1)
    _launch(_config(tmp_path / "two.yaml", reasoner_dir, two), 2)
    for t in range(2):
        keys_one = _check_iteration(one, t, 1)
        keys_two = _check_iteration(two, t, 2)
        if t == 0:  # same M_0, same seeds per chunk: the same samples, so the same allocation and keys
            assert keys_one == keys_two
            by_id = {s["sample_id"]: s["completion"] for s in _samples(one, 0)}
            assert {s["sample_id"]: s["completion"] for s in _samples(two, 0)} == by_id
    # only the main process writes: no temporary files left behind, one manifest
    leftovers = [p for p in two.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    assert not leftovers


@pytest.mark.slow
def test_dpo_on_two_processes(reasoner_dir, tmp_path):
    """DPO: the reference log-probs of each iteration are precomputed across both processes."""
    run = tmp_path / "dpo"
    _launch(_config(tmp_path / "dpo.yaml", reasoner_dir, run, objective="dpo", learning_rate=1e-5), 2)
    for t in range(2):
        _check_iteration(run, t, 2)
        rows = A.IterationArtifacts(run, t).read_jsonl(A.TRAIN_ROWS)
        assert rows and all(r["chosen_id"] != r["rejected_id"] for r in rows)
        assert A.IterationArtifacts(run, t).read_json(A.STATS)["train_steps"] > 0


@pytest.mark.slow
def test_levels_and_allocation_are_computed_once_from_the_same_samples(reasoner_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(_config(tmp_path / "one.yaml", reasoner_dir, one, num_iterations=1, problems_per_iteration=24), 1)
    # the two-process run is handed the one-process run's samples and scores, and estimates from them
    src, dst = A.IterationArtifacts(one, 0), A.IterationArtifacts(two, 0)
    dst.dir.mkdir(parents=True)
    for name in (A.PROBLEMS, A.samples_file(0), A.scored_file(0)):
        shutil.copy(src.path(name), dst.path(name))
    shutil.copy(one / A.RunManifest.FILE, two / A.RunManifest.FILE)
    _launch(_config(tmp_path / "two.yaml", reasoner_dir, two, num_iterations=1, problems_per_iteration=24), 2)
    assert dst.read_jsonl(A.plan_file(1)) == src.read_jsonl(A.plan_file(1))
    stats = dst.read_json(A.STATS)
    assert A.samples_file(0) not in stats["phases_computed"] and A.plan_file(1) in stats["phases_computed"]
    assert stats["num_processes"] == 2


def _same_iteration_zero(a: Path, b: Path) -> None:
    """The same levels, allocation and training rows in iteration 0 (the same M_0 and seeds per chunk)."""
    sa, sb = A.IterationArtifacts(a, 0), A.IterationArtifacts(b, 0)
    assert sa.read_jsonl(A.plan_file(1)) == sb.read_jsonl(A.plan_file(1))
    rows = sa.read_jsonl(A.TRAIN_ROWS)
    assert rows and rows == sb.read_jsonl(A.TRAIN_ROWS)


@pytest.mark.slow
def test_the_shipped_fsdp2_config_on_cpu_processes_runs_as_ddp_and_says_so(reasoner_dir, tmp_path):
    """FSDP2 through `accelerate launch` with the shipped accelerate_configs/fsdp2.yaml on two CPU processes.
    accelerate (1.16) applies FSDP to accelerator processes only (GPU, XPU, NPU...): CPU processes get data
    parallelism. The run works, says so, records it, and gives the levels, allocation and rows of a DDP run.
    Should a later accelerate shard CPU processes, the first assertion fails: then this test is the FSDP test."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _launch(_config(tmp_path / "ddp.yaml", reasoner_dir, ddp), 2)
    out = _launch(_config(tmp_path / "fsdp.yaml", reasoner_dir, fsdp), 2, _config_file("fsdp2.yaml", 2))
    stats = A.IterationArtifacts(fsdp, 0).read_json(A.STATS)
    assert stats["distributed_type"] == "MULTI_CPU"
    assert A.IterationArtifacts(ddp, 0).read_json(A.STATS)["distributed_type"] == "MULTI_CPU"
    assert "accelerate was asked for FSDP but this run is MULTI_CPU" in out.stderr
    for t in range(2):
        _check_iteration(fsdp, t, 2)
    _same_iteration_zero(ddp, fsdp)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="sharding needs 2 or more CUDA GPUs",
)
@pytest.mark.parametrize(("config", "kind"), [("fsdp2.yaml", "FSDP"), ("deepspeed_zero3.yaml", "DEEPSPEED")])
def test_sharded_training_on_gpus_gives_the_levels_allocation_and_rows_of_ddp(
    config, kind, reasoner_dir, tmp_path
):
    """FSDP2 and ZeRO-3 on two GPUs (the shipped configs, float32): generation goes through TRL's
    unwrap_model_for_generation (which gathers the shards), each iteration's trainer is rebuilt on the sharded
    model, and the full-weights save gathers the shards once per iteration; the levels, allocation and rows of
    iteration 0 equal a DDP run's, and the saved model loads."""
    if kind == "DEEPSPEED":
        pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    ddp, sharded = tmp_path / "ddp", tmp_path / "sharded"
    _launch(_config(tmp_path / "ddp.yaml", reasoner_dir, ddp), 2, _config_file("multi_gpu.yaml", 2))
    _launch(_config(tmp_path / "sharded.yaml", reasoner_dir, sharded), 2, _config_file(config, 2))
    for t in range(2):
        _check_iteration(sharded, t, 2)
        assert A.IterationArtifacts(sharded, t).read_json(A.STATS)["distributed_type"] == kind
    _same_iteration_zero(ddp, sharded)
    saved = AutoModelForCausalLM.from_pretrained(A.IterationArtifacts(sharded, 1).model_dir)
    reference = AutoModelForCausalLM.from_pretrained(reasoner_dir)
    assert saved.num_parameters() == reference.num_parameters()  # whole weights, not one shard


def test_a_launch_the_trainer_does_not_see_is_refused(monkeypatch, tmp_path):
    """WORLD_SIZE says 2 but the arguments see one process: refused before any work (no duplicate writers)."""
    from datasets import Dataset

    from trl_hsstar import HSStarConfig, HSStarTrainer

    args = HSStarConfig(output_dir=str(tmp_path), difficulty_estimator="accuracy", report_to="none")
    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. torchrun with a process group the arguments never joined
    problems = Dataset.from_dict({"prompt": ["1+1="], "answer": ["2"]})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        HSStarTrainer(model="unused", args=args, train_dataset=problems)
    assert not any(tmp_path.iterdir())
