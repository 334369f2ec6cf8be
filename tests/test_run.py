"""The run around the passes (``trl_hsstar.run``): whose callbacks the run log drives, and a setup that fails
cleanly. The runs use the scripted sampler and the shipped toy reasoner."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from transformers import PrinterCallback, ProgressCallback
from transformers.integrations import TensorBoardCallback
from transformers.utils import logging as hf_logging

from trl_hsstar.callbacks import HSStarCallback

sys.path.insert(0, str(Path(__file__).parent))
from helpers.scripted import ScriptedSampler
from test_trl_contract import config, problems, scripted_trainer

from trl_hsstar.toy.oracle import OracleStepReward
from trl_hsstar.trainer import HSStarTrainer


class MyProgress(ProgressCallback, HSStarCallback):
    """A user's own progress callback that also listens to HS-STaR events."""

    def __init__(self):
        super().__init__()
        self.iterations: list[int] = []

    def on_iteration_begin(self, args, state, control, iteration=None, **kwargs):
        self.iterations.append(iteration)


def trainer_with(reasoner_dir, output_dir, callbacks, **overrides):
    return HSStarTrainer(
        model=str(reasoner_dir),
        args=config(output_dir, **overrides),
        train_dataset=problems(16),
        reward_funcs=OracleStepReward(),
        sampler=ScriptedSampler(),
        callbacks=callbacks,
    )


def test_the_run_keeps_the_users_callbacks_and_drives_only_transformers_trackers(reasoner_dir, tmp_path):
    mine, my_board = MyProgress(), TensorBoardCallback()
    trainer = trainer_with(reasoner_dir, tmp_path, [mine, my_board], report_to="tensorboard")
    printers = [
        c for c in trainer.callback_handler.callbacks if isinstance(c, (PrinterCallback, ProgressCallback))
    ]
    assert printers == [mine]  # transformers' printer is gone (the run prints its table); the user's is kept
    trackers = trainer.run_log.trackers
    assert len(trackers) == 1 and isinstance(trackers[0], TensorBoardCallback) and trackers[0] is not my_board
    trainer.train()
    assert mine.iterations == [0]  # HS-STaR events reach the user's callback


def test_a_tracker_that_fails_to_start_leaves_the_progress_bars_as_they_were(
    reasoner_dir, tmp_path, monkeypatch
):
    def refuse(self, *args, **kwargs):
        raise RuntimeError("tracker down")

    monkeypatch.setattr(TensorBoardCallback, "on_train_begin", refuse)
    trainer = scripted_trainer(reasoner_dir, tmp_path, report_to="tensorboard", disable_tqdm=True)
    assert hf_logging.is_progress_bar_enabled()
    with pytest.raises(RuntimeError, match="tracker down"):
        trainer.train()
    assert hf_logging.is_progress_bar_enabled()  # the setup's quiet bars were undone with it


def test_fsdp_asked_for_on_cpu_is_said_at_once(reasoner_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level(logging.WARNING, logger="trl_hsstar.data"):
        scripted_trainer(reasoner_dir, tmp_path)
    assert "shards only accelerator" in caplog.text
