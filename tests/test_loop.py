"""The HS-STaR loop end to end on the toy world: both trainers, artifacts, resume, callbacks, LoRA, QLoRA."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from trl_hsstar import artifacts as A
from trl_hsstar.callbacks import HSStarCallback
from trl_hsstar.config import HSStarConfig, HSStarDPOConfig
from trl_hsstar.sampling import TransformersSampler
from trl_hsstar.toy import generate_problems, problems_to_dataset_dict
from trl_hsstar.toy.oracle import OracleStepReward
from trl_hsstar.trainer import HSStarDPOTrainer, HSStarTrainer
from trl_hsstar.verify import MathVerifier

N, B, NP = 12, 4, 2  # problems per iteration, budget, pre-samples


@pytest.fixture(scope="module")
def problems():
    return Dataset.from_dict(problems_to_dataset_dict(generate_problems(2 * N, operands=(2, 6), seed=5)))


@pytest.fixture(scope="module")
def answers(problems):
    return dict(zip(problems["id"], problems["answer"]))


def load(reasoner_dir):
    return AutoModelForCausalLM.from_pretrained(reasoner_dir), AutoTokenizer.from_pretrained(reasoner_dir)


def config(cls, output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        num_iterations=2,
        problems_per_iteration=N,
        sampling_budget=B,
        num_presamples=NP,
        max_completion_length=64,
        generation_batch_size=64,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        reward_thresholds=[0.25, 0.5],
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


class CountingSampler(TransformersSampler):
    """The real sampler, counting its calls and samples."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.samples = 0

    def generate(self, prompts, num_samples, params):
        self.calls += 1
        self.samples += sum(num_samples)
        return super().generate(prompts, num_samples, params)


def check_iteration(output_dir, t, answers, objective):
    store = A.IterationArtifacts(output_dir, t)
    phases = [
        A.PROBLEMS,
        A.samples_file(0),
        A.scored_file(0),
        A.plan_file(1),
        A.samples_file(1),
        A.scored_file(1),
    ]
    for name in [*phases, A.TRAIN_ROWS, A.STATS, A.MODEL, A.DONE]:
        assert store.has(name), f"iteration-{t} lacks {name}"
    assert store.completed_phases() == [*phases, A.TRAIN_ROWS, A.STATS, A.MODEL, A.DONE]
    pres, res = store.read_jsonl(A.samples_file(0)), store.read_jsonl(A.samples_file(1))
    levels = {r["problem_id"]: r for r in store.read_jsonl(A.plan_file(1))}
    # the budget spent equals B x N exactly
    assert len(pres) + len(res) == B * N
    # every (problem, slot) once; slots contiguous per problem
    ids = [s["sample_id"] for s in pres + res]
    assert len(set(ids)) == len(ids)
    for pid, lv in levels.items():
        slots = sorted(s["slot"] for s in pres + res if s["problem_id"] == pid)
        assert slots == list(range(NP + lv["next_samples"]))
    # only boundary problems received re-samples (unless no problem was boundary: then all, evenly)
    fell_back = next(iter(levels.values()))["fell_back"]
    if not fell_back:
        assert all(lv["next_samples"] == 0 for lv in levels.values() if lv["level"] != "boundary")
    assert sum(lv["next_samples"] for lv in levels.values()) == (B - NP) * N
    # every SFT row verifies; every DPO pair has a correct chosen and an incorrect rejected response
    rows = store.read_jsonl(A.TRAIN_ROWS)
    with MathVerifier() as verify:
        for row in rows:
            answer = answers[row["problem_id"]]
            assert levels[row["problem_id"]]["level"] == "boundary"
            if objective == "sft":
                assert verify(row["completion"], answer)
            else:
                assert verify(row["chosen"], answer) and not verify(row["rejected"], answer)
    stats = store.read_json(A.STATS)
    assert stats["budget_spent"] == stats["budget_planned"] == B * N
    assert stats["rows"] == len(rows)
    # every file reloads: JSON Lines through datasets, the model through transformers
    for name in phases:
        assert len(load_dataset("json", data_files=str(store.path(name)), split="train")) > 0
    if rows:
        assert len(load_dataset("json", data_files=str(store.path(A.TRAIN_ROWS)), split="train")) == len(rows)
    return rows, stats


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_two_iterations_end_to_end(reasoner_dir, problems, answers, tmp_path, objective):
    model, tok = load(reasoner_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if objective == "sft":
        trainer = HSStarTrainer(
            model=model,
            args=config(HSStarConfig, tmp_path),
            train_dataset=problems,
            reward_funcs=OracleStepReward(),
            processing_class=tok,
        )
    else:
        trainer = HSStarDPOTrainer(
            model=model,
            args=config(HSStarDPOConfig, tmp_path, learning_rate=1e-3, max_rows_per_problem=None),
            train_dataset=problems,
            reward_funcs=OracleStepReward(),
            processing_class=tok,
        )
    trainer.train()
    total_rows = 0
    for t in range(2):
        rows, _ = check_iteration(tmp_path, t, answers, objective)
        total_rows += len(rows)
    assert total_rows > 0, "the toy reasoner produced no boundary problem: the test world is miscalibrated"
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the weights did not change"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "iteration-1" / "model")
    assert all(torch.equal(reloaded.state_dict()[k], after[k]) for k in after)
    # fresh problems each iteration, no overlap
    p0 = {r["problem_id"] for r in A.IterationArtifacts(tmp_path, 0).read_jsonl(A.PROBLEMS)}
    p1 = {r["problem_id"] for r in A.IterationArtifacts(tmp_path, 1).read_jsonl(A.PROBLEMS)}
    assert len(p0) == len(p1) == N and not p0 & p1
    manifest = json.loads((tmp_path / A.RunManifest.FILE).read_text())
    assert manifest["sampling_budget"] == B and manifest["objective"] == objective


class CrashAfterLevels(HSStarCallback):
    def on_levels_estimated(self, args, state, control, iteration=None, **kwargs):
        if iteration == 0:
            raise KeyboardInterrupt("simulated kill after the levels phase")


class StopAfterFirstIteration(HSStarCallback):
    def on_iteration_end(self, args, state, control, iteration=None, **kwargs):
        control.should_training_stop = True


def make_trainer(reasoner_dir, problems, output_dir, callbacks=(), **overrides):
    model, tok = load(reasoner_dir)
    sampler = CountingSampler(model, tok, batch_size=64, progress=False)
    trainer = HSStarTrainer(
        model=model,
        args=config(HSStarConfig, output_dir, **overrides),
        train_dataset=problems,
        reward_funcs=OracleStepReward(),
        processing_class=tok,
        sampler=sampler,
        callbacks=list(callbacks),
    )
    return trainer, sampler


def test_resume_skips_completed_phases(reasoner_dir, problems, tmp_path):
    trainer, sampler = make_trainer(reasoner_dir, problems, tmp_path, callbacks=[CrashAfterLevels()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    store = A.IterationArtifacts(tmp_path, 0)
    assert store.completed_phases() == [A.PROBLEMS, A.samples_file(0), A.scored_file(0), A.plan_file(1)]
    assert (sampler.calls, sampler.samples) == (1, NP * N)
    presamples = store.read_jsonl(A.samples_file(0))

    trainer, sampler = make_trainer(reasoner_dir, problems, tmp_path)
    trainer.train()
    # iteration 0: only re-sampling ran again; iteration 1: pre- and re-sampling
    assert sampler.calls == 3
    assert sampler.samples == (B - NP) * N + B * N
    assert store.read_jsonl(A.samples_file(0)) == presamples  # the pre-samples were kept, not redone
    assert A.IterationArtifacts(tmp_path, 1).done


def test_resume_after_a_completed_iteration_loads_its_model(reasoner_dir, problems, tmp_path):
    trainer, sampler = make_trainer(reasoner_dir, problems, tmp_path, callbacks=[StopAfterFirstIteration()])
    trainer.train()
    assert A.IterationArtifacts(tmp_path, 0).done and not A.IterationArtifacts(tmp_path, 1).has(A.PROBLEMS)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "iteration-0" / "model").state_dict()

    restored = CheckRestored(saved)
    trainer, sampler = make_trainer(reasoner_dir, problems, tmp_path, callbacks=[restored])
    trainer.train()
    assert restored.checked == [1]  # iteration 1 began from iteration 0's checkpoint
    assert sampler.samples == B * N  # iteration 0 was not sampled again
    assert trainer.iteration_stats[0]["iteration"] == 0 and trainer.iteration_stats[1]["iteration"] == 1


class CheckRestored(HSStarCallback):
    """Records each iteration that begins with the model equal to ``expected`` (iteration 0's checkpoint)."""

    def __init__(self, expected):
        self.expected = expected
        self.checked = []

    def on_iteration_begin(self, args, state, control, iteration=None, model=None, **kwargs):
        current = model.state_dict()
        if all(torch.equal(current[k], v) for k, v in self.expected.items()):
            self.checked.append(iteration)


def test_resume_with_other_settings_is_refused(reasoner_dir, problems, tmp_path):
    trainer, _ = make_trainer(reasoner_dir, problems, tmp_path, callbacks=[StopAfterFirstIteration()])
    trainer.train()
    trainer, sampler = make_trainer(reasoner_dir, problems, tmp_path, sampling_budget=6)
    with pytest.raises(ValueError, match=r"`sampling_budget`: 4 -> 6"):
        trainer.train()
    assert sampler.calls == 0
    assert A.IterationArtifacts(tmp_path, 0).done  # nothing already written was lost


class KeepOneRow(HSStarCallback):
    def __init__(self):
        self.seen = []

    def on_levels_estimated(
        self, args, state, control, iteration=None, difficulties=None, resamples=None, **kw
    ):
        self.seen.append((iteration, len(difficulties), sum(resamples.values())))

    def on_rows_selected(self, args, state, control, iteration=None, rows=None, **kwargs):
        return rows[:1]


class LogCatcher(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_callbacks_observe_and_filter(reasoner_dir, problems, tmp_path):
    cb, logs = KeepOneRow(), LogCatcher()
    trainer, _ = make_trainer(
        reasoner_dir, problems, tmp_path, callbacks=[cb, StopAfterFirstIteration(), logs]
    )
    trainer.train()
    # the iteration's metrics reach report_to (the Trainer's log event) as hsstar/ scalars
    hsstar = [entry for entry in logs.logs if "hsstar/budget_spent" in entry]
    assert len(hsstar) == 1 and hsstar[0]["hsstar/budget_spent"] == B * N
    assert (
        hsstar[0]["hsstar/levels/boundary"]
        + hsstar[0]["hsstar/levels/easy"]
        + hsstar[0]["hsstar/levels/hard"]
        == N
    )
    assert cb.seen == [(0, N, (B - NP) * N)]
    rows = A.IterationArtifacts(tmp_path, 0).read_jsonl(A.TRAIN_ROWS)
    assert len(rows) <= 1
    assert not A.IterationArtifacts(tmp_path, 1).has(A.PROBLEMS)


def lora_weights(model):
    return {k: v.detach().clone().float() for k, v in model.named_parameters() if "lora_" in k}


def lora_trainer(trainer_cls, config_cls, model, tok, problems, output_dir, callbacks=()):
    from peft import LoraConfig

    return trainer_cls(
        model=model,
        args=config(
            config_cls, output_dir, num_iterations=1, learning_rate=1e-2, per_device_train_batch_size=2
        ),
        train_dataset=problems,
        reward_funcs=OracleStepReward(),
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        callbacks=list(callbacks),
    )


def test_lora(reasoner_dir, problems, answers, tmp_path):
    model, tok = load(reasoner_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = lora_trainer(HSStarTrainer, HSStarConfig, model, tok, problems, tmp_path)
    initial = lora_weights(trainer.model)
    assert initial, "no LoRA parameters"
    trainer.train()
    rows, _ = check_iteration(tmp_path, 0, answers, "sft")
    assert rows
    trained = lora_weights(trainer.model)
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), "the adapter did not change"
    base_now = trainer.model.get_base_model().state_dict()
    frozen = [k for k in base if "lora_" not in k and k in base_now]
    assert frozen and all(torch.equal(base[k], base_now[k]) for k in frozen), "the base weights changed"
    assert (tmp_path / "iteration-0" / "model" / "adapter_model.safetensors").exists()


def test_qlora_4bit_on_cpu(reasoner_dir, problems, answers, tmp_path):
    from trl import ModelConfig, get_peft_config, get_quantization_config

    model_args = ModelConfig(
        model_name_or_path=str(reasoner_dir),
        load_in_4bit=True,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        dtype="float32",
    )
    quantization_config = get_quantization_config(model_args)
    assert quantization_config is not None and quantization_config.load_in_4bit
    args = config(
        HSStarConfig,
        tmp_path,
        num_iterations=1,
        learning_rate=1e-2,
        per_device_train_batch_size=2,  # several steps: the first one of a warm-up schedule has lr 0
        model_init_kwargs={"dtype": torch.float32, "quantization_config": quantization_config},
    )
    trainer = HSStarTrainer(
        model=str(reasoner_dir),
        args=args,
        train_dataset=problems,
        reward_funcs=OracleStepReward(),
        peft_config=get_peft_config(model_args),
    )
    assert getattr(trainer.model.get_base_model(), "is_loaded_in_4bit", False)
    initial = lora_weights(trainer.model)
    trainer.train()
    rows, _ = check_iteration(tmp_path, 0, answers, "sft")
    assert rows
    trained = lora_weights(trainer.model)
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), "the adapter did not change"
    assert (tmp_path / "iteration-0" / "model" / "adapter_model.safetensors").exists()


class SnapshotAdapter(HSStarCallback):
    def on_iteration_begin(self, args, state, control, model=None, **kwargs):
        self.at_start = lora_weights(model)


def test_dpo_with_lora_uses_the_iteration_start_as_reference(reasoner_dir, problems, tmp_path):
    model, tok = load(reasoner_dir)
    snapshot = SnapshotAdapter()
    trainer = lora_trainer(HSStarDPOTrainer, HSStarDPOConfig, model, tok, problems, tmp_path, [snapshot])
    trainer.train()
    rows = A.IterationArtifacts(tmp_path, 0).read_jsonl(A.TRAIN_ROWS)
    assert rows, "no DPO pairs: the toy world is miscalibrated"
    weights = lora_weights(trainer.model)
    ref = {k.replace(".ref.", ".default."): v for k, v in weights.items() if ".ref." in k}
    default = {k: v for k, v in weights.items() if ".default." in k}
    assert ref and set(ref) == set(default) == set(snapshot.at_start)
    # the reference adapter is M_t (the adapter when the iteration began), not the base model, and stayed frozen
    assert all(torch.equal(ref[k], snapshot.at_start[k]) for k in ref)
    assert any(not torch.equal(default[k], snapshot.at_start[k]) for k in default), "the policy did not train"


def test_chat_prompts(reasoner_dir, problems, answers, tmp_path):
    """Problems whose prompt is a list of messages: rendered with the chat template, rows kept as messages."""
    chat = problems.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    model, tok = load(reasoner_dir)
    trainer = HSStarTrainer(
        model=model,
        args=config(HSStarConfig, tmp_path, num_iterations=1, per_device_train_batch_size=4),
        train_dataset=chat,
        reward_funcs=OracleStepReward(),
        processing_class=tok,
    )
    trainer.train()
    store = A.IterationArtifacts(tmp_path, 0)
    problem = store.read_jsonl(A.PROBLEMS)[0]
    assert problem["prompt_text"] == problem["prompt"][0]["content"]  # the toy template concatenates contents
    rows = store.read_jsonl(A.TRAIN_ROWS)
    assert rows and all(r["completion"][0]["role"] == "assistant" for r in rows)
    with MathVerifier() as verify:
        assert all(verify(r["completion"][0]["content"], answers[r["problem_id"]]) for r in rows)
    assert store.done
