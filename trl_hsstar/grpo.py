"""The online trainer: TRL's ``GRPOTrainer`` with HS-STaR's allocation of rollouts (docs/grpo.md).

Plain GRPO gives every prompt of the dataset the same share of rollouts, and a group whose rollouts are all right or
all wrong has zero advantage: its generation is spent and teaches nothing. ``HSStarGRPOTrainer`` keeps every
prompt's difficulty from its latest group (answer accuracy, plus a process reward model's min-step score when one is
given: HS-STaR's estimator) and draws each generation round's prompts by it: boundary prompts often, easy and hard
ones at ``reprobe_rate``, prompts never rolled out first. Every round still generates ``generation_batch_size``
completions in groups of ``num_generations``, so the budget is plain GRPO's to the completion and TRL's own reward
calls, advantages and loss run untouched.

``allocation="dapo"`` is the baseline from the other side: DAPO's dynamic sampling keeps TRL's sampler, drops the
groups whose rewards are all equal and refills the batch with new rounds, and stops when it has generated as many
rounds as plain GRPO would (fewer optimizer steps, each on groups with signal).

The seam is a sampler (in place of GRPO's ``RepeatSampler``), an observer of the gathered rewards and, for DAPO, a
wrapper around each generation round; all reach upstream's protected methods through ``_compat.GRPOSeams``,
checked against the installed TRL by ``tests/test_compat.py``. The difficulty state is saved in every checkpoint and read back on resume, as TRL keeps
its entropy controller's state.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from accelerate.utils import gather_object
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer

from ._compat import GRPOSeams, concat_groups
from .budget import ROLLOUT_ALLOCATIONS, draw_prompts
from .checks import check_int
from .difficulty import ESTIMATORS, Difficulty, Level, estimate_difficulty, validate_thresholds
from .rewards import check_rewards, probe_inputs, reward_source_name

__all__ = ["HSStarGRPOConfig", "HSStarGRPOTrainer"]

STATE_FILE = "hsstar_grpo_state.json"
"""The difficulty state's file in each TRL checkpoint."""
LEVELS = ("unprobed", *(level.value for level in Level))


@dataclass
class HSStarGRPOConfig(GRPOConfig):
    r"""
    [`~trl.GRPOConfig`] with HS-STaR's allocation of rollouts. Every GRPO field keeps its meaning; the budget is
    GRPO's (`generation_batch_size` completions per generation round, in groups of `num_generations`).

    Parameters:
        allocation (`str`, *optional*, defaults to `"hsstar"`):
            How the rollouts are spent: `"hsstar"` (each round's prompts drawn by difficulty: boundary prompts with
            weight 1, easy and hard ones with `reprobe_rate`), `"uniform"` (plain GRPO, TRL's own sampler) or
            `"dapo"` (DAPO's dynamic sampling: TRL's sampler, groups with equal rewards dropped and the batch
            refilled from new rounds, until as many rounds as plain GRPO's are spent).
        reprobe_rate (`float`, *optional*, defaults to `0.1`):
            Weight of an easy or hard prompt against a boundary one's 1: its chance to be drawn again and found to
            have changed level. `0` draws them only when too few boundary prompts are left to fill a round.
        presample (`bool`, *optional*, defaults to `True`):
            Draw every prompt never rolled out before any other, so the first pass over the data is the
            pre-sampling (its groups train like any other and count against the budget). `False`: an unseen prompt
            weighs as a boundary one.
        difficulty_estimator (`str`, *optional*):
            `"hsstar"` (answer accuracy and the process reward model's score), `"accuracy"` or `"reward"`. Default:
            `"hsstar"` with a `process_reward_model`, else `"accuracy"`.
        reward_thresholds (`list[float]`, *optional*):
            (tau_l, tau_h) on the process reward model's score, 0 <= tau_l < tau_h <= 1; required when the
            estimator uses it.
        accuracy_reward_index (`int`, *optional*, defaults to `0`):
            Which of `reward_funcs` says whether the answer is right.
        correct_threshold (`float`, *optional*, defaults to `0.5`):
            A rollout is correct when that reward function gives at least this.
    """

    allocation: str = field(
        default="hsstar", metadata={"help": "Rollout allocation: 'hsstar', 'uniform' or 'dapo'."}
    )
    reprobe_rate: float = field(
        default=0.1, metadata={"help": "Draw weight of an easy or hard prompt against a boundary prompt's 1."}
    )
    presample: bool = field(
        default=True, metadata={"help": "Roll out every prompt once before drawing by difficulty."}
    )
    difficulty_estimator: str | None = field(
        default=None,
        metadata={"help": "'hsstar', 'accuracy' or 'reward'. Default: 'hsstar' with a PRM, else 'accuracy'."},
    )
    reward_thresholds: list[float] | None = field(
        default=None, metadata={"help": "(tau_l, tau_h) on the process reward model's score."}
    )
    accuracy_reward_index: int = field(
        default=0, metadata={"help": "Index in reward_funcs of the function that checks the answer."}
    )
    correct_threshold: float = field(
        default=0.5, metadata={"help": "A rollout is correct when that reward is at least this."}
    )

    def __post_init__(self):
        if self.allocation not in ROLLOUT_ALLOCATIONS:
            raise ValueError(f"`allocation` must be one of {ROLLOUT_ALLOCATIONS}, got {self.allocation!r}.")
        if isinstance(self.reprobe_rate, bool) or not 0.0 <= float(self.reprobe_rate) <= 1.0:
            raise ValueError(f"`reprobe_rate` must lie in [0, 1], got {self.reprobe_rate!r}.")
        if self.difficulty_estimator is not None and self.difficulty_estimator not in ESTIMATORS:
            raise ValueError(
                f"`difficulty_estimator` must be one of {ESTIMATORS}, got {self.difficulty_estimator!r}."
            )
        if self.reward_thresholds is not None:
            self.reward_thresholds = list(validate_thresholds(self.reward_thresholds))
        check_int(self.accuracy_reward_index, "accuracy_reward_index", minimum=0)
        if not math.isfinite(float(self.correct_threshold)):
            raise ValueError(f"`correct_threshold` must be a finite number, got {self.correct_threshold!r}.")
        super().__post_init__()


def prompt_key(prompt) -> str:
    """One string per prompt, a text or a conversation: the difficulty state's key."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


class RoundSampler(Sampler):
    """GRPO's ``RepeatSampler`` layout (each round's prompts, each ``mini_repeat_count`` times, the round repeated
    ``repeat_count`` times) with each round's prompts drawn by :func:`~trl_hsstar.budget.draw_prompts` when the
    round is reached, from the difficulty state as it then is. Every process draws the same: the same seed, and a
    state built from gathered rewards."""

    def __init__(
        self, trainer: HSStarGRPOTrainer, *, batch_size: int, mini_repeat_count: int, repeat_count: int
    ):
        self.trainer, self.batch_size = trainer, batch_size
        self.mini_repeat_count, self.repeat_count = mini_repeat_count, repeat_count
        self.rounds = len(trainer.prompt_keys) // batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rounds * self.batch_size * self.mini_repeat_count * self.repeat_count

    def __iter__(self):
        for r in range(self.rounds):
            rng = random.Random(f"{self.trainer.args.seed}-{self.epoch}-{r}")
            chunk = self.trainer.draw_round(rng, self.batch_size)
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.mini_repeat_count


class _SaveDifficulty(TrainerCallback):
    """Writes the difficulty state into each checkpoint TRL saves (main process)."""

    def __init__(self, trainer: HSStarGRPOTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self.trainer.difficulty_state(), f)


class _RoundBudget(TrainerCallback):
    """Sets plain GRPO's number of generation rounds when training begins; under ``allocation="dapo"``, whose
    steps may take several rounds each, stops training once they are spent and the last batch is used up."""

    def __init__(self, trainer: HSStarGRPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        every = args.steps_per_generation * self.trainer.num_iterations  # micro-steps per round
        self.trainer.round_budget = math.ceil(state.max_steps * args.gradient_accumulation_steps / every)
        self.trainer.generated_at_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        every = args.steps_per_generation * trainer.num_iterations
        used_up = (state.global_step - trainer.generated_at_step) * args.gradient_accumulation_steps >= every
        if args.allocation == "dapo" and trainer.rounds_spent >= trainer.round_budget and used_up:
            control.should_training_stop = True


class HSStarGRPOTrainer(GRPOSeams, GRPOTrainer):
    """[`~trl.GRPOTrainer`] whose generation rounds go to boundary prompts (see the module doc and docs/grpo.md).

    Takes GRPOTrainer's arguments, an [`HSStarGRPOConfig`] as `args`, and optionally `process_reward_model`: a
    callable `(prompts, completions, **columns) -> list[float | None]` giving each completion's score S(r) in
    [0, 1] (for instance [`~trl_hsstar.rewards.ProcessRewardModel`], min over steps).
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: HSStarGRPOConfig | None = None,
        train_dataset=None,
        *rest,
        process_reward_model=None,
        **kwargs,
    ):
        args = args if args is not None else HSStarGRPOConfig(output_dir="hsstar-grpo")
        if not isinstance(args, HSStarGRPOConfig):
            raise TypeError(
                f"`args` must be an HSStarGRPOConfig, got {type(args).__name__}: build one from it."
            )

        # -- checks that need the dataset and the reward sources, before any model is loaded
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if args.accuracy_reward_index >= len(funcs):
            raise ValueError(
                f"`accuracy_reward_index` is {args.accuracy_reward_index} but there are {len(funcs)} reward "
                "functions: point it at the one that checks the answer."
            )
        estimator = args.difficulty_estimator or (
            "hsstar" if process_reward_model is not None else "accuracy"
        )
        if estimator != "accuracy":
            if process_reward_model is None:
                raise ValueError(
                    f"`difficulty_estimator={estimator!r}` reads a process reward model: pass "
                    "`process_reward_model`, or use `difficulty_estimator='accuracy'`."
                )
            validate_thresholds(args.reward_thresholds)
        self.estimator, self.process_reward_model = estimator, process_reward_model
        map_style = train_dataset is not None and hasattr(train_dataset, "__len__")
        if args.allocation != "uniform" and not map_style:
            raise ValueError(
                f"`allocation={args.allocation!r}` draws prompts by index: give a map-style `train_dataset` "
                "(a `datasets.Dataset`, not an `IterableDataset`), or use `allocation='uniform'`."
            )
        local_batch = args.per_device_train_batch_size * args.steps_per_generation
        if args.allocation == "dapo" and local_batch % args.num_generations:
            raise ValueError(
                f"`allocation='dapo'` drops and refills whole groups on each process, but a process's generation "
                f"batch ({local_batch} = `per_device_train_batch_size` x `steps_per_generation`) is not a multiple "
                f"of `num_generations` ({args.num_generations}): make it one."
            )
        images = {"image", "images"} & set(getattr(train_dataset, "column_names", None) or [])
        if args.allocation == "dapo" and images:
            raise ValueError(
                f"`allocation='dapo'` refills text batches only, but `train_dataset` has {sorted(images)}: use "
                "`allocation='hsstar'` or `'uniform'` for images."
            )
        self.prompt_keys = [prompt_key(p) for p in train_dataset["prompt"]] if map_style else []
        per_round = args.generation_batch_size // args.num_generations
        if args.allocation != "uniform" and per_round > len(self.prompt_keys):
            raise ValueError(
                f"a generation round takes {per_round} distinct prompts (`generation_batch_size` "
                f"{args.generation_batch_size} / `num_generations` {args.num_generations}) but `train_dataset` "
                f"has {len(self.prompt_keys)}: lower `generation_batch_size` or add prompts."
            )
        if process_reward_model is not None and train_dataset is not None:
            self._probe_reward_model(train_dataset[0])

        super().__init__(model, reward_funcs, args, train_dataset, *rest, **kwargs)

        # -- the difficulty state: each prompt's latest group, and what the rounds spent
        self.difficulty: dict[str, Difficulty] = {}
        self.rollouts: Counter[str] = Counter()  # per level at draw time, over the run
        self.rounds_drawn: list[list[int]] = []  # each round's prompt indices, in order
        self.pending: set[str] = set()  # drawn, not yet scored (the dataloader draws a round ahead)
        self.rounds_spent = 0  # training rounds generated, refills included
        self.round_budget = 0  # plain GRPO's rounds for this run, set when training begins (DAPO stops there)
        self.round_signal: list[bool] = []  # the latest round's groups: rewards not all equal
        self.generated_at_step = 0  # the optimizer step the latest training batch was generated at
        self._since_log: Counter[str] = Counter()
        self.add_callback(_SaveDifficulty(self))
        self.add_callback(_RoundBudget(self))

    # -- the seam: which prompts each round rolls out

    def rollout_sampler(self) -> RoundSampler | None:
        """The sampler of the training rounds (``None``, GRPO's own, unless ``allocation="hsstar"``)."""
        if self.args.allocation != "hsstar":
            return None
        return RoundSampler(
            self,
            batch_size=self.args.generation_batch_size // self.num_generations,
            mini_repeat_count=self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
        )

    def level_of(self, key: str) -> Level | None:
        known = self.difficulty.get(key)
        return None if known is None else known.level

    def draw_round(self, rng: random.Random, k: int) -> list[int]:
        """The dataset indices of the next round's ``k`` prompts."""
        # a prompt already drawn into a round not yet scored is not pre-sampled twice: it weighs as boundary
        levels = [
            Level.BOUNDARY if key in self.pending and key not in self.difficulty else self.level_of(key)
            for key in self.prompt_keys
        ]
        chunk = draw_prompts(
            levels, k, rng, reprobe_rate=self.args.reprobe_rate, presample=self.args.presample
        )
        self.rounds_drawn.append(chunk)
        self.pending.update(self.prompt_keys[i] for i in chunk)
        return chunk

    # -- the observer: each group's rewards update its prompt's difficulty

    def observe_rewards(self, inputs, prompts, completions, rewards_per_func) -> None:
        """Read the gathered rewards of a round: accuracy, the PRM's score, GRPO's total per completion."""
        if not self.model.training:  # an evaluation's rollouts are not the training rounds'
            return
        keys = gather_object([prompt_key(x["prompt"]) for x in inputs])
        scores = None
        if self.process_reward_model is not None:
            columns = {k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion")}
            local = check_rewards(
                self.process_reward_model(prompts, completions, **columns),
                len(prompts),
                reward_source_name(self.process_reward_model),
            )
            scores = gather_object(local)
        accuracy = rewards_per_func[:, self.args.accuracy_reward_index]
        correct = (accuracy >= self.args.correct_threshold).tolist()  # NaN (unscored) is not correct
        weights = self.reward_weights.to(rewards_per_func.device)
        totals = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1).tolist()  # GRPO's reward
        self.observe(keys, correct, scores, totals)
        g = self.num_generations  # TRL's groups: consecutive rows of the gathered round
        self.round_signal = [len(set(totals[i : i + g])) > 1 for i in range(0, len(totals), g)]
        self.rounds_spent += 1
        self._since_log["rounds"] += 1

    def observe(self, keys: list[str], correct: list[bool], scores: list | None, totals: list[float]) -> None:
        """Update each group's prompt from its rollouts and count what was spent (every process, the same)."""
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        for key, rows in groups.items():
            self.pending.discard(key)
            before = self.level_of(key)
            drawn_as = "unprobed" if before is None else before.value
            self.rollouts[drawn_as] += len(rows)
            self._since_log[f"rollouts_{drawn_as}"] += len(rows)
            self._since_log["reprobes"] += before in (Level.EASY, Level.HARD)
            self._since_log["groups"] += 1
            self._since_log["groups_with_signal"] += len({totals[i] for i in rows}) > 1
            self.difficulty[key] = estimate_difficulty(
                [correct[i] for i in rows],
                None if scores is None else [scores[i] for i in rows],
                estimator=self.estimator,
                thresholds=self.args.reward_thresholds,
            )

    # -- DAPO's dynamic sampling: groups without signal dropped, the batch refilled from new rounds

    def generate_rollouts(self, inputs: list[dict], generate) -> dict:
        """One training batch from ``generate`` (TRL's round: generation, rewards, advantages). Under
        ``allocation="dapo"`` this process's groups with equal rewards are dropped and new rounds are generated
        until every process holds a batch of groups with signal, or plain GRPO's rounds are spent (then groups
        without signal fill what is left, as plain GRPO would have trained them)."""
        batch = generate(inputs)
        if self.args.allocation != "dapo" or not self.model.training:
            return batch
        g, n = self.num_generations, len(inputs) // self.num_generations  # groups per process
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        rounds, signal = [batch], [self.round_signal]
        while min(sum(s[q * n : (q + 1) * n].count(True) for s in signal) for q in range(world)) < n:
            if self.rounds_spent >= self.round_budget:
                break
            rounds.append(generate(self.refill_inputs(len(inputs))))
            signal.append(self.round_signal)
        self.generated_at_step = self.state.global_step
        mine = [(r, i) for r, s in enumerate(signal) for i in range(n)]
        picks = [p for p in mine if signal[p[0]][rank * n + p[1]]]
        picks += [p for p in reversed(mine) if not signal[p[0]][rank * n + p[1]]]
        self._since_log["dropped_groups"] += len(mine) - n
        if len(rounds) == 1:
            return batch
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        return concat_groups(rounds, picks[:n], g, tokenizer.pad_token_id, self.accelerator)

    def refill_inputs(self, size: int) -> list[dict]:
        """This process's rows of a new round: distinct prompts drawn uniformly (the same on every process),
        each ``num_generations`` times, split across processes as the dataloader splits a round."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        rng = random.Random(f"{self.args.seed}-refill-{self.rounds_spent}")
        chunk = rng.sample(range(len(self.prompt_keys)), size * world // self.num_generations)
        rows = [index for index in chunk for _ in range(self.num_generations)]
        return [self.train_dataset[index] for index in rows[rank * size : (rank + 1) * size]]

    # -- logging, saving and resuming

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._since_log["groups"] and "loss" in logs:
            counts = self._since_log
            logs["allocation/groups_with_signal"] = counts["groups_with_signal"] / counts["groups"]
            logs["allocation/reprobes"] = counts["reprobes"]
            logs["allocation/rounds"] = counts["rounds"]
            if self.args.allocation == "dapo":
                logs["allocation/dropped_groups"] = counts["dropped_groups"]
            for level in LEVELS:
                logs[f"allocation/rollouts_{level}"] = counts[f"rollouts_{level}"]
            held = Counter(self.level_of(key) for key in self.prompt_keys)
            for level in LEVELS:
                logs[f"allocation/prompts_{level}"] = held[None if level == "unprobed" else Level(level)]
            self._since_log = Counter()
        super().log(logs, start_time)

    def difficulty_state(self) -> dict:
        return {
            "difficulty": {key: d.to_dict() for key, d in self.difficulty.items()},
            "rollouts": dict(self.rollouts),
            "rounds_spent": self.rounds_spent,
        }

    def load_difficulty_state(self, state: dict) -> None:
        self.difficulty = {key: Difficulty.from_dict(row) for key, row in state["difficulty"].items()}
        self.rollouts = Counter(state["rollouts"])
        self.rounds_spent = state.get("rounds_spent", 0)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if checkpoint and os.path.exists(os.path.join(checkpoint, STATE_FILE)):
            with open(os.path.join(checkpoint, STATE_FILE)) as f:
                self.load_difficulty_state(json.load(f))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _probe_reward_model(self, row: dict) -> None:
        """Call the process reward model once on two tiny completions of the first prompt, before any
        generation: a wrong output or a NaN fails here, not an hour into a run."""
        prompts, completions = probe_inputs(row["prompt"], row.get("answer", 1))
        columns = {k: [v] * 2 for k, v in row.items() if k != "prompt"}
        name = reward_source_name(self.process_reward_model)
        check_rewards(self.process_reward_model(prompts, completions, **columns), 2, name, nan_is_error=True)
