"""Beyond the paper, on the rounds loop: the adaptive allocation (exact budget, quotas, resume inside a round), the
process-reward filter on SFT rows, and thresholds calibrated from round 0. No model: the scripted sampler and the
exact step reward, so every figure is the same on every CPU."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from trl_hsstar import artifacts as A
from trl_hsstar.difficulty import calibrate_thresholds, estimate_difficulty
from trl_hsstar.pipeline import run_iteration
from trl_hsstar.records import Problem
from trl_hsstar.selection import ScoredSample, quota_filled
from trl_hsstar.toy import generate_problems

sys.path.insert(0, str(Path(__file__).parent))
from helpers.scripted import ScriptedSampler
from test_rounds import B, Dies, N, exact, run, samples, settings

CAP = 2


@pytest.fixture(scope="module")
def problems():
    toy = generate_problems(N, operands=(2, 6), seed=4)  # the problems of test_rounds
    return [Problem(p.id, p.prompt, p.prompt, str(p.answer)) for p in toy]


def adaptive(problems, path, **overrides):
    kw = dict(allocation="hsstar_adaptive", resample_rounds=4, max_rows_per_problem=CAP)
    return run(problems, path, **{**kw, **overrides})


def groups_before(store, round_: int) -> dict[str, list[ScoredSample]]:
    """Each problem's samples from the rounds before ``round_``, as the plan of ``round_`` saw them."""
    out: dict[str, list[ScoredSample]] = {}
    for k in range(round_):
        for s in store.read_jsonl(A.scored_file(k)):
            out.setdefault(s["problem_id"], []).append(
                ScoredSample(s["problem_id"], None, s["completion"], s["correct"], s["reward"])
            )
    return out


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_adaptive_spends_the_budget_exactly_and_skips_problems_with_their_quota(
    problems, tmp_path, objective
):
    store, result = adaptive(problems, tmp_path, objective=objective)
    ids = [s["sample_id"] for s in samples(store)]
    assert len(ids) == len(set(ids)) == B * N == result.stats["budget_spent"]  # every (problem, slot) once
    assert store.rounds() == 5
    skipped = 0
    for k in range(2, 5):
        before = groups_before(store, k)
        plan = store.read_jsonl(A.plan_file(k))
        full = {
            r["problem_id"]: quota_filled(before[r["problem_id"]], objective=objective, cap=CAP) for r in plan
        }
        open_boundary = [r for r in plan if r["level"] == "boundary" and not full[r["problem_id"]]]
        if open_boundary:  # the slice goes to boundary problems without their quota, and to them only
            assert all(r["next_samples"] == 0 for r in plan if r not in open_boundary)
            assert sum(r["next_samples"] for r in open_boundary) == sum(r["next_samples"] for r in plan)
            skipped += sum(1 for r in plan if r["level"] == "boundary" and full[r["problem_id"]])
        elif not all(full.values()):  # then to whoever lacks its quota
            assert all(r["next_samples"] == 0 for r in plan if full[r["problem_id"]])
    assert skipped > 0  # the case occurred: a boundary problem with its quota was left alone
    # rows still come from the last plan's boundary problems, at most CAP each
    per_problem = {}
    for row in result.rows:
        per_problem[row["problem_id"]] = per_problem.get(row["problem_id"], 0) + 1
    assert result.rows and max(per_problem.values()) <= CAP


def test_adaptive_makes_more_rows_than_the_release_on_the_same_samples_budget(problems, tmp_path):
    """What the rule is for: the budget a full problem would have had yields rows elsewhere."""
    _, release = run(problems, tmp_path / "release", max_rows_per_problem=CAP, resample_rounds=1)
    _, ours = adaptive(problems, tmp_path / "adaptive")
    assert release.stats["budget_spent"] == ours.stats["budget_spent"] == B * N
    assert len(ours.rows) > len(release.rows)


def test_adaptive_stopped_inside_a_round_resumes_to_the_same_result(problems, tmp_path):
    _, clean = adaptive(problems, tmp_path / "clean")
    calls_to_round_2 = sum(-(-n // 7) for n in clean.stats["samples_per_round"][:2])  # chunks of 7 samples
    with pytest.raises(RuntimeError, match="killed"):
        adaptive(problems, tmp_path / "killed", sampler=Dies(after=calls_to_round_2 + 2))  # inside round 2
    store = A.IterationArtifacts(tmp_path / "killed", 0)
    assert store.has(A.plan_file(2)) and not store.has(A.scored_file(2))
    resumed_sampler = ScriptedSampler()
    _, resumed = adaptive(problems, tmp_path / "killed", sampler=resumed_sampler)
    assert resumed.rows == clean.rows and resumed.resamples == clean.resamples
    assert samples(store) == samples(A.IterationArtifacts(tmp_path / "clean", 0))
    assert 0 < resumed_sampler.num_generated < B * N  # what was saved was not generated again


def test_the_score_filter_keeps_rows_at_or_above_the_threshold_and_counts_the_rest(problems, tmp_path):
    threshold = 0.5
    _store, plain = run(problems, tmp_path / "plain", max_rows_per_problem=None)
    _, filtered = run(problems, tmp_path / "filtered", max_rows_per_problem=None, min_row_score=threshold)
    assert filtered.rows and all(r["score"] >= threshold for r in filtered.rows)
    # by hand: the plain rows (same samples) whose S(r) is below the threshold are exactly the ones dropped
    low = [r for r in plain.rows if r["score"] is None or r["score"] < threshold]
    assert low, "the scripted sampler writes some rationales with a wrong step"
    assert filtered.stats["rows_dropped_by_score"] == len(low) == len(plain.rows) - len(filtered.rows)
    assert {r["sample_id"] for r in filtered.rows} == {r["sample_id"] for r in plain.rows} - {
        r["sample_id"] for r in low
    }
    assert "rows_dropped_by_score" not in plain.stats


def test_calibrated_thresholds_come_from_round_zero(problems, tmp_path):
    store, result = run(problems, tmp_path, reward_thresholds=None, calibrate_thresholds=True)
    groups = groups_before(store, 1)
    by_hand = calibrate_thresholds(
        estimate_difficulty([s.correct for s in g], [s.score for s in g], estimator="accuracy")
        for g in groups.values()
    )
    assert result.stats["reward_thresholds"] == list(by_hand)
    assert result.stats["calibration_error"] is None
    # the plans used them: every level equals the paper's rule under the calibrated pair
    plan = {r["problem_id"]: r["level"] for r in store.read_jsonl(A.plan_file(1))}
    for pid, g in groups.items():
        expected = estimate_difficulty([s.correct for s in g], [s.score for s in g], thresholds=by_hand)
        assert plan[pid] == expected.level.value


def test_calibration_falls_back_to_accuracy_when_rewards_do_not_separate(problems, tmp_path, caplog):
    store = A.IterationArtifacts(tmp_path, 0)
    result = run_iteration(
        problems,
        store=store,
        sampler=ScriptedSampler(),
        verifier=exact,
        score_fn=lambda prompts, completions, **_: [0.5] * len(completions),
        settings=settings(reward_thresholds=None, calibrate_thresholds=True, resample_rounds=1),
    )
    assert result.stats["difficulty_estimator"] == "accuracy" and result.stats["reward_thresholds"] is None
    assert "does not separate" in result.stats["calibration_error"]
    assert "Falling back to answer accuracy" in caplog.text
    for r in store.read_jsonl(A.plan_file(1)):  # accuracy-only levels
        phi_a = r["phi_a"]
        assert r["level"] == ("easy" if phi_a == 1 else "hard" if phi_a == 0 else "boundary")


def test_the_trainer_runs_the_adaptive_rule_with_calibrated_thresholds_and_the_score_filter(
    reasoner_dir, tmp_path
):
    """The new fields reach the loop through HSStarConfig: a reward function with no published thresholds needs
    none with `calibrate_thresholds`, the adaptive rule spends over its default four rounds, and the stats say
    what the filter dropped; the manifest records the fields, so a resume with other values is refused."""
    from datasets import Dataset

    from trl_hsstar.config import HSStarConfig
    from trl_hsstar.toy import problems_to_dataset_dict
    from trl_hsstar.toy.oracle import OracleStepReward
    from trl_hsstar.trainer import HSStarTrainer

    def step_reward(prompts, completions, **_):  # an ordinary reward function: no thresholds are published
        return OracleStepReward()(prompts, completions)

    dataset = Dataset.from_dict(problems_to_dataset_dict(generate_problems(12, operands=(2, 4), seed=5)))
    args = HSStarConfig(
        output_dir=str(tmp_path),
        num_iterations=1,
        sampling_budget=4,
        num_presamples=2,
        allocation="hsstar_adaptive",
        calibrate_thresholds=True,
        min_row_score=0.5,
        max_completion_length=64,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = HSStarTrainer(
        model=str(reasoner_dir), args=args, train_dataset=dataset, reward_funcs=step_reward
    )
    trainer.train()
    stats = trainer.iteration_stats[0]
    assert stats["budget_spent"] == 4 * 12 and len(stats["samples_per_round"]) == 5
    if stats["calibration_error"] is None:  # which branch depends on the weights; each must hold together
        tau_l, tau_h = stats["reward_thresholds"]
        assert stats["difficulty_estimator"] == "hsstar" and 0 <= tau_l < tau_h <= 1
    else:
        assert stats["difficulty_estimator"] == "accuracy" and stats["reward_thresholds"] is None
    rows = A.IterationArtifacts(tmp_path, 0).read_jsonl(A.TRAIN_ROWS)
    assert all(r["score"] >= 0.5 for r in rows) and stats["rows_dropped_by_score"] >= 0
    manifest = json.loads((tmp_path / A.RunManifest.FILE).read_text())
    assert manifest["min_row_score"] == 0.5 and manifest["calibrate_thresholds"] is True
    assert manifest["allocation"] == "hsstar_adaptive" and manifest["resample_rounds"] == 4
    with pytest.raises(ValueError, match=r"`min_row_score`: 0\.5 -> 0\.9"):
        HSStarTrainer(
            model=str(reasoner_dir),
            args=dataclasses.replace(args, min_row_score=0.9),
            train_dataset=dataset,
            reward_funcs=step_reward,
        ).train()
