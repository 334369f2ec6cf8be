"""The embedded world end to end: M_0's builder, held-out evaluation, the learned PRM, world runs, demo and bench."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_hsstar.toy import build_char_tokenizer, build_tiny_model
from trl_hsstar.toy.experiment import METHODS, WorldRun, held_out_problems, run_world, world_problems
from trl_hsstar.toy.train import pretrain_reasoner
from trl_hsstar.toy.world import (
    LEVELS,
    REASONER_PRESETS,
    evaluate_levels,
    level_of,
    level_problems,
    toy_prm_path,
    toy_reasoner_path,
)

ROOT = Path(__file__).resolve().parents[1]
# M_0's recipe (a level mix, micro-batches, a stop on measured accuracy) on a model small enough for a test
TINY_M0 = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=1,
    intermediate_size=64,
    steps=6,
    batch_size=8,
    target_accuracy=0.99,
)
SMALL_PRM = dict(problems_per_level=6, samples_per_problem=2, num_train_epochs=1)


def _weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def test_m0_builder_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.delenv("TRL_HSSTAR_WORLD_SEED", raising=False)  # this tests the seeds themselves
    a = toy_reasoner_path(tmp_path / "a", preset="m0", **TINY_M0)
    b = toy_reasoner_path(tmp_path / "b", preset="m0", **TINY_M0)
    c = toy_reasoner_path(tmp_path / "c", preset="m0", **{**TINY_M0, "seed": 1})
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # another seed, other weights
    table = json.loads((a / "levels.json").read_text())  # the per-level accuracy table is saved
    assert set(table) == {*LEVELS, "all"} and all(0 <= v <= 1 for v in table.values())
    assert json.loads((a / "toy_reasoner.json").read_text())["mix"] == REASONER_PRESETS["m0"]["mix"]
    # cached: the same settings give the same directory without rebuilding
    assert toy_reasoner_path(tmp_path / "a", preset="m0", **TINY_M0) == a


def test_build_reasoner_is_the_builder_and_the_studys_nudge_moves_the_start(tmp_path, monkeypatch):
    monkeypatch.delenv("TRL_HSSTAR_WORLD_SEED", raising=False)  # compares with the preset's own seed
    from trl_hsstar.toy.world import build_reasoner

    settings = {**REASONER_PRESETS["m0"], **TINY_M0}
    model, _, build = build_reasoner(settings)
    cached = _weights(toy_reasoner_path(tmp_path, preset="m0", **TINY_M0))
    assert all(torch.equal(model.state_dict()[k], cached[k]) for k in cached)  # what toy_reasoner_path saves
    assert build["steps_trained"] == TINY_M0["steps"] and build["torch_threads"] == torch.get_num_threads()
    assert (
        json.loads((next(tmp_path.glob("toy-reasoner-*")) / "build.json").read_text())["steps_trained"] == 6
    )
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_m0 import nudged_init  # the CPU-path study's nudge (benchmarks/bench_m0.py)

    with nudged_init(1e-6):
        nudged, _, _ = build_reasoner(settings)
    diffs = [(nudged.state_dict()[k] - cached[k]).abs().max().item() for k in cached]
    assert 0 < max(diffs) < 0.5  # another start, close to the first


def test_unknown_preset_or_setting_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        toy_reasoner_path(tmp_path, preset="huge")
    with pytest.raises(ValueError, match="hidden"):
        toy_reasoner_path(tmp_path, preset="m0", hiden_size=3)
    assert not any(tmp_path.iterdir())  # nothing built


def test_training_stops_when_the_target_is_reached_and_mix_is_checked():
    tok = build_char_tokenizer()
    model = build_tiny_model(
        tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64
    )
    calls = []

    def stop(step):
        calls.append((step, model.training))
        return step >= 4

    losses = pretrain_reasoner(
        model,
        tok,
        steps=50,
        batch_size=4,
        mix=[[2, 1, 1], [3, 1, 1]],
        micro_batches=2,
        stop_when=stop,
        check_every=2,
    )
    assert len(losses) == 4 and calls == [(2, False), (4, False)]  # checked in eval mode, stopped at step 4
    with pytest.raises(ValueError, match="mix"):
        pretrain_reasoner(model, tok, steps=1, mix=[[2, 1, -1]])
    with pytest.raises(ValueError, match="schedule_steps"):
        pretrain_reasoner(model, tok, steps=5, schedule_steps=2)


def test_the_stop_is_refined_to_the_first_kept_weights_that_pass():
    """Checked every 8 steps, kept every 2: a stop that first holds at step 5 ends the model at step 6's weights,
    exactly those of a run trained for 6 steps, and the losses end there too."""
    tok = build_char_tokenizer()
    arch = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64)
    recipe = dict(batch_size=4, mix=[[2, 1, 1], [3, 1, 1]], schedule_steps=50, seed=3)
    model = build_tiny_model(tok, seed=3, **arch)
    calls = []

    def stop(step):
        calls.append(step)
        return step >= 5

    losses = pretrain_reasoner(model, tok, steps=50, stop_when=stop, check_every=8, refine_every=2, **recipe)
    assert calls == [8, 2, 4, 6] and len(losses) == 6
    reference = build_tiny_model(tok, seed=3, **arch)
    reference_losses = pretrain_reasoner(reference, tok, steps=6, **recipe)
    assert losses == reference_losses
    trained, expected = model.state_dict(), reference.state_dict()
    assert all(torch.equal(trained[k], expected[k]) for k in expected)
    # a stop that holds only at the check itself keeps the checked weights
    late = build_tiny_model(tok, seed=3, **arch)
    assert (
        len(
            pretrain_reasoner(
                late, tok, steps=50, stop_when=lambda s: s >= 8, check_every=8, refine_every=2, **recipe
            )
        )
        == 8
    )
    with pytest.raises(ValueError, match="refine_every"):
        pretrain_reasoner(late, tok, steps=4, stop_when=stop, check_every=8, refine_every=3)


def test_micro_batches_give_the_full_batch_update():
    tok = build_char_tokenizer()
    runs = []
    for micro in (1, 3):
        model = build_tiny_model(
            tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64
        )
        losses = pretrain_reasoner(model, tok, steps=2, batch_size=6, operands=(2, 6), micro_batches=micro)
        runs.append((losses, model.state_dict()))
    (loss_a, wa), (loss_b, wb) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-5)  # token-weighted: the same loss as one full batch
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)  # and the same update


def test_levels_and_held_out_problems_are_disjoint():
    held = held_out_problems(20)
    assert [level_of(p) for p in held] == [lv for lv in LEVELS for _ in range(20)]
    train = world_problems(140, seed=3, exclude=held)
    assert len(train) == 140 and not {p.id for p in train} & {p.id for p in held}
    assert {level_of(p) for p in train} == set(LEVELS)  # drawn from every level
    assert world_problems(140, seed=3, exclude=held) == train  # deterministic
    with pytest.raises(ValueError, match="operands"):
        level_problems(["six"], 3, seed=0)


def test_evaluate_levels_scores_greedy_answers(reasoner_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(reasoner_dir)
    tok = AutoTokenizer.from_pretrained(reasoner_dir)
    problems = level_problems(["3x1", "8x1"], 12, seed=5)
    table = evaluate_levels(model, tok, problems)
    assert set(table) == {"3x1", "8x1", "all"}
    assert table["all"] == pytest.approx((table["3x1"] + table["8x1"]) / 2)
    assert table["3x1"] > table["8x1"]  # the tiny reasoner was trained on 2 to 5 operands


def test_prm_is_trained_on_the_reasoners_samples_and_loads_as_a_reward(reasoner_dir, tmp_path):
    from trl_hsstar.rewards import ProcessRewardModel
    from trl_hsstar.scoring import load_reward_model as _load_reward_model

    path = toy_prm_path(reasoner_dir, tmp_path, **SMALL_PRM)
    metrics = json.loads((path / "prm_metrics.json").read_text())
    assert 0 <= metrics["eval_step_accuracy"] <= 1 and metrics["num_train"] > 0 and metrics["num_eval"] > 0
    assert metrics["majority_accuracy"] >= 0.5
    from trl_hsstar import HSStarConfig

    args = HSStarConfig(output_dir=str(tmp_path / "run"), reward_batch_size=4)
    source = _load_reward_model(str(path), args, torch.device("cpu"))
    assert isinstance(source, ProcessRewardModel)
    problem = level_problems(["3x1"], 1, seed=0)[0]
    scores = source([problem.prompt], [problem.rationale()])
    assert len(scores) == 1 and 0 <= scores[0] <= 1
    assert toy_prm_path(reasoner_dir, tmp_path, **SMALL_PRM) == path  # cached
    # built again elsewhere: the same weights (the new head is seeded too)
    again = toy_prm_path(reasoner_dir, tmp_path / "again", **SMALL_PRM)
    from safetensors.torch import load_file

    first, second = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError, match="epochs"):
        toy_prm_path(reasoner_dir, tmp_path, epochs=3)


@pytest.mark.parametrize("method", ["hsstar", "uniform", "hsstar-easy"])
def test_world_run_spends_the_budget_and_records_held_out_accuracy(reasoner_dir, tmp_path, method):
    held = held_out_problems(4)
    problems = world_problems(2 * 14, seed=0, exclude=held)
    record = run_world(
        WorldRun(
            method=method, num_iterations=2, problems_per_iteration=14, sampling_budget=4, reward="oracle"
        ),
        reasoner_dir=reasoner_dir,
        prm_dir=None,
        output_dir=tmp_path / "run",
        held_out=held,
        problems=problems,
    )
    assert len(record["iterations"]) == 2
    for it in record["iterations"]:
        assert it["budget_spent"] == it["budget_planned"] == 14 * 4
        assert sum(it["samples_by_world_level"].values()) == 14 * 4
        assert sum(sum(c.values()) for c in it["levels_by_world_level"].values()) == 14
        assert set(it["held_out"]) == {*LEVELS, "all"}
        spent = it["samples_on_easy"] + it["samples_on_boundary"] + it["samples_on_hard"]
        assert spent == 14 * 4
        if method == "hsstar-easy" and it["levels"].get("easy"):  # utility study: re-samples on easy only
            others = it["levels"].get("boundary", 0) + it["levels"].get("hard", 0)
            assert it["samples_on_boundary"] + it["samples_on_hard"] == 3 * others
        # the share of training rows with every step right, recounted here from the rows trained on
        from trl_hsstar.toy.problems import label_steps

        rows_file = tmp_path / "run" / f"iteration-{it['iteration']}" / "train_rows.jsonl"
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
        clean = [all(label_steps(r["problem_id"], r["completion"])) for r in rows]
        assert it["clean_row_share"] == (sum(clean) / len(clean) if clean else None)
    manifest = json.loads((tmp_path / "run" / "hsstar_run.json").read_text())
    assert manifest["allocation"] == METHODS[method]["allocation"]


def test_world_run_rejects_bad_settings():
    with pytest.raises(ValueError, match="method"):
        WorldRun(method="greedy")
    with pytest.raises(ValueError, match="reward"):
        WorldRun(reward="judge")


def test_demo_prints_hsstar_and_uniform_side_by_side_and_writes_plots(
    world_cache, tmp_path, capsys, monkeypatch
):
    from trl_hsstar.cli import main

    cache = world_cache
    out = tmp_path / "demo"
    argv = ["demo", "--reasoner", "tiny", "--cache-dir", str(cache), "--output-dir", str(out)]
    argv += ["--num-iterations", "2", "--problems-per-iteration", "14", "--sampling-budget", "4"]
    argv += ["--eval-per-level", "3", "--reward", "oracle"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| M_0 |" in printed and "budget spent/planned" in printed and "56/56" in printed
    assert "## hsstar" in printed and "## uniform" in printed
    side = printed.split("## Side by side")[1]
    assert "| after iteration | hsstar | uniform | hsstar - uniform |" in side
    result = json.loads((out / "results.json").read_text())
    assert list(result["methods"]) == ["hsstar", "uniform"]
    hsstar, uniform = result["methods"]["hsstar"], result["methods"]["uniform"]
    # the same M_0, the same problems and the same budget: only the allocation differs
    assert hsstar["initial"] == uniform["initial"]
    for a, b in zip(hsstar["iterations"], uniform["iterations"]):
        assert a["budget_spent"] == b["budget_spent"] == a["budget_planned"] == 56
        assert sum(a["samples_by_world_level"].values()) == sum(b["samples_by_world_level"].values())
    last = len(hsstar["iterations"])
    row = f"| {last} | {hsstar['iterations'][-1]['held_out']['all']:.3f} | {uniform['iterations'][-1]['held_out']['all']:.3f} |"
    assert row in side
    assert (out / "summary.md").exists() and (out / "accuracy.png").stat().st_size > 0
    assert (out / "hsstar" / "levels.png").stat().st_size > 0 and (out / "uniform" / "accuracy.png").exists()
    from trl_hsstar.demo import fresh_output_dir

    assert fresh_output_dir(out) == tmp_path / "demo-2"  # a rerun never overwrites a finished run
    assert fresh_output_dir(tmp_path / "new") == tmp_path / "new"


@pytest.mark.slow
def test_bench_quick_writes_the_report_and_records(world_cache, tmp_path, monkeypatch, capsys):
    from trl_hsstar.cli import main

    report = tmp_path / "benchmarks.md"
    report.write_text(
        "# Benchmarks\n\nkept above\n\n<!-- bench_methods:start -->\nold\n<!-- bench_methods:end -->\n\nkept below\n"
    )
    results = tmp_path / "bench.json"
    argv = [
        "bench",
        "--quick",
        "--cache-dir",
        str(world_cache),
        "--work-dir",
        str(tmp_path / "w"),
    ]
    argv += ["--report", str(report), "--results", str(results)]
    monkeypatch.setattr(sys, "argv", ["hsstar", *argv])
    assert main([*argv, "--jobs", "2"]) == 0  # two worker processes
    text = report.read_text()
    assert "kept above" in text and "kept below" in text and "old" not in text
    assert "### Main study, SFT" in text and "### Main study, DPO" in text
    records = json.loads(results.read_text())["records"]
    assert len(records) == 4  # hsstar and uniform x 2 objectives x 1 seed
    for rec in records.values():
        assert all(it["budget_spent"] == it["budget_planned"] for it in rec["iterations"])
        # run two at a time, in worker processes with the torch threads split between them
        assert rec["jobs"] == 2 and rec["torch_threads"] == max(1, torch.get_num_threads() // 2)
    # a rerun resumes: every finished run is read back, none is redone
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "w" / "runs").iterdir()}
    assert main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "w" / "runs").iterdir()} == before
    # records of other settings are never read back as this benchmark's
    capsys.readouterr()
    assert main([*argv, "--reward", "oracle"]) == 1
    assert "reward: 'prm' -> 'oracle'" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "w" / "runs").iterdir()} == before


def test_bench_interval_of_paired_differences():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "benchmarks" / "bench_methods.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mean, low, high = bench.interval95([0.01, 0.03, 0.02, 0.04, 0.00])
    assert mean == pytest.approx(0.02)
    # t(0.975, 4) = 2.776, sd = 0.0158: half-width 2.776 * 0.0158 / sqrt(5)
    assert high - mean == pytest.approx(mean - low) == pytest.approx(2.776 * 0.015811 / 5**0.5, rel=1e-3)
    assert bench.interval95([0.1]) is None
    # beyond any table: t(0.975, 11) = 2.201, not the normal 1.96
    twelve = [0.01 * (i % 4) for i in range(12)]
    mean, low, high = bench.interval95(twelve)
    assert high - mean == pytest.approx(2.201 * statistics.stdev(twelve) / 12**0.5, rel=1e-3)
    assert bench.plan(bench.make_parser().parse_args([]))[0]["seed"] == 0
    assert len(bench.plan(bench.make_parser().parse_args([]))) == 2 * 2 * 5  # the default study: 20 runs


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; the workers' guard is Linux-only"
)
@pytest.mark.slow
def test_a_killed_bench_takes_its_worker_processes_with_it(world_cache, tmp_path):
    import subprocess
    import time

    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_methods.py"), "--quick", "--jobs", "2"]
    cmd += ["--cache-dir", str(world_cache), "--work-dir", str(tmp_path / "w")]
    cmd += ["--report", str(tmp_path / "b.md"), "--results", str(tmp_path / "b.json")]
    bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in bench.stdout:
            if "in 2 process(es)" in line:
                break
        deadline = time.monotonic() + 120
        while len(workers := _children(bench.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(workers) >= 2, "the benchmark started no worker processes"
        time.sleep(3)  # past the workers' start-up
    finally:
        bench.kill()
        bench.wait()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers):
        assert time.monotonic() < deadline, "worker processes outlived the killed benchmark"
        time.sleep(0.2)
    assert not list((tmp_path / "w" / "runs").glob("*.json"))  # no run finished unwatched


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_bench_runs_the_literature_baseline_and_the_adaptive_rule_with_their_sources(world_cache, tmp_path):
    """`hsstar bench --methods knapsack hsstar_adaptive`: both run at the exact budget and the report names where
    each method comes from."""
    from trl_hsstar.cli import main

    report, results = tmp_path / "benchmarks.md", tmp_path / "bench.json"
    argv = ["bench", "--quick", "--methods", "knapsack", "hsstar_adaptive", "--objectives", "sft"]
    argv += ["--cache-dir", str(world_cache), "--work-dir", str(tmp_path / "w")]
    assert main([*argv, "--report", str(report), "--results", str(results)]) == 0
    text = report.read_text()
    assert "`knapsack` Knapsack RL (Li et al. 2025, arXiv 2509.25849)" in text
    assert "hsstar_adaptive minus each other method" in text and "| knapsack | 1 |" in text
    records = json.loads(results.read_text())["records"]
    assert sorted(r["run"]["method"] for r in records.values()) == ["hsstar_adaptive", "knapsack"]
    for rec in records.values():
        assert all(it["budget_spent"] == it["budget_planned"] for it in rec["iterations"])
