"""``hsstar eval`` (the metrics, the breakdowns, the files) and the loop's "no silent zero" counters."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import pytest
from datasets import Dataset, load_dataset

from trl_hsstar import artifacts as A
from trl_hsstar.cli import main as cli_main
from trl_hsstar.evaluation import evaluate, load_problems, markdown_table, pass_at_k
from trl_hsstar.pipeline import PipelineSettings, run_iteration
from trl_hsstar.records import Problem
from trl_hsstar.sampling import Completion, Sampler, SamplingParams, validate_request
from trl_hsstar.toy import generate_problems, problems_to_dataset_dict
from trl_hsstar.verify import MathVerifier

sys.path.insert(0, str(Path(__file__).parent))
from helpers.scripted import ScriptedSampler

GSM8K = Path(__file__).parent / "data" / "gsm8k_test_20.jsonl"


def test_pass_at_k_is_the_unbiased_estimate():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(8, 0, 4) == 0.0 and pass_at_k(8, 5, 4) == 1.0
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 16)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError, match="0 < k <= n"):
        pass_at_k(4, 1, 5)


@pytest.fixture(scope="module")
def toy_problems():
    toy = generate_problems(30, operands=(2, 6), seed=2)
    return [Problem(p.id, p.prompt, p.prompt, str(p.answer), {"level": f"{p.num_operands}x1"}) for p in toy]


def test_evaluate_counts_what_the_samples_say(toy_problems):
    """The scripted sampler's problems have fixed skills; the figures must follow the verdicts exactly."""
    rows, summary = evaluate(toy_problems, ScriptedSampler(), k=4, group_by="level", max_new_tokens=64)
    assert len(rows) == summary["num_problems"] == 30
    for row in rows:
        c = sum(s["correct"] for s in row["samples"])
        assert row["avg@4"] == c / 4 and row["pass@1"] == pytest.approx(c / 4)
        assert row["pass@4"] == float(c > 0) and row["pass@2"] >= row["pass@1"]
        answers = [s["answer"] for s in row["samples"]]
        top = (
            max(set(answers), key=answers.count)
            if answers.count(max(set(answers), key=answers.count)) > 2
            else None
        )
        if top is not None:  # a clear majority: maj@4 is that answer's verdict
            assert row["maj@4"] == float(any(s["correct"] for s in row["samples"] if s["answer"] == top))
    for key in ("greedy", "avg@4", "pass@1", "pass@2", "pass@4", "maj@4"):
        assert summary[key] == pytest.approx(
            sum(r[key] if "@" in key else r["greedy"]["correct"] for r in rows) / 30
        )
    assert 0 < summary["avg@4"] < summary["pass@4"] < 1  # some problems solved sometimes
    groups = summary["by_group"]
    assert sum(g["num_problems"] for g in groups.values()) == 30
    for level, stats in groups.items():
        mine = [r for r in rows if r["group"] == level]
        assert stats["avg@4"] == pytest.approx(sum(r["avg@4"] for r in mine) / len(mine))
    table = markdown_table(summary)
    assert table.splitlines()[2].startswith("| all | 30 |") and len(table.splitlines()) == 3 + len(groups)


def test_gsm8k_problems_load_with_their_answers(tmp_path):
    problems = load_problems(str(GSM8K), limit=5)
    assert len(problems) == 5 and problems[0].answer.endswith("#### 18")
    assert problems[0].prompt_text.startswith("Janet")
    # the verifier reads GSM8K's answers: a completion boxing 18 is right
    with MathVerifier() as verify:
        assert verify("so \\boxed{18}", problems[0].answer) and not verify("\\boxed{17}", problems[0].answer)
    with pytest.raises(ValueError, match="--question-column"):
        load_problems(str(GSM8K), question_column="problem")


def test_hsstar_eval_writes_rows_and_a_summary_that_datasets_loads(reasoner_dir, tmp_path, capsys):
    data = tmp_path / "toy.jsonl"
    toy = problems_to_dataset_dict(generate_problems(12, operands=(2, 4), seed=7))
    Dataset.from_dict({**toy, "level": [f"{len(p.split('+'))}" for p in toy["id"]]}).to_json(str(data))
    out = tmp_path / "eval"
    cli_main(
        [
            "eval",
            "--model",
            str(reasoner_dir),
            "--dataset",
            str(data),
            "--question-column",
            "prompt",
            "--k",
            "2",
            "--max-new-tokens",
            "48",
            "--chat",
            "no",
            "--system-prompt",
            "",
            "--group-by",
            "level",
            "--output-dir",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "| all | 12 |" in printed and "pass@2" in printed
    rows = load_dataset("json", data_files=str(out / "eval_rows.jsonl"), split="train")
    summary = json.loads((out / "eval_summary.json").read_text())
    assert len(rows) == 12 and summary["num_problems"] == 12 and summary["greedy"] > 0  # the tiny model sums
    assert len(rows[0]["samples"]) == 2 and set(summary["by_group"]) == set(rows["group"])


class FreeText(Sampler):
    """An instruct model's habit: the right sum in words, never boxed."""

    name = "free-text"

    def generate(self, prompts, num_samples, params):
        validate_request(prompts, num_samples, params)
        start = time.monotonic()
        out = []
        for prompt, n in zip(prompts, num_samples):
            expression = prompt.split("Q: ")[-1].split("\n")[0]
            total = sum(int(t) for t in expression.replace("-", "+-").split("+") if t)
            out.append([Completion(f"{expression} = {total}", 4, "stop") for _ in range(n)])
        self._record(out, time.monotonic() - start)
        return out


def test_a_run_whose_completions_hold_no_answer_says_so(tmp_path, caplog):
    toy = generate_problems(6, operands=(2, 3), seed=1)
    problems = [Problem(p.id, p.prompt, p.prompt, str(p.answer)) for p in toy]
    settings = PipelineSettings(
        budget=4, num_presamples=2, difficulty_estimator="accuracy", sampling=SamplingParams(seed=1)
    )
    with MathVerifier() as strict:
        result = run_iteration(
            problems,
            store=A.IterationArtifacts(tmp_path / "strict", 0),
            sampler=FreeText(),
            verifier=strict,
            score_fn=None,
            settings=settings,
        )
    stats = result.stats
    assert stats["no_answer"] == stats["budget_spent"] == 24 and stats["sample_accuracy"] == 0
    assert any(
        "hold no answer the verifier can read" in w and "last_number_fallback" in w for w in stats["warnings"]
    )
    assert any("hold no answer" in r.message for r in caplog.records)
    # the fix it names works: the last number is the answer, and the run sees its right answers
    with MathVerifier(last_number_fallback=True) as lenient:
        fixed = run_iteration(
            problems,
            store=A.IterationArtifacts(tmp_path / "lenient", 0),
            sampler=FreeText(),
            verifier=lenient,
            score_fn=None,
            settings=settings,
        ).stats
    assert fixed["no_answer"] == 0 and fixed["sample_accuracy"] == 1 and fixed["warnings"] == []


def test_training_evaluates_the_held_out_problems_before_and_after_each_iteration(reasoner_dir, tmp_path):
    from trl_hsstar.config import HSStarConfig
    from trl_hsstar.trainer import HSStarTrainer

    toy = generate_problems(30, operands=(2, 4), seed=3)
    train = Dataset.from_dict(problems_to_dataset_dict(toy[:24]))
    held_out = Dataset.from_dict(problems_to_dataset_dict(toy[24:]))
    args = HSStarConfig(
        output_dir=str(tmp_path),
        num_iterations=2,
        sampling_budget=4,
        num_presamples=2,
        difficulty_estimator="accuracy",
        eval_num_samples=2,
        max_completion_length=48,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = HSStarTrainer(model=str(reasoner_dir), args=args, train_dataset=train, eval_dataset=held_out)
    trainer.train()
    initial = json.loads((tmp_path / "eval-initial" / "eval_summary.json").read_text())
    assert initial["num_problems"] == 6 and 0 < initial["greedy"] <= 1 and "pass@2" in initial
    for t, stats in enumerate(trainer.iteration_stats):
        assert stats["eval"]["num_problems"] == 6 and set(stats["eval"]) >= {
            "greedy",
            "avg@2",
            "pass@2",
            "maj@2",
        }
        rows = load_dataset("json", data_files=str(tmp_path / f"iteration-{t}" / "eval" / "eval_rows.jsonl"))
        assert len(rows["train"]) == 6
    logged = [entry for entry in trainer.state.log_history if "eval/greedy" in entry]
    assert logged and logged[-1]["eval/greedy"] == trainer.iteration_stats[-1]["eval"]["greedy"]
    with pytest.raises(ValueError, match="`eval_dataset` lacks the column"):
        HSStarTrainer(
            model=str(reasoner_dir),
            args=args,
            train_dataset=train,
            eval_dataset=held_out.remove_columns("answer"),
        )
