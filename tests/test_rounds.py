"""The iteration as rounds (``pipeline.run_iteration``): several re-sampling rounds spend the budget exactly, re-plan
from all samples so far, and resume inside any round. No model: a scripted sampler and the exact step reward."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from trl_hsstar import artifacts as A
from trl_hsstar.pipeline import PipelineSettings, run_iteration
from trl_hsstar.records import Problem
from trl_hsstar.sampling import SamplingParams
from trl_hsstar.toy import generate_problems
from trl_hsstar.toy.oracle import OracleStepReward
from trl_hsstar.verify import extract_boxed

sys.path.insert(0, str(Path(__file__).parent))
from helpers.scripted import ScriptedSampler

N, B, NP = 20, 8, 2


def exact(completion: str, reference: str) -> bool:
    return extract_boxed(completion) == reference


@pytest.fixture(scope="module")
def problems():
    toy = generate_problems(N, operands=(2, 6), seed=4)
    return [Problem(p.id, p.prompt, p.prompt, str(p.answer)) for p in toy]


def settings(**overrides) -> PipelineSettings:
    kwargs = dict(
        budget=B,
        num_presamples=NP,
        reward_thresholds=(0.25, 0.5),
        chunk_size=7,
        resample_rounds=3,
        sampling=SamplingParams(seed=5),
    )
    return PipelineSettings(**{**kwargs, **overrides})


def run(problems, output_dir, sampler=None, **overrides):
    store = A.IterationArtifacts(output_dir, 0)
    result = run_iteration(
        problems,
        store=store,
        sampler=sampler or ScriptedSampler(),
        verifier=exact,
        score_fn=OracleStepReward(),
        settings=settings(**overrides),
    )
    return store, result


def samples(store) -> list[dict]:
    return [s for r in range(store.rounds()) for s in store.read_jsonl(A.scored_file(r))]


def test_three_rounds_spend_the_budget_exactly_and_replan_from_all_samples(problems, tmp_path):
    store, result = run(problems, tmp_path)
    assert store.rounds() == 4
    rows = samples(store)
    ids = [s["sample_id"] for s in rows]
    assert len(ids) == len(set(ids)) == B * N == result.stats["budget_spent"]
    assert result.stats["samples_per_round"][0] == NP * N and sum(result.stats["samples_per_round"]) == B * N
    # each round's slice: an even share of what remained, the last one takes the rest
    remainder = (B - NP) * N
    slices = [sum(r["next_samples"] for r in store.read_jsonl(A.plan_file(k))) for k in (1, 2, 3)]
    assert slices == [
        remainder // 3,
        (remainder - remainder // 3) // 2,
        remainder - remainder // 3 - (remainder - remainder // 3) // 2,
    ]
    # each plan counts every sample of the rounds before it, and slots continue each problem's count
    seen = {p.problem_id: NP for p in problems}
    for k in (1, 2, 3):
        plan = {r["problem_id"]: r for r in store.read_jsonl(A.plan_file(k))}
        assert {pid: r["num_samples"] for pid, r in plan.items()} == seen
        got = store.read_jsonl(A.samples_file(k))
        for pid, r in plan.items():
            slots = sorted(s["slot"] for s in got if s["problem_id"] == pid)
            assert slots == list(range(seen[pid], seen[pid] + r["next_samples"]))
            seen[pid] += r["next_samples"]
        # only the problems boundary at this plan receive samples (unless none is)
        if not any(r["fell_back"] for r in plan.values()):
            assert all(r["next_samples"] == 0 for r in plan.values() if r["level"] != "boundary")
    # the training rows come from the problems at the levels of the last plan
    last = {r["problem_id"]: r["level"] for r in store.read_jsonl(A.plan_file(3))}
    assert result.rows and all(last[r["problem_id"]] == "boundary" for r in result.rows)
    assert {pid: d.level.value for pid, d in result.difficulties.items()} == last


def test_a_later_round_can_change_a_level(problems, tmp_path):
    """Re-estimating from more samples moves some problem between levels across the rounds."""
    store, _ = run(problems, tmp_path, resample_rounds=3, resample_levels=("boundary", "hard"))
    levels = [{r["problem_id"]: r["level"] for r in store.read_jsonl(A.plan_file(k))} for k in (1, 2, 3)]
    assert any(levels[0][pid] != levels[-1][pid] for pid in levels[0])


class Dies(ScriptedSampler):
    """Raises on its ``after``-th call, like an engine that dies mid-round."""

    def __init__(self, after: int):
        self.calls, self.after = 0, after

    def generate(self, prompts, num_samples, params):
        self.calls += 1
        if self.calls == self.after:
            raise RuntimeError("killed")
        return super().generate(prompts, num_samples, params)


def test_a_run_stopped_inside_a_later_round_resumes_to_the_same_result(problems, tmp_path):
    _, clean = run(problems, tmp_path / "clean")
    calls_before_round_2 = -(-NP * N // 7) + -(
        -sum(clean.resamples.values()) // 7
    )  # generous: dies in round 2 or 3
    with pytest.raises(RuntimeError, match="killed"):
        run(problems, tmp_path / "killed", sampler=Dies(after=calls_before_round_2 - 2))
    store = A.IterationArtifacts(tmp_path / "killed", 0)
    assert store.has(A.plan_file(2)) and not store.has(A.TRAIN_ROWS)
    resumed_sampler = ScriptedSampler()
    _, resumed = run(problems, tmp_path / "killed", sampler=resumed_sampler)
    assert resumed.rows == clean.rows and resumed.resamples == clean.resamples
    clean_store = A.IterationArtifacts(tmp_path / "clean", 0)
    assert samples(store) == samples(clean_store)
    assert 0 < resumed_sampler.num_generated < B * N  # what was saved was not generated again
    assert A.samples_file(0) not in resumed.stats["phases_computed"]


def test_one_round_is_the_release(problems, tmp_path):
    """``resample_rounds=1``: pre-sampling, then the whole remainder in one round (the golden record's layout)."""
    store, result = run(problems, tmp_path, resample_rounds=1)
    assert store.rounds() == 2
    assert sum(r["next_samples"] for r in store.read_jsonl(A.plan_file(1))) == (B - NP) * N
    assert result.stats["samples_per_round"] == [NP * N, (B - NP) * N]


def test_a_run_directory_of_the_old_layout_is_refused(tmp_path):
    (tmp_path / A.RunManifest.FILE).write_text(json.dumps({"objective": "sft", "seed": 0}))
    with pytest.raises(ValueError, match=r"phase-store format 1.*new `output_dir`"):
        A.RunManifest(tmp_path).check_or_write({"objective": "sft", "seed": 0})
    A.RunManifest(tmp_path / "new").check_or_write({"objective": "sft"})
    assert (
        json.loads((tmp_path / "new" / A.RunManifest.FILE).read_text())["format_version"] == A.FORMAT_VERSION
    )
    A.RunManifest(tmp_path / "new").check_or_write({"objective": "sft"})  # its own layout resumes
