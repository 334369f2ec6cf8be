"""Kill and resume: ``hsstar train`` is SIGKILLed during sampling, during scoring and during training, then the
same command is run again. It must complete, spend each iteration's budget exactly once (no sample id repeated
or missing), not redo what was finished (whole phases, and the chunks of the phase it was killed in), and end
with the same artifacts as a run that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import run_group

from trl_hsstar import artifacts as A

REPO = Path(__file__).resolve().parents[1]
NUM_ITERATIONS = 2
PROBLEMS_PER_ITERATION = 24
BUDGET = 8
CHUNK = 8
PROBE = 2  # completions the trainer scores once at start, to check the reward source before any sampling


def _config(tmp: Path, model: Path, output_dir: Path) -> Path:
    config = {
        "objective": "sft",
        "model_name_or_path": str(model),
        "dataset_name": "toy",
        "toy_num_problems": NUM_ITERATIONS * PROBLEMS_PER_ITERATION,
        "toy_operands": [2, 6],
        "toy_digits": [1, 1],
        "reward_funcs": ["helpers.slow_reward:slow_oracle"],
        "reward_thresholds": [0.25, 0.5],
        "reward_batch_size": 4,
        "output_dir": str(output_dir),
        "num_iterations": NUM_ITERATIONS,
        "problems_per_iteration": PROBLEMS_PER_ITERATION,
        "sampling_budget": BUDGET,
        "num_presamples": 3,
        "max_completion_length": 64,
        "generation_batch_size": 8,
        "sampling_chunk_size": CHUNK,
        "learning_rate": 3.0e-4,
        "num_train_epochs": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
    }
    path = tmp / f"{output_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env(score_log: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), str(REPO), env.get("PYTHONPATH")]))
    env["HSSTAR_TEST_SCORE_DELAY"] = "0.05"
    env["HSSTAR_TEST_SCORE_LOG"] = str(score_log)
    return env


def _cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "trl_hsstar.cli", "train", "--config", str(config)]


def _run(config: Path, env: dict) -> str:
    out = run_group(_cmd(config), env=env, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout


def _run_and_kill(config: Path, env: dict, when, timeout: float = 300) -> None:
    """Start the command, SIGKILL it as soon as ``when(output_lines)`` is true; fail if it ends first."""
    proc = subprocess.Popen(
        _cmd(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if when(lines):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.002)
        pytest.fail(f"the run ended (rc={proc.poll()}) before the kill point:\n" + "".join(lines[-40:]))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _chunk_rows(store: A.IterationArtifacts, phase: str) -> int:
    chunk_dir = store.path(f".{phase}.chunks")
    return sum(len(p.read_text().splitlines()) for p in chunk_dir.glob("chunk-*.jsonl"))


def _scored(score_log: Path) -> int:
    return sum(int(x) for x in score_log.read_text().split()) if score_log.exists() else 0


def _summary(run: Path) -> list[dict]:
    """What an uninterrupted run and a resumed one must agree on, per iteration."""
    out = []
    for t in range(NUM_ITERATIONS):
        store = A.IterationArtifacts(run, t)
        samples = store.read_jsonl(A.samples_file(0)) + store.read_jsonl(A.samples_file(1))
        ids = [s["sample_id"] for s in samples]
        assert len(ids) == len(set(ids)) == BUDGET * PROBLEMS_PER_ITERATION, "a sample repeated or missing"
        stats = store.read_json(A.STATS)
        assert stats["budget_spent"] == stats["budget_planned"] == len(ids)
        levels = store.read_jsonl(A.plan_file(1))
        wanted = {f"{r['problem_id']}/{slot}" for r in levels for slot in range(3 + r["next_samples"])}
        assert set(ids) == wanted
        scores = store.read_jsonl(A.scored_file(0)) + store.read_jsonl(A.scored_file(1))
        assert sorted(s["sample_id"] for s in scores) == sorted(ids)
        assert store.done and (store.model_dir / "model.safetensors").exists()
        assert not list(store.dir.glob(".*.chunks")) and not list(store.dir.glob(".*.tmp-*"))
        out.append(
            {
                "ids": sorted(ids),
                "levels": stats["levels"],
                "rows": stats["rows"],
                "train_ids": sorted(r["sample_id"] for r in store.read_jsonl(A.TRAIN_ROWS)),
                "completions": {s["sample_id"]: s["completion"] for s in samples} if t == 0 else None,
            }
        )
    return out


@pytest.fixture(scope="module")
def uninterrupted(reasoner_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run = tmp / "run"
    _run(_config(tmp, reasoner_dir, run), _env(tmp / "scores.log"))
    return _summary(run)


def _first_chunk_written(store: A.IterationArtifacts, phase: str):
    chunk_dir = store.path(f".{phase}.chunks")
    return lambda lines: chunk_dir.is_dir() and any(chunk_dir.glob("chunk-*.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("phase", [A.samples_file(0), A.scored_file(1)])
def test_killed_in_a_data_phase_resumes_from_its_last_chunk(phase, reasoner_dir, tmp_path, uninterrupted):
    run, log = tmp_path / "run", tmp_path / "scores.log"
    config, env = _config(tmp_path, reasoner_dir, run), _env(log)
    store = A.IterationArtifacts(run, 0)
    _run_and_kill(config, env, _first_chunk_written(store, phase))

    # the kill landed inside the phase: some chunks saved, the phase's file not written
    assert not store.has(phase)
    saved = _chunk_rows(store, phase)
    assert 0 < saved < BUDGET * PROBLEMS_PER_ITERATION
    done_before = store.completed_phases()
    scored_before = _scored(log)
    # a kill in the middle of writing leaves temporary files behind: they never count as complete
    (store.path(f".{phase}.chunks") / ".chunk-99999999.jsonl.tmp-1").write_text('{"sample_id": "x')
    store.path(f".{phase}.tmp-1").write_text('{"sample_id": "half a row')

    _run(config, env)
    stats = store.read_json(A.STATS)
    # finished phases were read back, not recomputed; the killed phase kept its saved chunks
    assert not set(done_before) & set(stats["phases_computed"])
    total = len(store.read_jsonl(phase))
    assert stats["units"][phase] == {"reused": saved, "computed": total - saved}
    if phase == A.samples_file(0):  # nothing saved was generated again
        assert stats["generated_this_run"] == BUDGET * PROBLEMS_PER_ITERATION - saved
    else:  # the resumed run scored only the re-samples not saved (plus nothing else of iteration 0)
        resamples = len(store.read_jsonl(A.samples_file(1)))
        assert stats["generated_this_run"] == 0
        assert stats["units"][A.scored_file(1)]["computed"] == resamples - saved
        scored_iteration_1 = BUDGET * PROBLEMS_PER_ITERATION
        assert _scored(log) - scored_before == PROBE + resamples - saved + scored_iteration_1
    assert _summary(run) == uninterrupted


@pytest.mark.slow
def test_killed_during_training_resumes_without_resampling(reasoner_dir, tmp_path, uninterrupted):
    run, log = tmp_path / "run", tmp_path / "scores.log"
    config, env = _config(tmp_path, reasoner_dir, run), _env(log)
    store = A.IterationArtifacts(run, 0)
    _run_and_kill(config, env, lambda lines: any("'loss'" in line for line in lines))

    assert store.has(A.TRAIN_ROWS) and not store.done and not store.has(A.MODEL)
    scored_before = _scored(log)
    _run(config, env)
    stats = store.read_json(A.STATS)
    assert stats["phases_computed"] == [] and stats["generated_this_run"] == 0
    assert stats["train_steps"] > 0
    assert _scored(log) - scored_before == PROBE + BUDGET * PROBLEMS_PER_ITERATION  # iteration 1 only
    assert _summary(run) == uninterrupted


def test_a_killed_atomic_write_leaves_no_file(tmp_path):
    """SIGKILL in the middle of writing a large phase file: the final name never appears."""
    target = tmp_path / "iteration-0" / A.samples_file(0)
    code = (
        "import sys; from trl_hsstar.artifacts import atomic_write_text\n"
        "atomic_write_text(sys.argv[1], 'x' * 400_000_000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)])
    deadline = time.monotonic() + 120
    while not list(target.parent.glob(".*.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(target.parent.glob(".*.tmp-*")), "the write never started"
    assert not target.exists()
    store = A.IterationArtifacts(tmp_path, 0)
    assert not store.has(A.samples_file(0))
    assert store.remove_partial_files() and not list(target.parent.iterdir())
