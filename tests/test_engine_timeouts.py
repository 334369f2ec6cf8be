"""Every engine and server call is bounded: an engine that is alive but stops answering stops the run with an error
naming `vllm_request_timeout`, instead of stalling it.

No vLLM needed here: the server is a real TCP server that answers its health checks and then keeps every
generation request without answering; the engine is a real child process that answers ``start`` and then never
answers again. With vLLM itself (a SIGSTOPped engine, then a rerun that resumes) the same is tested in
``tests/test_vllm.py``.
"""

from __future__ import annotations

import sys
import time

import pytest
from datasets import Dataset
from helpers.stuck_server import StuckServer
from transformers import AutoTokenizer

from trl_hsstar import artifacts as A
from trl_hsstar.config import HSStarConfig
from trl_hsstar.sampling import EngineError, SamplingParams
from trl_hsstar.sampling.vllm_sampler import EngineTimeout
from trl_hsstar.toy import generate_problems, problems_to_dataset_dict
from trl_hsstar.toy.oracle import OracleStepReward


@pytest.fixture
def stuck_server():
    server = StuckServer()
    yield server
    server.close()


def test_a_server_that_keeps_a_request_unanswered_times_out_naming_the_setting(stuck_server, reasoner_dir):
    from trl_hsstar.sampling import VLLMServerSampler

    sampler = VLLMServerSampler(
        stuck_server.url, AutoTokenizer.from_pretrained(reasoner_dir), request_timeout=1
    )
    sampler.wait_ready(timeout=10)  # alive: it answers its health check
    assert sampler.model == "policy"
    start = time.monotonic()
    with pytest.raises(EngineTimeout, match=r"within 1 s \(`vllm_request_timeout`\).*rerun the same command"):
        sampler.generate(["Q: 1+2\nA: "], [2], SamplingParams(seed=0, max_new_tokens=8))
    assert time.monotonic() - start < 15
    assert stuck_server.posts == 1  # not sent again to a server that is stuck, not restarting


def test_a_run_against_a_stuck_server_stops_with_the_setting_named_and_nothing_half_written(
    stuck_server, reasoner_dir, tmp_path
):
    from trl_hsstar import HSStarTrainer

    args = HSStarConfig(
        output_dir=str(tmp_path / "run"),
        num_iterations=1,
        problems_per_iteration=8,
        sampling_budget=4,
        num_presamples=2,
        reward_thresholds=[0.25, 0.5],
        report_to="none",
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=stuck_server.url,
        vllm_server_timeout=10,
        vllm_request_timeout=1,
    )
    problems = Dataset.from_dict(problems_to_dataset_dict(generate_problems(8, operands=(2, 3), seed=13)))
    trainer = HSStarTrainer(
        model=str(reasoner_dir), args=args, train_dataset=problems, reward_funcs=OracleStepReward()
    )
    start = time.monotonic()
    with pytest.raises(EngineTimeout, match="vllm_request_timeout"):
        trainer.train()
    assert time.monotonic() - start < 60
    store = A.IterationArtifacts(tmp_path / "run", 0)
    assert store.path(A.PROBLEMS).exists()  # what was written before is kept
    assert not store.path(A.samples_file(0)).exists()  # no phase file from a chunk that never came back


STUCK_ENGINE = """
import json, sys, time
out = sys.stdout.buffer
for line in sys.stdin:
    request = json.loads(line)
    if request["cmd"] == "start":
        out.write(b'{"ok": true}\\n'); out.flush()
    else:
        time.sleep(3600)  # alive, never answers
"""


def test_a_child_engine_that_stops_answering_is_stopped_and_the_setting_named(
    reasoner_dir, tmp_path, monkeypatch
):
    from trl_hsstar.sampling import VLLMSampler, vllm_sampler

    script = tmp_path / "stuck_engine.py"
    script.write_text(STUCK_ENGINE)
    monkeypatch.setattr(vllm_sampler, "WORKER", script)  # the engine process the sampler starts
    sampler = VLLMSampler(
        reasoner_dir,
        AutoTokenizer.from_pretrained(reasoner_dir),
        python=sys.executable,
        request_timeout=1,
        log_path=tmp_path / "engine.log",
    )
    sampler.start()
    pid = sampler.pid
    start = time.monotonic()
    with pytest.raises(EngineTimeout, match=r"generate request within 1 s \(`vllm_request_timeout`\)"):
        sampler.generate(["Q: 1+2\nA: "], [2], SamplingParams(seed=0, max_new_tokens=8))
    assert time.monotonic() - start < 15
    assert sampler.pid is None and sampler.restarts == 0  # stopped, not restarted into the same stall
    with pytest.raises(OSError):
        import os

        os.kill(pid, 0)  # the stuck process is gone
    sampler.close()


def test_the_default_request_timeout_is_bounded():
    from trl_hsstar.sampling import VLLMSampler, VLLMServerSampler

    assert HSStarConfig(output_dir="x", report_to="none").vllm_request_timeout == 1800.0
    import inspect

    for cls in (VLLMSampler, VLLMServerSampler):
        assert inspect.signature(cls).parameters["request_timeout"].default == 1800.0
    with pytest.raises(ValueError, match="vllm_request_timeout"):
        HSStarConfig(output_dir="x", report_to="none", vllm_request_timeout=0)
    assert issubclass(EngineTimeout, EngineError)
