"""Bad input: each case gets a clear error naming the field and the fix before any sampling starts, or a
documented, counted skip; never a crash in the middle of an iteration, never a lost artifact.

docs/reliability.md lists each case beside its test here.
"""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trl_hsstar import artifacts as A
from trl_hsstar.config import HSStarConfig
from trl_hsstar.sampling import Completion, Sampler, validate_request
from trl_hsstar.toy import build_tiny_model, generate_problems, problems_to_dataset_dict
from trl_hsstar.toy.oracle import OracleStepReward
from trl_hsstar.toy.tokenizer import CHARACTERS, SPECIAL_TOKENS, STEP_TOKEN
from trl_hsstar.trainer import HSStarTrainer

N, B, NP = 6, 4, 2


def config(output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        num_iterations=1,
        problems_per_iteration=N,
        sampling_budget=B,
        num_presamples=NP,
        max_completion_length=48,
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        reward_thresholds=[0.25, 0.5],
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return HSStarConfig(**kwargs)


@pytest.fixture(scope="module")
def problems():
    return Dataset.from_dict(problems_to_dataset_dict(generate_problems(N, operands=(2, 4), seed=3)))


def nothing_written(path) -> bool:
    return not path.exists() or not any(path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Refused in the constructor, before the model loads (the model id does not exist: reaching the loader would
# fail differently), with nothing written.

CONSTRUCTOR_CASES = {
    "missing-prompt-column": (
        {"question": ["1+1"], "answer": ["2"]},
        {},
        r"lacks the column\(s\) \['prompt'\]",
    ),
    "missing-answer-column": ({"prompt": ["Q: 1+1\nA: "]}, {}, r"lacks the column\(s\) \['answer'\]"),
    "prompt-of-wrong-type": (
        {"prompt": [17], "answer": ["2"]},
        {},
        r"`prompt` must be a non-empty string or a list of chat messages, got int",
    ),
    "answer-of-wrong-type": (
        {"prompt": ["Q: 1+1\nA: "], "answer": [["2"]]},
        {},
        r"reference answer in `answer` is empty or not a string/number",
    ),
    "empty-dataset": ({"prompt": [], "answer": []}, {}, r"`train_dataset` is empty"),
    "duplicate-problem-ids": (
        {"prompt": ["a", "b"], "answer": ["1", "2"], "id": ["x", "x"]},
        {},
        r"duplicate problem id 'x' \(rows 0 and 1\)",
    ),
    "empty-reference-answer": (
        {"prompt": ["a"], "answer": ["  "]},
        {},
        r"reference answer in `answer` is empty",
    ),
    "every-reference-unreadable": (
        {"prompt": ["a", "b"], "answer": ["\\frac{1}{", "}{"]},
        {"num_iterations": 1},
        r"None of the 2 reference answers .* can be read by the verifier",
    ),
    "too-few-problems-left": (
        {"prompt": ["a", "b", "c"], "answer": ["1", "2", "3"]},
        {"num_iterations": 2, "problems_per_iteration": 2},
        r"has 3 problems, too few for `num_iterations`=2 x `problems_per_iteration`=2",
    ),
    "no-reward-source": (
        {"prompt": ["a"], "answer": ["1"]},
        {"num_iterations": 1, "problems_per_iteration": 1, "reward": None},
        r"needs a reward source: pass `reward_funcs`",
    ),
    "no-thresholds-for-an-unknown-prm": (
        {"prompt": ["a"], "answer": ["1"]},
        {"num_iterations": 1, "problems_per_iteration": 1, "reward_thresholds": None},
        r"`reward_thresholds` \(tau_l, tau_h\) is required",
    ),
}


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=list(CONSTRUCTOR_CASES))
def test_refused_before_the_model_loads(case, tmp_path):
    dataset, overrides, match = CONSTRUCTOR_CASES[case]
    overrides = dict(overrides)
    reward = overrides.pop("reward", OracleStepReward())
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        HSStarTrainer(
            model="no-such-org/no-such-model",
            args=config(out, **overrides),
            train_dataset=Dataset.from_dict(dataset),
            reward_funcs=reward,
        )
    assert nothing_written(out)


CONFIG_CASES = {
    "num_presamples-above-sampling_budget": (
        {"num_presamples": 9},
        r"`num_presamples` \(9\) exceeds `sampling",
    ),
    "thresholds-out-of-order": ({"reward_thresholds": [0.6, 0.2]}, r"tau_l < tau_h"),
    "threshold-above-1": ({"reward_thresholds": [0.1, 1.2]}, r"\[0, 1\]"),
    "threshold-below-0": ({"reward_thresholds": [-0.1, 0.5]}, r"\[0, 1\]"),
    "num_iterations-0": ({"num_iterations": 0}, r"`num_iterations` must be a positive integer, got 0"),
    "sampling_chunk_size-0": (
        {"sampling_chunk_size": 0},
        r"`sampling_chunk_size` must be a positive integer",
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_refused_by_the_config(case, tmp_path):
    overrides, match = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=match):
        config(tmp_path / "out", **overrides)
    assert nothing_written(tmp_path / "out")


def test_an_output_dir_that_cannot_be_written(tmp_path, problems):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"`output_dir` \(.*a-file/out\) cannot be written: .*writable disk"):
        HSStarTrainer(
            model="no-such-org/no-such-model",
            args=config(blocker / "out"),
            train_dataset=problems,
            reward_funcs=OracleStepReward(),
        )
    assert blocker.read_text() == "not a directory"


# ---------------------------------------------------------------------------------------------------------------
# Caught at train() time, before any sampling: nothing of the iteration is written.


def _char_tokenizer_without_step_token() -> PreTrainedTokenizerFast:
    specials = [t for t in SPECIAL_TOKENS if t != STEP_TOKEN]
    vocab = {t: i for i, t in enumerate(specials + CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_a_prm_whose_vocabulary_lacks_the_step_separator(reasoner_dir, problems, tmp_path):
    tok = _char_tokenizer_without_step_token()
    prm = build_tiny_model(
        tok,
        task="token-classification",
        seed=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        intermediate_size=64,
    )
    trainer = HSStarTrainer(
        model=str(reasoner_dir),
        args=config(tmp_path),
        train_dataset=problems,
        reward_funcs=prm,
        reward_processing_classes=tok,
    )
    with pytest.raises(ValueError, match=r"has no '<step>' token.*`reward_step_token`"):
        trainer.train()
    assert not A.IterationArtifacts(tmp_path, 0).dir.exists()


def wrong_length(prompts, completions, **kwargs):
    return [0.5] * (len(completions) + 1)


def not_numbers(prompts, completions, **kwargs):
    return ["good"] * len(completions)


@pytest.mark.parametrize("func", [wrong_length, not_numbers], ids=["wrong-length", "not-numbers"])
def test_a_reward_function_with_the_wrong_output_is_caught_before_sampling(
    func, reasoner_dir, problems, tmp_path
):
    trainer = HSStarTrainer(
        model=str(reasoner_dir), args=config(tmp_path), train_dataset=problems, reward_funcs=func
    )
    with pytest.raises(ValueError, match=rf"failed its check .* reward function '{func.__name__}' returned"):
        trainer.train()
    assert not A.IterationArtifacts(tmp_path, 0).dir.exists()


# ---------------------------------------------------------------------------------------------------------------
# Documented, counted skips: the run completes.


def _run(reasoner_dir, problems, tmp_path, **kwargs):
    args = config(tmp_path, **kwargs.pop("args", {}))
    trainer = HSStarTrainer(model=str(reasoner_dir), args=args, train_dataset=problems, **kwargs)
    trainer.train()
    store = A.IterationArtifacts(tmp_path, 0)
    assert store.done
    stats = store.read_json(A.STATS)
    assert stats["budget_spent"] == stats["budget_planned"] == B * stats["num_problems"]
    return store, stats


def test_unreadable_reference_answers_are_left_out_and_listed(reasoner_dir, problems, tmp_path):
    rows = problems.to_list()
    rows[1]["answer"] = "\\frac{1}{"  # unbalanced: no completion could ever match it
    bad_id = rows[1]["id"]
    data = Dataset.from_list([*rows, {**rows[0], "id": "extra", "prompt": rows[0]["prompt"]}])
    store, _stats = _run(reasoner_dir, data, tmp_path, reward_funcs=OracleStepReward())
    assert bad_id not in {r["problem_id"] for r in store.read_jsonl(A.PROBLEMS)}
    skipped = [json.loads(line) for line in (tmp_path / "skipped_problems.jsonl").read_text().splitlines()]
    assert [s["problem_id"] for s in skipped] == [bad_id]
    assert json.loads((tmp_path / A.RunManifest.FILE).read_text())["problems_skipped"] == 1


def nan_for_long(prompts, completions, **kwargs):
    scores = OracleStepReward()(prompts, completions, **kwargs)
    return [float("nan") if len(c) > 20 else s for c, s in zip(completions, scores)]


def none_for_long(prompts, completions, **kwargs):
    scores = OracleStepReward()(prompts, completions, **kwargs)
    return [None if len(c) > 20 else s for c, s in zip(completions, scores)]


@pytest.mark.parametrize("func", [nan_for_long, none_for_long], ids=["nan", "none"])
def test_nan_or_none_scores_count_as_unscored(func, reasoner_dir, problems, tmp_path):
    store, stats = _run(reasoner_dir, problems, tmp_path, reward_funcs=func)
    scores = store.read_jsonl(A.scored_file(0)) + store.read_jsonl(A.scored_file(1))
    missing = sum(s["reward"] is None for s in scores)
    assert missing > 0 and stats["scores_missing"] == missing


class HostileSampler(Sampler):
    """A user sampler (the plug-in interface) whose completions include empty and one-megabyte ones."""

    name = "hostile"

    def generate(self, prompts, num_samples, params):
        validate_request(prompts, num_samples, params)
        texts = ["", "1+1=2\n\n" * 150_000 + "The answer is \\boxed{-7}.", "x" * 1_000_000, "   "]
        out = [
            [Completion(texts[(i + j) % len(texts)], 1, "length") for j in range(n)]
            for i, n in enumerate(num_samples)
        ]
        self._record(out, 0.0)
        return out


@pytest.mark.slow
def test_empty_and_one_megabyte_completions(reasoner_dir, problems, tmp_path):
    store, stats = _run(
        reasoner_dir,
        problems,
        tmp_path,
        reward_funcs=OracleStepReward(),
        sampler=HostileSampler(),
        args={"verifier_timeout": 2.0},
    )
    samples = store.read_jsonl(A.samples_file(0)) + store.read_jsonl(A.samples_file(1))
    assert stats["empty_completions"] == sum(not s["completion"].strip() for s in samples) > 0
    assert max(len(s["completion"]) for s in samples) >= 1_000_000
    assert not any(s["correct"] for s in samples)  # none of them answers its problem


def test_a_tokenizer_without_a_pad_token(reasoner_dir, problems, tmp_path):
    """Sampling pads with EOS; training uses what TRL sets. The run completes with the budget exact."""
    tok = AutoTokenizer.from_pretrained(reasoner_dir)
    tok.pad_token = None
    assert tok.pad_token_id is None
    store, _stats = _run(
        reasoner_dir, problems, tmp_path, reward_funcs=OracleStepReward(), processing_class=tok
    )
    samples = store.read_jsonl(A.samples_file(0))
    assert any(s["correct"] for s in samples), "padding with EOS must not garble the prompts"
    assert store.has(A.MODEL)
