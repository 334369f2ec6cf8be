"""The golden record: with the release's settings the loop makes exactly these levels, allocations, samples and
training rows, for SFT and DPO and each allocation rule.

The record (``tests/golden/loop.json``) was written before the seam was redesigned, by this test with
``HSSTAR_WRITE_GOLDEN=1``. It is the same on every CPU: the sampler is scripted (no model generates), the reward is
the toy world's exact step checker and the verifier is exact; only the training passes touch a model, and nothing
recorded depends on them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from trl_hsstar import artifacts as A
from trl_hsstar.config import HSStarConfig, HSStarDPOConfig
from trl_hsstar.toy import generate_problems, problems_to_dataset_dict
from trl_hsstar.toy.oracle import OracleStepReward
from trl_hsstar.trainer import HSStarDPOTrainer, HSStarTrainer

sys.path.insert(0, str(Path(__file__).parent))
from helpers.scripted import ScriptedSampler

GOLDEN = Path(__file__).parent / "golden" / "loop.json"
CASES = [
    (objective, allocation)
    for objective in ("sft", "dpo")
    for allocation in ("hsstar", "uniform", "prop2diff", "band")
]


def record(output_dir: Path, iterations: int) -> list[dict]:
    """What the loop decided and produced in each iteration, read from its files."""
    out = []
    for t in range(iterations):
        store = A.IterationArtifacts(output_dir, t)
        assert store.rounds() == 2  # the release: pre-sampling and one re-sampling round
        plan = store.read_jsonl(A.plan_file(1))
        samples = store.read_jsonl(A.scored_file(0)) + store.read_jsonl(A.scored_file(1))
        out.append(
            {
                "problems": [p["problem_id"] for p in store.read_jsonl(A.PROBLEMS)],
                "levels": {r["problem_id"]: [r["level"], r["phi_a"], r["phi_r"]] for r in plan},
                "allocation": {r["problem_id"]: r["next_samples"] for r in plan},
                "samples": {s["sample_id"]: [s["completion"], s["correct"], s["reward"]] for s in samples},
                "rows": store.read_jsonl(A.TRAIN_ROWS),
            }
        )
    return out


def run(objective: str, allocation: str, output_dir: Path, reasoner_dir) -> list[dict]:
    problems = Dataset.from_dict(problems_to_dataset_dict(generate_problems(24, operands=(2, 6), seed=11)))
    cls, trainer_cls = (
        (HSStarConfig, HSStarTrainer) if objective == "sft" else (HSStarDPOConfig, HSStarDPOTrainer)
    )
    args = cls(
        output_dir=str(output_dir),
        num_iterations=2,
        problems_per_iteration=12,
        sampling_budget=8,
        num_presamples=3,
        allocation=allocation,
        max_completion_length=64,
        per_device_train_batch_size=16,
        reward_thresholds=[0.25, 0.5],
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        sampling_chunk_size=10,
        seed=3,
    )
    trainer = trainer_cls(
        model=str(reasoner_dir),
        args=args,
        train_dataset=problems,
        reward_funcs=OracleStepReward(),
        sampler=ScriptedSampler(),
    )
    trainer.train()
    return record(output_dir, 2)


@pytest.mark.parametrize("objective,allocation", CASES)
def test_the_loop_matches_its_golden_record(objective, allocation, reasoner_dir, tmp_path):
    got = json.loads(json.dumps(run(objective, allocation, tmp_path / "run", reasoner_dir)))
    key = f"{objective}/{allocation}"
    if os.environ.get("HSSTAR_WRITE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[key] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())[key]
    for t, (g, w) in enumerate(zip(got, want)):
        for part in ("problems", "levels", "allocation", "samples", "rows"):
            assert g[part] == w[part], f"iteration {t}: {part} changed"
    assert len(got) == len(want)


def test_the_record_is_not_trivial():
    """Every case has boundary problems, re-samples where its rule puts them, and rows to train on."""
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(f"{o}/{a}" for o, a in CASES)
    for key, iterations in golden.items():
        for it in iterations:
            levels = [v[0] for v in it["levels"].values()]
            assert {"easy", "boundary", "hard"} <= set(levels), key
            assert len(it["samples"]) == 8 * 12 and it["rows"], key
            if not key.endswith("uniform"):
                assert sum(it["allocation"].values()) == 5 * 12, key
