"""HSStarGRPOTrainer: HS-STaR's allocation of rollouts inside TRL's GRPOTrainer, on the shipped tiny reasoner.

A scripted reward makes each prompt's difficulty known in advance (column ``kind``): ``easy`` prompts are always
right, ``hard`` never, ``boundary`` ones right on about half their completions. What is checked is the allocation,
not the model: the budget per round, who receives it, the advantages, the state across a resume and processes.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import cpu_launch_args, run_group

REPO = Path(__file__).resolve().parents[1]
KINDS = ("easy", "boundary", "hard")


def _dataset(n: int = 12):
    from datasets import Dataset

    from trl_hsstar.toy import generate_problems, problems_to_dataset_dict

    rows = problems_to_dataset_dict(generate_problems(n, operands=(2, 6)))
    rows["kind"] = [KINDS[i % 3] for i in range(n)]
    return Dataset.from_dict(rows)


class ScriptedReward:
    """1 on an easy prompt, 0 on a hard one, a boundary prompt's completions alternate 1, 0, 1, ... within each
    call (so every boundary group is mixed); records what it was called with."""

    __name__ = "scripted"

    def __init__(self):
        self.calls: list[int] = []
        self.kinds: Counter[str] = Counter()

    def __call__(self, prompts, completions, kind, **kwargs):
        self.calls.append(len(completions))
        self.kinds.update(kind)
        seen: Counter[str] = Counter()
        out = []
        for p, k in zip(prompts, kind):
            seen[p] += 1
            out.append({"easy": 1.0, "hard": 0.0}.get(k, float(seen[p] % 2)))
        return out


def _config(tmp_path, **overrides):
    from trl_hsstar import HSStarGRPOConfig

    return HSStarGRPOConfig(
        **{
            "output_dir": str(tmp_path / "out"),
            "num_generations": 4,
            "per_device_train_batch_size": 16,  # a round: 4 prompts x 4 completions, one step
            "max_completion_length": 8,  # the reward ignores the text: short completions, fast steps
            "num_train_epochs": 3,
            "learning_rate": 1e-4,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "use_cpu": True,
            "seed": 0,
            **overrides,
        }
    )


def _trainer(reasoner_dir, tmp_path, reward=None, dataset=None, **overrides):
    from trl_hsstar import HSStarGRPOTrainer

    return HSStarGRPOTrainer(
        model=str(reasoner_dir),
        reward_funcs=reward if reward is not None else ScriptedReward(),
        args=_config(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else _dataset(),
    )


@pytest.mark.slow
def test_budget_is_exact_and_boundary_prompts_receive_the_freed_rollouts(reasoner_dir, tmp_path):
    runs = {}
    for allocation in ("uniform", "hsstar"):
        reward = ScriptedReward()
        trainer = _trainer(reasoner_dir, tmp_path / allocation, reward, allocation=allocation)
        trainer.train()
        runs[allocation] = (trainer, reward)
    (uniform, u_reward), (hsstar, h_reward) = runs["uniform"], runs["hsstar"]
    # every round generates generation_batch_size completions, and both spend the same number of rounds
    assert set(h_reward.calls) == set(u_reward.calls) == {16}
    assert len(h_reward.calls) == len(u_reward.calls) == 9  # 12 prompts / 4 per round x 3 epochs
    # the first pass pre-samples each prompt once; the next two go mostly to the boundary prompts
    assert hsstar.rollouts["unprobed"] == 12 * 4
    assert u_reward.kinds["boundary"] == 3 * 4 * 4  # uniform: each prompt once per epoch
    assert h_reward.kinds["boundary"] >= 1.5 * u_reward.kinds["boundary"]
    assert h_reward.kinds["easy"] + h_reward.kinds["hard"] < u_reward.kinds["easy"] + u_reward.kinds["hard"]
    # logged through TRL's logs: every completion counted once, by the level its prompt had when drawn
    logs = [h for h in hsstar.state.log_history if "allocation/groups_with_signal" in h]
    assert (
        sum(h[f"allocation/rollouts_{lv}"] for h in logs for lv in ("unprobed", "easy", "boundary", "hard"))
        == 144
    )
    signal = [h["allocation/groups_with_signal"] for h in logs]
    u_logs = [h for h in uniform.state.log_history if "allocation/groups_with_signal" in h]
    assert sum(signal) / len(signal) > sum(h["allocation/groups_with_signal"] for h in u_logs) / len(u_logs)


def test_levels_follow_the_scripted_kinds(reasoner_dir, tmp_path):
    trainer = _trainer(reasoner_dir, tmp_path, num_train_epochs=1)
    trainer.train()
    kinds = _dataset()["kind"]
    assert {trainer.level_of(key).value for key in trainer.prompt_keys} == set(KINDS)
    assert all(trainer.level_of(key).value == kind for key, kind in zip(trainer.prompt_keys, kinds))
    # one epoch of pre-sampling: each prompt drawn exactly once, in rounds of 4 distinct prompts
    drawn = [i for chunk in trainer.rounds_drawn for i in chunk]
    assert sorted(drawn) == list(range(12)) and all(len(set(c)) == 4 for c in trainer.rounds_drawn)


def test_on_equal_groups_the_advantages_are_trls(reasoner_dir, tmp_path):
    import torch
    from trl import GRPOTrainer

    batch = [row for row in _dataset(4) for _ in range(4)]
    reward = ScriptedReward()
    ours = _trainer(reasoner_dir, tmp_path / "ours", reward)
    theirs = GRPOTrainer(
        model=str(reasoner_dir),
        reward_funcs=reward,
        args=_config(tmp_path / "theirs"),
        train_dataset=_dataset(),
    )
    outputs = []
    for trainer in (ours, theirs):
        torch.manual_seed(0)
        trainer.model.train()
        outputs.append(trainer._generate_and_score_completions(batch))
    assert torch.equal(outputs[0]["completion_ids"], outputs[1]["completion_ids"])
    assert torch.equal(outputs[0]["advantages"], outputs[1]["advantages"])
    assert outputs[0]["advantages"].abs().sum() > 0  # the boundary groups carry signal
    assert len(ours.difficulty) == 4  # and ours observed them
    spent = dict(ours.rollouts)
    ours.model.eval()  # an evaluation's rollouts do not move the training state
    ours._generate_and_score_completions([row for row in _dataset(8).select(range(4, 8)) for _ in range(4)])
    assert len(ours.difficulty) == 4 and dict(ours.rollouts) == spent


class _Kill(Exception):
    pass


def test_a_killed_run_resumes_from_trls_checkpoint_with_the_same_difficulty_state(reasoner_dir, tmp_path):
    from transformers import TrainerCallback

    from trl_hsstar.grpo import STATE_FILE

    saved = {}

    class KillAfterSave(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_save(self, args, state, control, **kwargs):
            saved[state.global_step] = json.loads(json.dumps(self.trainer.difficulty_state()))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise _Kill

    overrides = dict(save_strategy="steps", save_steps=3, max_steps=6)  # 3 rounds an epoch: 2 epochs
    first = _trainer(reasoner_dir, tmp_path, **overrides)
    first.add_callback(KillAfterSave(first))
    with pytest.raises(_Kill):
        first.train()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    on_disk = json.loads((checkpoint / STATE_FILE).read_text())
    assert on_disk == saved[3] and len(on_disk["difficulty"]) == 12  # the first epoch (3 steps) probed all

    resumed_with = {}

    class Capture(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            resumed_with.update(json.loads(json.dumps(self.trainer.difficulty_state())))

    second = _trainer(reasoner_dir, tmp_path, **overrides)
    second.add_callback(Capture(second))
    second.train(resume_from_checkpoint=True)
    assert resumed_with == on_disk
    assert second.state.global_step == 6
    assert sum(second.rollouts.values()) == sum(on_disk["rollouts"].values()) + 3 * 16


def test_bad_values_fail_before_generation(reasoner_dir, tmp_path):
    from trl_hsstar import HSStarGRPOConfig, HSStarGRPOTrainer

    def config(**kw):
        return HSStarGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)

    with pytest.raises(ValueError, match="allocation"):
        config(allocation="everything")
    with pytest.raises(ValueError, match="tau_l < tau_h"):
        config(reward_thresholds=[0.6, 0.2])
    with pytest.raises(ValueError, match="reprobe_rate"):
        config(reprobe_rate=1.5)
    with pytest.raises(
        ValueError, match="num_generations"
    ):  # a round's budget below one group: TRL's own check
        config(num_generations=8, per_device_train_batch_size=4)

    def build(reward_funcs=None, dataset=None, **kw):
        return HSStarGRPOTrainer(
            model="no/such-model",  # never loaded: every check comes first
            reward_funcs=reward_funcs or ScriptedReward(),
            args=config(num_generations=4, per_device_train_batch_size=16, **kw.pop("args", {})),
            train_dataset=dataset if dataset is not None else _dataset(),
            **kw,
        )

    with pytest.raises(ValueError, match=r"a generation round takes 4 distinct prompts .* has 3"):
        build(dataset=_dataset(3))
    with pytest.raises(ValueError, match="accuracy_reward_index"):
        build(args={"accuracy_reward_index": 2})
    with pytest.raises(ValueError, match="process_reward_model"):
        build(args={"difficulty_estimator": "hsstar", "reward_thresholds": [0.25, 0.5]})
    with pytest.raises(ValueError, match="reward_thresholds"):
        build(process_reward_model=lambda prompts, completions, **kw: [0.5] * len(completions))

    def nan_prm(prompts, completions, **kwargs):
        return [float("nan")] * len(completions)

    with pytest.raises(
        ValueError, match=r"'nan_prm' returned NaN at index 0 on its check before any sampling"
    ):
        build(process_reward_model=nan_prm, args={"reward_thresholds": [0.25, 0.5]})


def test_a_process_reward_model_moves_an_all_right_prompt_to_boundary(reasoner_dir, tmp_path):
    """HS-STaR's estimator: an always-right prompt whose min-step score is low is not easy; an always-wrong one
    with a low score stays hard."""

    def low_on_easy(prompts, completions, kind, **kwargs):
        return [0.9 if k == "boundary" else 0.1 for k in kind]

    from trl_hsstar import HSStarGRPOTrainer

    trainer = HSStarGRPOTrainer(
        model=str(reasoner_dir),
        reward_funcs=ScriptedReward(),
        args=_config(tmp_path, num_train_epochs=1, reward_thresholds=[0.25, 0.5]),
        train_dataset=_dataset(),
        process_reward_model=low_on_easy,
    )
    assert trainer.estimator == "hsstar"
    trainer.train()
    kinds = _dataset()["kind"]
    levels = {kind: trainer.level_of(key).value for key, kind in zip(trainer.prompt_keys, kinds)}
    assert levels == {"easy": "boundary", "boundary": "boundary", "hard": "hard"}


def test_dapo_trains_only_groups_with_signal_and_spends_plain_grpos_rounds(reasoner_dir, tmp_path):
    reward = ScriptedReward()
    trainer = _trainer(reasoner_dir, tmp_path, reward, allocation="dapo")
    batches = []
    generate_rollouts = trainer.generate_rollouts

    def spy(inputs, generate):
        batches.append(generate_rollouts(inputs, generate))
        return batches[-1]

    trainer.generate_rollouts = spy
    trainer.train()
    # plain GRPO's budget, refills included: 9 rounds of 16 completions (12 prompts / 4 per round x 3 epochs)
    assert trainer.round_budget == 9 and trainer.rounds_spent == 9 and reward.calls == [16] * 9
    # fewer optimizer steps, each on a full batch; every batch but the last holds only groups with signal
    assert trainer.state.global_step == len(batches) < 9
    signal = [(batch["advantages"].view(-1, 4).abs().sum(1) > 0).tolist() for batch in batches]
    assert all(len(s) == 4 for s in signal) and all(all(s) for s in signal[:-1])
    logs = [h for h in trainer.state.log_history if "allocation/dropped_groups" in h]
    assert sum(h["allocation/rounds"] for h in logs) == 9
    assert sum(h["allocation/dropped_groups"] for h in logs) == 9 * 4 - 4 * len(batches)


def test_refilled_groups_are_repadded_to_the_longest_round():
    import torch
    from accelerate import Accelerator

    from trl_hsstar._compat import concat_groups

    t = torch.tensor
    short = {  # prompts 2 tokens (left-padded), completions 2 (right-padded)
        "prompt_ids": t([[0, 5], [6, 7]]), "prompt_mask": t([[0, 1], [1, 1]]),
        "completion_ids": t([[3, 0], [4, 4]]), "completion_mask": t([[1, 0], [1, 1]]),
        "advantages": t([1.0, -1.0]), "num_items_in_batch": t(3),
    }  # fmt: skip
    long = {  # prompts 3 tokens, completions 1
        "prompt_ids": t([[1, 2, 3], [0, 0, 4]]), "prompt_mask": t([[1, 1, 1], [0, 0, 1]]),
        "completion_ids": t([[5], [6]]), "completion_mask": t([[1], [1]]),
        "advantages": t([0.5, -0.5]), "num_items_in_batch": t(2),
    }  # fmt: skip
    batch = concat_groups([short, long], [(1, 0), (0, 1)], 1, 99, Accelerator(cpu=True))
    assert batch["prompt_ids"].tolist() == [[1, 2, 3], [99, 6, 7]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["completion_ids"].tolist() == [[5, 99], [4, 4]]
    assert batch["completion_mask"].tolist() == [[1, 0], [1, 1]]
    assert batch["advantages"].tolist() == [0.5, -1.0] and int(batch["num_items_in_batch"]) == 3
    with pytest.raises(ValueError, match=r"text batches only; this batch also holds \['pixel_values'\]"):
        concat_groups([{**short, "pixel_values": t([0.0])}], [(0, 0)], 1, 99, Accelerator(cpu=True))


@pytest.mark.slow
@pytest.mark.parametrize("allocation", ["hsstar", "dapo"])
def test_two_processes_agree_on_the_allocation(reasoner_dir, tmp_path, allocation):
    script = tmp_path / "two.py"
    script.write_text(
        f"""
import json, os, sys
sys.path.insert(0, {str(REPO / "tests")!r})
from test_grpo import _trainer
from pathlib import Path
if {allocation!r} == "dapo":  # 12 completions per round, 3 groups: a process would hold half a group
    try:
        _trainer(Path("no/such-model"), Path({str(tmp_path)!r}), per_device_train_batch_size=6, allocation="dapo")
    except ValueError as error:
        assert "multiple of `num_generations`" in str(error), error
    else:
        raise AssertionError("half a group per process was accepted")
t = _trainer(Path({str(reasoner_dir)!r}), Path({str(tmp_path)!r}), per_device_train_batch_size=8,
             allocation={allocation!r})
t.train()
rank = t.accelerator.process_index
Path({str(tmp_path)!r}, f"rank{{rank}}.json").write_text(json.dumps(
    {{"rounds": t.rounds_drawn, "state": t.difficulty_state(), "processes": t.accelerator.num_processes,
      "steps": t.state.global_step}}))
"""
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *cpu_launch_args(2), str(script)]
    out = run_group(cmd, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["processes"] == 2
    assert ranks[0]["steps"] == ranks[1]["steps"] and ranks[0]["state"]["rounds_spent"] == 9
    if allocation == "dapo":  # refills agreed on: every process generated the same rounds, in fewer steps
        assert ranks[0]["steps"] < 9 and ranks[0]["state"] == ranks[1]["state"]
        return
    assert ranks[0]["rounds"] == ranks[1]["rounds"] and len(ranks[0]["rounds"]) >= 9
    assert ranks[0]["state"] == ranks[1]["state"] and len(ranks[0]["state"]["difficulty"]) == 12
    assert sum(ranks[0]["state"]["rollouts"].values()) == 9 * 16  # both processes' completions, counted once


def test_lora_trains_only_the_adapter_under_the_allocation(reasoner_dir, tmp_path):
    from peft import LoraConfig

    from trl_hsstar import HSStarGRPOTrainer

    trainer = HSStarGRPOTrainer(
        model=str(reasoner_dir),
        reward_funcs=ScriptedReward(),
        args=_config(tmp_path, num_train_epochs=2, learning_rate=1e-2),
        train_dataset=_dataset(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not p.detach().equal(before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert sum(trainer.rollouts.values()) == 2 * 3 * 16 and trainer.rollouts["unprobed"] == 48
