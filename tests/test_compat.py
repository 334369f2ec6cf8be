"""Private upstream state is touched in ``trl_hsstar/_compat.py`` alone, and each use there fails a test here when
the upstream changes it."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import accelerate
import pytest
import transformers
import trl
from datasets import Dataset

import trl_hsstar
from trl_hsstar import _compat

PACKAGE = Path(trl_hsstar.__file__).parent
UPSTREAM = ("transformers", "trl", "accelerate", "peft", "datasets")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.fixture(scope="module")
def upstream_private_names(reasoner_dir, tmp_path_factory):
    """Every private name of TRL's trainers, transformers' Trainer and model, and Accelerate's Accelerator: on
    their classes, and on live instances (attributes set in their constructors)."""
    import peft

    names = set()
    for cls in (
        transformers.Trainer,
        transformers.TrainerState,
        transformers.PreTrainedModel,
        trl.SFTTrainer,
        trl.DPOTrainer,
        trl.GRPOTrainer,
        accelerate.Accelerator,
        peft.PeftModel,
        Dataset,
    ):
        names |= {n for n in dir(cls) if _private(n)}
    out = tmp_path_factory.mktemp("sft")
    trainer = trl.SFTTrainer(
        model=str(reasoner_dir),
        args=trl.SFTConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to="none"),
        train_dataset=Dataset.from_list([{"prompt": "Q: 1+1\nA: ", "completion": "2"}]),
    )
    dpo = trl.DPOTrainer(
        model=str(reasoner_dir),
        args=trl.DPOConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to="none"),
        train_dataset=Dataset.from_list([{"prompt": "Q: 1+1\nA: ", "chosen": "2", "rejected": "3"}]),
    )
    for obj in (trainer, trainer.accelerator, trainer.state, trainer.model, dpo):
        names |= {n for n in vars(obj) if _private(n)}
    return names


def _touches(path: Path, upstream: set[str]) -> list[str]:
    """Private upstream names that ``path`` reads, writes, overrides or imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in upstream:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in upstream:
                    found.append(f"{path.name}:{item.lineno} def {item.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UPSTREAM:
            found += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names if _private(a.name)]
    return found


def test_nothing_outside_compat_touches_private_upstream_state(upstream_private_names):
    assert len(upstream_private_names) > 200  # the net is real: TRL and transformers have hundreds
    touched = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "_compat.py":
            touched[str(path.relative_to(PACKAGE))] = _touches(path, upstream_private_names)
    assert not {k: v for k, v in touched.items() if v}, touched
    # and the check does see what _compat.py does
    assert _touches(PACKAGE / "_compat.py", upstream_private_names)


def test_the_checker_flags_the_old_trainers_private_writes(upstream_private_names, tmp_path):
    """What the trainers did before the redesign is exactly what the check flags."""
    old = tmp_path / "old.py"
    old.write_text(
        "class T:\n"
        "    def _precompute_ref_logps(self, dataset, name, batch_size):\n"
        "        return dataset\n"
        "    def reset(self):\n"
        "        self.accelerator._optimizers.clear()\n"
        "        self._created_lr_scheduler = False\n"
        "        self._precompute_model_hash = 'x'\n"
    )
    assert len(_touches(old, upstream_private_names)) == 4


def test_trainers_resume_through_a_private_loader_whose_signature_is_pinned():
    """``_compat.load_checkpoint`` calls ``Trainer._load_from_checkpoint(resume_from_checkpoint)``."""
    params = list(inspect.signature(transformers.Trainer._load_from_checkpoint).parameters)
    assert params[:2] == ["self", "resume_from_checkpoint"], params
    assert "_load_from_checkpoint" in inspect.getsource(_compat.load_checkpoint)


def test_grpo_seams_override_methods_whose_signatures_are_pinned():
    """HSStarGRPOTrainer replaces GRPO's sampler and reads its gathered rewards through these two methods."""
    assert list(inspect.signature(trl.GRPOTrainer._get_train_sampler).parameters) == ["self", "dataset"]
    assert list(inspect.signature(trl.GRPOTrainer._calculate_rewards).parameters) == [
        "self",
        "inputs",
        "prompts",
        "completions",
        "completion_ids_list",
    ]
    from trl_hsstar.grpo import HSStarGRPOTrainer

    assert HSStarGRPOTrainer.__mro__.index(_compat.GRPOSeams) < HSStarGRPOTrainer.__mro__.index(
        trl.GRPOTrainer
    )
    # the rewards GRPO normalizes per group are gathered across processes before _calculate_rewards returns
    assert "gather(rewards_per_func)" in inspect.getsource(trl.GRPOTrainer._calculate_rewards)
    # DAPO's refills wrap each generation round, and concat_groups rebuilds its text batch: every key TRL can
    # put in a text batch is one concat_groups knows (the others are multimodal, refused), counted the same way
    assert list(inspect.signature(trl.GRPOTrainer._generate_and_score_completions).parameters) == [
        "self",
        "inputs",
    ]
    source = inspect.getsource(trl.GRPOTrainer._generate_and_score_completions)
    keys = set(re.findall(r'output\["(\w+)"\] =', source)) | set(re.findall(r'^\s*"(\w+)": ', source, re.M))
    multimodal = {
        key for key in keys if "image" in key or "pixel" in key or key in {"spatial_shapes", "num_tiles"}
    }
    text = keys - multimodal - {"token_type_ids", "mm_token_type_ids", "num_images"}
    assert {"prompt_ids", "advantages", "num_items_in_batch"} <= text
    assert text <= _compat._GROUPABLE | {"num_items_in_batch"}, text - _compat._GROUPABLE
    assert "num_items_in_batch = self.accelerator.gather(loss_mask.sum()).sum()" in source


def test_bnb_cpu_repacking_switch_still_exists():
    """``keep_bnb_4bit_weights_trainable_on_cpu`` flips a bitsandbytes attribute and calls its unpacking helper."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import modules

    assert callable(getattr(modules, "_convert_weight_packed_for_cpu_inverse", None))
    layer = bnb.nn.Linear4bit(8, 8)
    assert hasattr(layer, "support_avx512bf16_for_cpu")
