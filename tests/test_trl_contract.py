"""TRL's contract kept: reward functions called as GRPOTrainer calls them, one run-wide step for trackers and
checkpoints, the Hub (one model folder and its card per iteration end at most).

The runs use the scripted sampler (the same completions on every CPU) and the shipped toy reasoner.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import TrainerState

from trl_hsstar import artifacts as A
from trl_hsstar.config import HSStarConfig
from trl_hsstar.recipe import TRL_REWARDS, load_reward_func
from trl_hsstar.rewards import combine_rewards
from trl_hsstar.sampling import Completion, Sampler, SamplingParams, validate_request
from trl_hsstar.scoring import RunRewards
from trl_hsstar.toy import generate_problems, problems_to_dataset_dict
from trl_hsstar.toy.oracle import OracleStepReward
from trl_hsstar.trainer import HSStarTrainer

sys.path.insert(0, str(Path(__file__).parent))
from helpers.scripted import ScriptedSampler


def config(output_dir, **overrides) -> HSStarConfig:
    kwargs = dict(
        output_dir=str(output_dir),
        num_iterations=1,
        problems_per_iteration=8,
        sampling_budget=6,
        num_presamples=3,
        max_completion_length=64,
        per_device_train_batch_size=4,
        reward_thresholds=[0.25, 0.5],
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=3,
    )
    kwargs.update(overrides)
    return HSStarConfig(**kwargs)


def scripted_trainer(reasoner_dir, output_dir, n: int = 16, **overrides) -> HSStarTrainer:
    """A trainer on ``n`` toy problems with the scripted sampler and the exact step checker as reward."""
    return HSStarTrainer(
        model=str(reasoner_dir),
        args=config(output_dir, **overrides),
        train_dataset=problems(n),
        reward_funcs=OracleStepReward(),
        sampler=ScriptedSampler(),
    )


def problems(n: int = 8, answer_column: str = "answer") -> Dataset:
    data = Dataset.from_dict(problems_to_dataset_dict(generate_problems(n, operands=(2, 6), seed=11)))
    data = data.add_column("source", ["toy"] * n)
    return data.rename_column("answer", answer_column) if answer_column != "answer" else data


# ---------------------------------------------------------------------------------------------------------------
# Reward functions, exactly as GRPOTrainer calls them


def test_trl_accuracy_reward_reads_the_solution_column():
    from trl.rewards import accuracy_reward

    rewards = RunRewards([accuracy_reward], None, None, config("unused", answer_column="solution"))
    score = rewards.score_fn("cpu")
    prompts = [[{"role": "user", "content": "What is 1/3 + 0?"}]] * 2
    completions = [
        [{"role": "assistant", "content": r"My answer is \boxed{\frac{1}{3}}"}],
        [{"role": "assistant", "content": r"My answer is \boxed{\frac{1}{2}}"}],
    ]
    assert score(prompts, completions, solution=[r"\frac{1}{3}"] * 2) == [1.0, 0.0]


# TRL's documented examples, unchanged (docs: "Using a custom reward function")
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


def test_trls_documented_reward_functions_run_unchanged(reasoner_dir, tmp_path):
    trainer = HSStarTrainer(
        model=str(reasoner_dir),
        args=config(tmp_path, answer_column="ground_truth", difficulty_estimator="reward"),
        train_dataset=problems(answer_column="ground_truth"),
        reward_funcs=[reward_func, reward_len],
        reward_weights=[1.0, 0.0],  # reward_len runs (a positional call would fail) but does not move S(r)
        sampler=ScriptedSampler(),
    )
    trainer.train()
    store = A.IterationArtifacts(tmp_path, 0)
    scored = store.read_jsonl(A.scored_file(0)) + store.read_jsonl(A.scored_file(1))
    # the scripted wrong answers are off by one, so the exact match of the boxed answer is the verdict
    assert [s["reward"] for s in scored] == [float(s["correct"]) for s in scored]
    assert {0.0, 1.0} <= {s["reward"] for s in scored}
    assert store.read_json(A.STATS)["scores_missing"] == 0


class Recorder:
    """A reward function that keeps what it was called with."""

    __name__ = "recorder"

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        kwargs["log_metric"](
            "mean_length", sum(len(c) for c in kwargs["completions"]) / len(kwargs["completions"])
        )
        kwargs["log_extra"]("length", [len(c) for c in kwargs["completions"]])
        return [0.5] * len(kwargs["completions"])


def test_a_reward_function_gets_grpos_keyword_arguments(reasoner_dir, tmp_path):
    recorder = Recorder()
    data = problems()
    trainer = HSStarTrainer(
        model=str(reasoner_dir),
        args=config(tmp_path, report_to="tensorboard"),
        train_dataset=data,
        reward_funcs=recorder,
        sampler=ScriptedSampler(),
    )
    trainer.train()
    call = recorder.calls[-1]  # keyword-only __call__: a positional call would have raised
    assert set(call) == {
        "prompts",
        "completions",
        "completion_ids",
        "trainer_state",
        "log_extra",
        "log_metric",
        *data.column_names,
    } - {"prompt"}
    assert call["source"] == ["toy"] * len(call["completions"])  # every column under its own name
    tokenizer = trainer.processing_class
    assert call["completion_ids"] == [
        tokenizer(c, add_special_tokens=False)["input_ids"] for c in call["completions"]
    ]
    assert isinstance(call["trainer_state"], TrainerState)
    stats = A.IterationArtifacts(tmp_path, 0).read_json(A.STATS)
    assert stats["reward_metrics"]["mean_length"] > 0  # log_metric reaches the iteration's figures
    table = _tensorboard_text(tmp_path, "hsstar/completions/text_summary")
    header, _, first = table.splitlines()[:3]
    assert header.endswith("| length |")  # log_extra's column, in the completions table
    completion = first.split(" | ")[2].replace("<br>", "\n")
    assert first.endswith(f"| {len(completion)} |")


def _tensorboard_text(output_dir, tag: str) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (logdir,) = (output_dir / "runs").iterdir()  # transformers' default: output_dir/runs/<date>_<host>
    events = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    events.Reload()
    return events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()


def nan_for_short(prompts, completions, **kwargs):
    return [float("nan") if len(c) < 40 else 1.0 for c in completions]


def test_one_nan_policy_whatever_the_number_of_sources():
    args = config("unused")
    half = lambda prompts, completions, **kw: [0.5] * len(completions)  # noqa: E731
    prompts, completions = ["p", "p"], ["short", "x" * 50]
    one = RunRewards([nan_for_short], None, None, args).score_fn("cpu")
    two = RunRewards([nan_for_short, half], None, [1.0, 1.0], args).score_fn("cpu")
    assert one(prompts, completions) == [None, 1.0]  # NaN means "cannot score", as None does
    assert two(prompts, completions) == [0.5, 1.5]  # the other source still counts; nothing aborts
    assert combine_rewards([nan_for_short])(prompts=prompts, completions=completions) == [None, 1.0]


def test_reward_names_resolve_as_in_trls_grpo_script(tmp_path, monkeypatch):
    import trl.rewards

    for name in TRL_REWARDS:
        assert callable(load_reward_func(name, max_completion_length=64))
    assert load_reward_func("accuracy_reward") is trl.rewards.accuracy_reward
    assert load_reward_func("trl.rewards.think_format_reward") is trl.rewards.think_format_reward
    assert isinstance(load_reward_func("oracle"), OracleStepReward)
    (tmp_path / "my_rewards.py").write_text(
        "def correctness(completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)  # a rewards file beside the YAML, as TRL's scripts import it
    assert load_reward_func("my_rewards.correctness").__name__ == "correctness"
    assert load_reward_func("my_rewards:correctness").__name__ == "correctness"
    with pytest.raises(ValueError, match=r"accuracy_reward.*import path"):
        load_reward_func("acuracy_reward")
    with pytest.raises(ValueError, match="cannot be imported"):
        load_reward_func("my_rewards.missing")


# ---------------------------------------------------------------------------------------------------------------
# One run-wide step: trackers, log history, checkpoint names


def test_steps_run_on_across_iterations_in_tensorboard_and_checkpoints(reasoner_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = scripted_trainer(
        reasoner_dir,
        tmp_path,
        num_iterations=2,
        report_to="tensorboard",
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=3,
    )
    output = trainer.train()
    steps = [s["train_steps"] for s in trainer.iteration_stats]
    assert all(n >= 2 for n in steps), steps  # both iterations train, for more than one step
    assert output.global_step == trainer.state.global_step == sum(steps)

    (logdir,) = (tmp_path / "runs").iterdir()  # transformers' default: output_dir/runs/<date>_<host>
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    loss_steps = [e.step for e in events.Scalars("train/loss")]
    assert loss_steps == list(range(1, sum(steps) + 1))  # one curve: no step logged twice
    iteration_steps = [e.step for e in events.Scalars("train/hsstar/rows")]
    assert iteration_steps == [steps[0], sum(steps)]  # each iteration's figures at the step it ended on
    assert "hsstar/completions/text_summary" in events.Tags()["tensors"]  # the completions table

    history = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert history == loss_steps  # the log history keeps every pass
    checkpoints = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert checkpoints == list(range(sum(steps) - 2, sum(steps) + 1))  # run-wide names, the newest 3 kept
    assert not list(tmp_path.glob("iteration-*/pass"))  # the passes' own folders are gone


# ---------------------------------------------------------------------------------------------------------------
# The Hub, without a network: what would be uploaded, and the card


class FakeHub:
    """Records ``HfApi.create_repo`` / ``upload_folder`` calls (same signatures; no network here)."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoUrl

        self.uploads: list[dict] = []

        def create_repo(api, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, allow_patterns=None, run_as_future=False, **kwargs):
            from concurrent.futures import Future
            from pathlib import Path

            files = sorted(
                p.relative_to(folder_path).as_posix()
                for p in Path(folder_path).rglob("*")
                if p.is_file()
                and (allow_patterns is None or p.relative_to(folder_path).as_posix() in allow_patterns)
            )
            card = (Path(folder_path) / "README.md").read_text() if "README.md" in files else None
            self.uploads.append(
                {"repo_id": repo_id, "folder": str(folder_path), "files": files, "card": card}
            )
            if run_as_future:
                future = Future()
                future.set_result("commit")
                return future
            return "commit"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_to_hub_uploads_each_iterations_model_once_with_its_card(reasoner_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    trainer = scripted_trainer(
        reasoner_dir, tmp_path, num_iterations=2, push_to_hub=True, hub_model_id="me/toy-hsstar"
    )
    trainer.train()
    trainer.save_model(str(tmp_path))  # as TRL scripts end; the last model is on the Hub already
    trainer.push_to_hub()
    assert [u["folder"] for u in hub.uploads] == [
        str(A.IterationArtifacts(tmp_path, t).model_dir) for t in (0, 1)
    ]  # once per iteration end, never the whole output_dir
    for upload in hub.uploads:
        assert upload["repo_id"] == "me/toy-hsstar"
        assert "config.json" in upload["files"] and "README.md" in upload["files"]
        assert any(f.endswith(".safetensors") for f in upload["files"])
        assert not [f for f in upload["files"] if ".cache" in f or "partial" in f or f.endswith(".jsonl")]
    card = hub.uploads[-1]["card"]
    assert "HS-STaR" in card and "arxiv.org/abs/2505.19866" in card and "xiong-etal-2025-hs" in card
    assert f"base_model: {reasoner_dir}" in card and "oracle_step_reward" in card
    stats = trainer.iteration_stats
    for s in stats:  # each iteration's figures
        lv = s["levels"]
        assert (
            f"| {s['iteration']} | {lv['easy']}/{lv['boundary']}/{lv['hard']} | {s['budget_spent']}/" in card
        )
    assert json.loads((tmp_path / "iteration-1" / "stats.json").read_text())["rows"] == stats[1]["rows"]
    assert not math.isnan(stats[1]["sample_accuracy"])


def test_hub_strategy_end_pushes_after_the_last_iteration_only(reasoner_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    trainer = scripted_trainer(
        reasoner_dir, tmp_path, num_iterations=2, push_to_hub=True, hub_model_id="me/x", hub_strategy="end"
    )
    trainer.train()
    assert [u["folder"] for u in hub.uploads] == [str(A.IterationArtifacts(tmp_path, 1).model_dir)]


# ---------------------------------------------------------------------------------------------------------------
# GRPO's sampling knobs reach the sampler and the chat template


class RecordingSampler(Sampler):
    """Records each request (prompts and params) and answers every prompt with a wrong boxed answer."""

    name = "recording"

    def __init__(self):
        super().__init__()
        self.requests: list[tuple[list[str], SamplingParams]] = []

    def generate(self, prompts, num_samples, params):
        validate_request(prompts, num_samples, params)
        self.requests.append((list(prompts), params))
        out = [[Completion("The answer is \\boxed{-1}.", 8, "stop")] * n for n in num_samples]
        self._record(out, 0.0)
        return out


def test_chat_template_kwargs_and_sampling_knobs_reach_generation(reasoner_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reasoner_dir))
    tokenizer.chat_template = (  # as Qwen3's template reads enable_thinking
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %} /no_think{% endif %}"
    )
    data = problems(8)
    data = data.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    sampler = RecordingSampler()
    HSStarTrainer(
        model=str(reasoner_dir),
        args=config(
            tmp_path,
            difficulty_estimator="accuracy",
            chat_template_kwargs='{"enable_thinking": false}',  # a dict, or its JSON from a command line
            top_k=5,
            min_p=0.1,
            generation_kwargs={"no_repeat_ngram_size": 3},
        ),
        train_dataset=data,
        processing_class=tokenizer,
        sampler=sampler,
    ).train()
    prompts, params = sampler.requests[0]
    assert prompts and all(p.endswith(" /no_think") for p in prompts)
    assert (params.top_k, params.min_p, params.generation_kwargs) == (5, 0.1, {"no_repeat_ngram_size": 3})
