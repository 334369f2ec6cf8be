"""Training a Math-Shepherd-layout PRM: the layout the scorer reads, and a training run that learns."""

from __future__ import annotations

import pytest
import torch

from trl_hsstar.prm import prm_examples, train_prm
from trl_hsstar.rewards import ProcessRewardModel
from trl_hsstar.toy import STEP_TOKEN, build_char_tokenizer, build_tiny_model, generate_problems
from trl_hsstar.toy.problems import label_steps

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, intermediate_size=64)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def wrong(p):
    steps = p.steps()
    a, rhs = steps[0].split("=")
    steps[0] = f"{a}={int(rhs) + 1}"
    return "\n\n".join([*steps, f"The answer is \\boxed{{{p.answer}}}."])


def test_labels_sit_where_the_scorer_reads(tok):
    problems = generate_problems(6, operands=(2, 4), seed=3)
    completions = [p.rationale() if i % 2 else wrong(p) for i, p in enumerate(problems)]
    labels = [label_steps(p, c) for p, c in zip(problems, completions)]
    rows = prm_examples(tok, [p.prompt for p in problems], completions, labels, step_token=STEP_TOKEN)
    scorer = ProcessRewardModel(
        build_tiny_model(tok, task="token-classification", **SMALL), tok, step_token=STEP_TOKEN
    )
    step_id = tok.convert_tokens_to_ids(STEP_TOKEN)
    for row, p, c, lab in zip(rows, problems, completions, labels):
        ids, positions = scorer._encode(p.prompt, c.split("\n\n"))
        assert row["input_ids"] == ids  # the same sequence the scorer builds
        assert [i for i, x in enumerate(row["labels"]) if x != -100] == positions
        assert all(row["input_ids"][i] == step_id for i in positions)
        assert [row["labels"][i] for i in positions] == [int(x) for x in lab]
    assert any(0 in r["labels"] for r in rows) and any(1 in r["labels"] for r in rows)


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match="same length"):
        prm_examples(tok, ["a"], [], [], step_token=STEP_TOKEN)
    with pytest.raises(ValueError, match="2 step labels for 1 steps"):
        prm_examples(tok, ["a"], ["1+1=2"], [[True, True]], step_token=STEP_TOKEN)
    with pytest.raises(ValueError, match="no single token for step separator '<nope>'"):
        prm_examples(tok, ["a"], ["1+1=2"], [[True]], step_token="<nope>")
    with pytest.raises(ValueError, match="at least 2"):
        train_prm(None, tok, [], output_dir="unused")


def test_training_learns_a_signal_visible_at_the_step_token(tok, tmp_path):
    """Label = "the step's result is even": visible from the token just before each step token."""
    problems = generate_problems(400, operands=(2, 3), seed=0)
    completions = [p.rationale() for p in problems]
    labels = [[int(s.split("=")[1]) % 2 == 0 for s in p.steps()] + [p.answer % 2 == 0] for p in problems]
    labels = [lab[: len(c.split("\n\n"))] for lab, c in zip(labels, completions)]
    rows = prm_examples(tok, [p.prompt for p in problems], completions, labels, step_token=STEP_TOKEN)
    model = build_tiny_model(tok, task="token-classification", **SMALL)
    metrics = train_prm(
        model, tok, rows, output_dir=str(tmp_path), num_train_epochs=4, learning_rate=3e-3, disable_tqdm=True
    )
    assert metrics["num_eval"] == 80 and metrics["num_train"] == 320
    majority = max(metrics["eval_positive_rate"], 1 - metrics["eval_positive_rate"])
    assert metrics["eval_step_accuracy"] > majority + 0.1, metrics
    # and the trained model scores through the HS-STaR reward source
    scorer = ProcessRewardModel(model, tok, step_token=STEP_TOKEN)
    with torch.no_grad():
        rewards = scorer.step_rewards([problems[0].prompt], [completions[0]])[0]
    assert len(rewards) == len(labels[0])
