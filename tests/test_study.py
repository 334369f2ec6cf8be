"""The pre-registered study (docs/protocol.md, benchmarks/bench_study.py): its statistics, its arms and its report."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_study", ROOT / "benchmarks" / "bench_study.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_students_t_matches_the_tables(study):
    # the 97.5th percentiles every statistics table prints, and a tail probability
    for df, t in ((1, 12.706), (4, 2.776), (10, 2.228), (19, 2.093), (100, 1.984)):
        assert study.t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)
    assert study.t_sf(2.0, 10) == pytest.approx(0.03669, abs=1e-5)
    assert study.t_sf(-2.0, 10) == pytest.approx(1 - 0.03669, abs=1e-5)
    assert study.t_sf(0.0, 7) == 0.5
    # a t of float noise (seeds whose differences cancel) is a tail of one half, not a math domain error
    assert study.t_sf(1e-12, 19) == pytest.approx(0.5)
    assert study.paired([0.15333333333333343, -0.15333333333333327])["p"] == pytest.approx(1.0)


def test_paired_differences_and_holm(study):
    r = study.paired([0.01, 0.03, 0.02, 0.04, 0.00])
    assert r["mean"] == pytest.approx(0.02)
    assert r["half_width"] == pytest.approx(2.776 * r["sd"] / math.sqrt(5), rel=1e-3)
    assert r["p"] == pytest.approx(0.0474, abs=1e-3)  # t = 2.83 on 4 degrees of freedom
    assert study.paired([0.1]) is None
    assert study.paired([0.02, 0.02, 0.02])["p"] == 0.0  # the same difference every time: certain
    # Holm: the smallest p times the family's size, each next one times one less, never below the one before
    assert study.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a": 0.03, "c": 0.06, "b": 0.06}
    assert study.holm({"a": 0.5, "b": 0.9}) == {"a": 1.0, "b": 1.0}


def test_the_power_calculation_is_the_protocols(study):
    """docs/protocol.md's seed counts come from the earlier study's records by this calculation."""
    pc = study.power_calculation()
    assert (pc["sft"]["seeds_for_power"], pc["sft"]["seeds_for_half_width"]) == (23, 31)
    assert (pc["dpo"]["seeds_for_power"], pc["dpo"]["seeds_for_half_width"]) == (10, 13)
    text = (ROOT / "docs" / "protocol.md").read_text()
    for objective in ("sft", "dpo"):
        c = pc[objective]
        row = f"| {objective.upper()} | {100 * c['prior_sd']:.2f} | {c['seeds_for_power']} | {c['seeds_for_half_width']} |"
        assert row in text
    # more power needs more seeds; a larger effect fewer
    assert study.power(20, 0.016) > study.power(10, 0.016)
    assert study.seeds_for_power(0.016, effect=0.02) < study.seeds_for_power(0.016, effect=0.01)


def test_the_plan_runs_every_arm_of_a_seed_before_the_next_seed(study):
    args = study.make_parser().parse_args(["--objectives", "sft", "dpo", "--seeds", "3"])
    runs = study.plan(args)
    assert len(runs) == 2 * 3 * 5
    assert [r["arm"] for r in runs[:5]] == list(study.ARMS)
    assert [(r["objective"], r["seed"]) for r in runs[::5]] == [
        (o, s) for o in ("sft", "dpo") for s in range(3)
    ]


def _record(study, objective, arm, seed, accuracy, *, machine="cpu A"):
    its = [
        {
            "held_out": dict.fromkeys(study.ENDPOINT_LEVELS, accuracy),
            "rows": 10,
            "budget_spent": 8,
            "budget_planned": 8,
        }
    ]
    return {"objective": objective, "arm": arm, "seed": seed, "machine": machine, "iterations": its * 3}


def test_pairs_are_by_seed_on_one_machine(study):
    records = {}
    for seed, (a, b) in enumerate([(0.52, 0.50), (0.53, 0.50), (0.51, 0.50)]):
        records[f"h{seed}"] = _record(study, "sft", "hsstar", seed, a)
        records[f"u{seed}"] = _record(study, "sft", "uniform", seed, b)
    records["h3"] = _record(study, "sft", "hsstar", 3, 0.9, machine="cpu B")  # its pair ran elsewhere
    records["u3"] = _record(study, "sft", "uniform", 3, 0.1)
    c = study.comparison(records, "sft", study.PRIMARY)
    assert c["seeds"] == [0, 1, 2] and c["mixed_machines"] == [3]
    assert c["mean"] == pytest.approx(0.02)
    # the exploratory family is always the protocol's 8, a comparison without two pairs counting with p = 1
    family = study.analyse(records)["sft"]["exploratory"]
    assert len(family) == 8 and family["equal steps: hsstar-steps - uniform-steps"]["p"] == 1.0


def _analysis(primary, floor=(-0.01, 0.01)):
    def comp(low, high):
        return {
            "mean": (low + high) / 2,
            "low": low,
            "high": high,
            "half_width": (high - low) / 2,
            "seeds": list(range(20)),
            "mixed_machines": [],
        }

    return {"primary": comp(*primary), "noise_floor": comp(*floor)}


def test_the_readings_are_the_protocols(study):
    def reading(a, complete=True):
        return next(line for line in study.verdict(a, complete=complete) if line.startswith("- Primary"))

    assert "confirmed" in reading(_analysis((0.002, 0.012)))
    assert "refuted" in reading(_analysis((-0.012, -0.002))) and "behind by 0.70 points" in reading(
        _analysis((-0.012, -0.002))
    )
    bounded = reading(_analysis((-0.004, 0.006)))
    assert (
        "no effect detected" in bounded and "above 0.60 points" in bounded and "beyond 0.40 points" in bounded
    )
    assert "interim" in reading(_analysis((0.002, 0.012)), complete=False)
    # a noise floor whose interval excludes 0 withholds the primary reading, whatever it shows
    assert "withheld" in reading(_analysis((0.002, 0.012), floor=(0.001, 0.02)))


def test_only_the_protocols_records_are_analysed(study):
    good = {"seed": 3, "reasoner_sha256": study.M0_SHA256 + "ab"}
    records = {
        "ok": good,
        "smoke": {**good, "quick": True},
        "seed 25": {**good, "seed": 25},
        "other M_0": {**good, "reasoner_sha256": "ffff"},
    }
    kept, left_out = study.protocol_records(records)
    assert list(kept) == ["ok"] and sorted(left_out) == ["other M_0", "seed 25", "smoke"]


def test_the_study_runs_the_protocols_setting(study):
    """The setting is pinned in the script (docs/protocol.md, "The setting"), and equals the world's defaults that
    the earlier study ran with."""
    from trl_hsstar.toy.experiment import WorldRun
    from trl_hsstar.toy.world import DPO_LEARNING_RATE, SFT_LEARNING_RATE

    defaults = WorldRun()
    assert study.LEARNING_RATES == {"sft": SFT_LEARNING_RATE, "dpo": DPO_LEARNING_RATE}
    for field in ("sampling_budget", "num_presamples", "max_rows_per_problem", "per_device_train_batch_size"):
        assert study.SETTING[field] == getattr(defaults, field)
    assert tuple(study.SETTING["reward_thresholds"]) == tuple(defaults.reward_thresholds)
    text = (ROOT / "docs" / "protocol.md").read_text()
    assert f"`max_steps` = {study.EQUAL_STEPS['sft']} (SFT) / {study.EQUAL_STEPS['dpo']} (DPO)" in text
    assert f"**{study.SEEDS} seeds (0 to {study.SEEDS - 1})" in text and study.M0_SHA256 in text


@pytest.mark.slow
def test_the_quick_study_writes_records_and_a_report_regenerated_from_them(
    world_cache, tmp_path, monkeypatch
):
    from trl_hsstar.cli import main

    records, report = tmp_path / "records", tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\nkept\n")
    argv = [
        "bench",
        "--protocol",
        "--quick",
        "--seeds",
        "2",
        "--objectives",
        "sft",
        "--cache-dir",
        str(world_cache),
    ]
    argv += ["--work-dir", str(tmp_path / "w"), "--records", str(records), "--report", str(report)]
    argv += ["--readme", str(tmp_path / "README.md")]
    monkeypatch.setattr(sys, "argv", ["hsstar", *argv])
    assert main(argv) == 0
    recs = {p.stem: json.loads(p.read_text()) for p in records.glob("*.json")}
    assert sorted(recs) == sorted(
        f"sft-{arm}-s{s}"
        for arm in ("uniform", "hsstar", "uniform-again", "hsstar-steps", "uniform-steps")
        for s in (0, 1)
    )
    for k, rec in recs.items():
        assert all(it["budget_spent"] == it["budget_planned"] for it in rec["iterations"])
        assert (
            rec["commit"]
            and rec["machine"]
            and "/" not in rec["command"].split("--work-dir")[1].split()[0].strip('"$')
        )
        steps = [it["train_steps"] for it in rec["iterations"]]
        if k.endswith(("-steps-s0", "-steps-s1")):
            # equal optimizer steps per iteration, whatever the rows (None: an iteration without rows trains not at all)
            assert set(steps) <= {17, None} and 17 in steps
    # the same-procedure arm: the same problems, another procedure seed
    assert (
        recs["sft-uniform-again-s0"]["run"]["seed"] == 10_000 and recs["sft-uniform-s0"]["run"]["seed"] == 0
    )
    text = report.read_text()
    assert "kept" in text and "### SFT (complete)" in text and "noise floor" in text
    # the report is a function of the records: regenerated, it is the same text
    before = text
    readme = (tmp_path / "README.md").read_text()
    assert "SFT" in readme and "(2 seeds)" in readme and "DPO not yet run" in readme
    again = [
        "bench",
        "--protocol",
        "--quick",
        "--report-only",
        "--records",
        str(records),
        "--report",
        str(report),
    ]
    assert main([*again, "--readme", str(tmp_path / "README.md")]) == 0
    assert report.read_text() == before and (tmp_path / "README.md").read_text() == readme


# -- the GRPO study (docs/protocol.md, "The GRPO study"; benchmarks/bench_grpo_study.py)


@pytest.fixture(scope="module")
def grpo_study():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_grpo_study
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_grpo_study


def _grpo_run(module, seed, arm, level_acc, signal_groups):
    levels = {lv: level_acc for lv in module.ENDPOINT_LEVELS}
    return {
        "seed": seed,
        "arm": arm,
        "quick": False,
        "setting": module.SETTING,
        "initial": {**levels, "endpoint": 0.6},
        "held_out_by_epoch": [levels, levels, levels],
        "completions": 3072,
        "groups": 384,
        "groups_with_signal": signal_groups,
        "rollouts_by_level_when_drawn": {"unprobed": 1024, "boundary": 2048},
        "endpoint": level_acc,
        "wall_seconds": 100.0,
        "steps": 27 if arm == "dapo" else 48,
        "dropped_groups": 168 if arm == "dapo" else 0,
        "torch_threads": 1,
        "jobs": 2,
        "machine": "m",
        "commit": "abc",
        "command": "python benchmarks/bench_grpo_study.py",
        "reasoner_sha256": module.bench_study.M0_SHA256 + "ff",
    }


def test_the_grpo_study_reads_its_runs_as_the_protocol_says(grpo_study):
    m = grpo_study
    assert m.SETTING["problems"] * m.SETTING["num_generations"] * m.SETTING["num_train_epochs"] == 3072
    assert m.SEEDS == 20 and set(m.ARMS) == {"uniform", "hsstar", "uniform-again", "dapo"}
    runs = {}
    for seed in range(3):
        for arm, acc, sig in (
            ("uniform", 0.60, 200),
            ("hsstar", 0.61 + 0.001 * seed, 360),
            ("uniform-again", 0.60, 210),
            ("dapo", 0.605, 220),
        ):
            runs[m.key({"seed": seed, "arm": arm})] = _grpo_run(m, seed, arm, acc, sig)
    runs["grpo-hsstar-s99"] = _grpo_run(m, 99, "hsstar", 0.9, 384)  # not a protocol seed
    kept = m.protocol_runs(runs)
    assert "grpo-hsstar-s99" not in kept and len(kept) == 12
    a = m.analyse(kept)
    assert a["primary"]["n"] == 3 and a["primary"]["mean"] == pytest.approx(0.011)
    assert a["noise_floor"]["mean"] == pytest.approx(0.0)
    assert len(a["exploratory"]) == 8
    # amendment 1's two comparisons, Holm over the two (not the exploratory family)
    assert a["secondary"]["hsstar - dapo"]["mean"] == pytest.approx(0.006)
    assert a["secondary"]["dapo - uniform"]["mean"] == pytest.approx(0.005)
    assert a["secondary"]["dapo - uniform"]["p_holm"] == pytest.approx(
        2 * a["secondary"]["dapo - uniform"]["p"]
    )
    record = {
        "meta": {
            "commit": "abc",
            "command": "python benchmarks/bench_grpo_study.py --report-only",
            "machine": "m",
        },
        "setting": m.SETTING,
        "planned_seeds": 20,
        "runs": kept,
    }
    text = m.render(record)
    assert "interim: 3 of 20 seeds; no claim is drawn" in text
    assert "| **primary: hsstar - uniform, equal completions** | 3 | +1.10 |" in text
    assert "groups with signal under hsstar >= 90%: **met** (94%)" in text
    assert "**not met** (+1.10" in text  # +2 points: not met, and interim
    assert "| hsstar - dapo | 3 | +0.60 |" in text and "| dapo - uniform | 3 | +0.50 |" in text
    assert "- ahead of `dapo` (hsstar - dapo, interval above 0): **not met** (+0.60" in text  # interim
    assert "| 27.0 | 168.0 |" in text  # dapo's steps and dropped groups
    assert text.startswith(m.MARKS[0]) and text.endswith(m.MARKS[1])
