"""docs/architecture.md's import graph, kept true by reading every module's syntax tree.

1. No module imports one above it: every module of the package sits in one layer of ``LAYERS`` (bottom to top)
   and imports, at module level or inside a function, only modules of its own layer or below.
2. The pure core imports only the standard library and itself (``tests/test_core_purity.py`` also imports it).
3. Private upstream names appear in ``trl_hsstar/_compat.py`` alone. ``tests/test_compat.py`` covers attribute
   reads and overrides of upstream private state; this file adds what that check does not see:

   - helpers imported from TRL's or transformers' submodules that the library does not make public. The rule:
     ``from trl.a.b import X`` is public when ``X`` is exported by ``trl`` or by a package on the way
     (``trl.a``, or ``trl.a.b`` itself where that is a package), is listed in the module's ``__all__``, or the
     module is in ``PUBLIC_MODULES`` (modules the upstream's docs and examples import from directly);
   - single-underscore upstream names used as a parameter, a keyword argument or a ``getattr`` string;
   - ``KNOWN_PRIVATE``: upstream attributes that are private by convention though not underscored.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from functools import cache
from pathlib import Path

import pytest

import trl_hsstar

PACKAGE = Path(trl_hsstar.__file__).parent

# Bottom to top. A module may import modules of its own layer or of a layer below, never above.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "pure core",
        [
            "trl_hsstar.difficulty",
            "trl_hsstar.budget",
            "trl_hsstar.selection",
            "trl_hsstar.checks",
            "trl_hsstar.records",
        ],
    ),
    (
        "base pieces",
        [
            "trl_hsstar._utils",
            "trl_hsstar._compat",
            "trl_hsstar.artifacts",
            "trl_hsstar.distributed",
            "trl_hsstar.verify",
            "trl_hsstar.data",
            "trl_hsstar.hub",
            "trl_hsstar.callbacks",
            "trl_hsstar.sampling.base",
            # the toy world's problems, tokenizer and models, which rewards and samplers may use
            "trl_hsstar.toy",
            "trl_hsstar.toy.problems",
            "trl_hsstar.toy.tokenizer",
            "trl_hsstar.toy.model",
            "trl_hsstar.toy.train",
        ],
    ),
    (
        "samplers, rewards, models",
        [
            "trl_hsstar.sampling.transformers_sampler",
            "trl_hsstar.sampling.vllm_ext",
            "trl_hsstar.sampling.vllm_ext.hsstar_vllm",
            "trl_hsstar.sampling.vllm_sampler",
            "trl_hsstar.sampling.vllm_server",
            "trl_hsstar.sampling.engine",
            "trl_hsstar.sampling",
            "trl_hsstar.rewards",
            "trl_hsstar.prm",
            "trl_hsstar.models",
            "trl_hsstar.toy.oracle",
        ],
    ),
    (
        "the run's settings and one iteration",
        [
            "trl_hsstar.config",  # checks its fields against rewards, sampling.base, budget and difficulty
            "trl_hsstar.pipeline",
            "trl_hsstar.scoring",
            "trl_hsstar.evaluation",
            "trl_hsstar.toy.world",  # builds the toy models with prm and the samplers
        ],
    ),
    ("trainers", ["trl_hsstar.trainer", "trl_hsstar.grpo", "trl_hsstar.run"]),
    ("toy runs", ["trl_hsstar.toy.experiment", "trl_hsstar.toy.report", "trl_hsstar.toy.recipe"]),
    # the package's lazy re-exports sit on top, beside the command line that reads its version
    ("applications", ["trl_hsstar.recipe", "trl_hsstar.demo", "trl_hsstar.cli", "trl_hsstar"]),
]
LAYER = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
CORE = LAYERS[0][1]


def _module_name(path: Path) -> str:
    parts = ("trl_hsstar", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _owner(name: str) -> str:
    """The package module that ``name`` (a module, or a name in one) lives in."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, source: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every trl_hsstar module that ``source`` imports: anywhere in the file, relative or
    absolute, plus the targets of a lazy ``_LAZY`` table."""
    package = module if MODULES.get(module, Path()).name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, _owner(a.name)) for a in node.names if a.name.split(".")[0] == "trl_hsstar"
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "trl_hsstar":
                continue
            for alias in node.names:  # `from . import demo` imports a module, `from .x import y` a name of x
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else _owner(target)))
        elif (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            for value in node.value.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    name = value.value if value.value.startswith("trl_hsstar") else f"{package}.{value.value}"
                    found.append((value.lineno, _owner(name)))
    return [(line, target) for line, target in found if target != module]


def test_every_module_is_placed_in_one_layer():
    placed = [module for _, modules in LAYERS for module in modules]
    assert len(placed) == len(set(placed)), "a module is in LAYERS twice"
    unplaced = sorted(set(MODULES) - set(placed))
    assert not unplaced, f"place these new modules in LAYERS (tests/test_architecture.py): {unplaced}"
    assert not set(placed) - set(MODULES), (
        f"LAYERS names modules that do not exist: {set(placed) - set(MODULES)}"
    )


def test_no_module_imports_one_above_it():
    upward = []
    for module, path in MODULES.items():
        for line, target in _imports(module, path.read_text(encoding="utf-8")):
            if target in LAYER and LAYER[target] > LAYER.get(module, len(LAYERS)):
                upward.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} ({LAYERS[LAYER[module]][0]}) imports "
                    f"{target} ({LAYERS[LAYER[target]][0]})"
                )
    assert not upward, "\n".join(upward)


def test_the_import_reader_sees_lazy_relative_and_package_imports():
    """What the layer check reads: function-level imports, relative ones, packages and lazy tables."""
    source = (
        "import trl_hsstar.toy.world as w\n"
        "from . import __version__, demo\n"
        "from .sampling import Sampler\n"
        "def f():\n"
        "    from .config import HSStarConfig\n"
        "_LAZY = {'HSStarTrainer': 'trainer'}\n"
    )
    assert sorted(t for _, t in _imports("trl_hsstar", source)) == [
        "trl_hsstar.config",
        "trl_hsstar.demo",
        "trl_hsstar.sampling",
        "trl_hsstar.toy.world",
        "trl_hsstar.trainer",
    ]
    assert _imports("trl_hsstar.sampling.engine", "def f():\n    from ..config import x\n") == [
        (2, "trl_hsstar.config")
    ]


@pytest.mark.parametrize("module", CORE)
def test_the_pure_core_imports_only_the_standard_library_and_the_core(module):
    """Unlike tests/test_core_purity.py, this covers every module of the core layer, records included."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top == "__future__" or top in sys.stdlib_module_names or _owner(name) in CORE, (
                f"{module}:{node.lineno} imports {name}"
            )
    assert {target for _, target in _imports(module, MODULES[module].read_text(encoding="utf-8"))} <= set(
        CORE
    )


# --- private upstream names --------------------------------------------------------------------------------

UPSTREAM = ("trl", "transformers")
# Modules whose public names are imported from them directly in the upstream's own docs and example scripts.
PUBLIC_MODULES = {
    "transformers.trainer_utils"
}  # get_last_checkpoint, PREFIX_CHECKPOINT_DIR, rotate_checkpoints
# Upstream attributes without an underscore that the upstream still treats as its own.
KNOWN_PRIVATE = {"tb_writer"}  # TensorBoardCallback's writer: created in its hooks, no public accessor
# The upstream modules whose classes trl_hsstar subclasses, configures or calls: their underscore names.
UPSTREAM_SOURCES = (
    "transformers.trainer",
    "transformers.trainer_callback",
    "transformers.trainer_utils",
    "transformers.training_args",
    "transformers.modeling_utils",
    "transformers.configuration_utils",
    "transformers.tokenization_utils_base",
    "transformers.integrations.integration_utils",
    "trl.trainer.sft_trainer",
    "trl.trainer.sft_config",
    "trl.trainer.dpo_trainer",
    "trl.trainer.dpo_config",
    "trl.trainer.grpo_trainer",
    "trl.trainer.grpo_config",
    "accelerate.accelerator",
    "peft.peft_model",
)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _source_file(module: str) -> Path:
    """The file of an upstream module, found without importing it."""
    top, *rest = module.split(".")
    path = Path(importlib.util.find_spec(top).submodule_search_locations[0]).joinpath(*rest)
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"


@cache
def _exports(package: str) -> frozenset[str]:
    """The names an upstream package exports; its lazy names are listed without importing torch."""
    return frozenset(dir(importlib.import_module(package)))


@cache
def _is_public(module: str, name: str) -> bool:
    """Whether ``from module import name`` uses a public upstream name (the rule in the module docstring)."""
    if _private(name):
        return False
    parts = module.split(".")
    packages = [".".join(parts[:i]) for i in range(1, len(parts))]
    if _source_file(module).name == "__init__.py":
        packages.append(module)
    if any(name in _exports(package) for package in packages):
        return True
    if module in PUBLIC_MODULES:
        return True
    for node in ast.parse(_source_file(module).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return name in ast.literal_eval(node.value)
    return False


@pytest.fixture(scope="module")
def upstream_underscore_names() -> frozenset[str]:
    """Underscore names the upstream sources define: functions, parameters and ``self._x`` attributes."""
    names = set()
    for module in UPSTREAM_SOURCES:
        for node in ast.walk(ast.parse(_source_file(module).read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
                names |= {a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs}
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return frozenset(filter(_private, names))


def _private_uses(path: Path, source: str, upstream: frozenset[str]) -> list[str]:
    """``file:line what`` for each private upstream name ``source`` imports, declares, passes or reads."""
    name = path.relative_to(PACKAGE).as_posix() if path.is_relative_to(PACKAGE) else path.name
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            top = node.module.split(".")[0]
            if top in UPSTREAM and node.module != top:
                found += [
                    (node.lineno, f"imports {a.name} from {node.module} (not public in {top})")
                    for a in node.names
                    if not _is_public(node.module, a.name)
                ]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            found += [(a.lineno, f"parameter {a.arg}") for a in args if a.arg in upstream]
        elif isinstance(node, ast.Call):
            found += [(node.lineno, f"keyword {k.arg}") for k in node.keywords if k.arg in upstream]
            if (
                isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in upstream | KNOWN_PRIVATE
            ):
                found.append((node.lineno, f"{node.func.id} {node.args[1].value!r}"))
        elif isinstance(node, ast.Attribute) and node.attr in KNOWN_PRIVATE:
            found.append((node.lineno, f".{node.attr}"))
    return [f"{name}:{line} {what}" for line, what in sorted(found)]


def test_nothing_outside_compat_uses_private_upstream_helpers_or_names(upstream_underscore_names):
    uses = []
    for path in MODULES.values():
        if path.name != "_compat.py":
            uses += _private_uses(path, path.read_text(encoding="utf-8"), upstream_underscore_names)
    assert not uses, "move these into trl_hsstar/_compat.py:\n" + "\n".join(uses)


def test_the_private_name_check_flags_private_uses_and_passes_public_ones(
    upstream_underscore_names, tmp_path
):
    """The net is real (it holds what the old trainer used), and public upstream names pass through it."""
    assert len(upstream_underscore_names) > 100
    assert {"_internal_call", "_name_or_path"} <= upstream_underscore_names
    public = (
        "from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint\n"
        "from transformers.trainer_utils import rotate_checkpoints\n"
        "from transformers.utils import logging\n"
        "from transformers.integrations import get_reporting_integration_callbacks\n"
        "from trl.models.utils import unwrap_model_for_generation\n"
        "from trl import SFTTrainer\n"
        "def save_model(self, output_dir=None, internal_call=False):\n"
        "    return getattr(self.model.config, 'name_or_path', None)\n"
    )
    assert _private_uses(tmp_path / "public.py", public, upstream_underscore_names) == []
    old = (
        "from trl.trainer.utils import create_model_from_path\n"
        "def save_model(self, output_dir=None, _internal_call=False):\n"
        "    super().save_model(output_dir, _internal_call=_internal_call)\n"
        "    writer = getattr(callback, 'tb_writer', None) or callback.tb_writer\n"
        "    return getattr(self.model.config, '_name_or_path', None)\n"
    )
    assert _private_uses(tmp_path / "old.py", old, upstream_underscore_names) == [
        "old.py:1 imports create_model_from_path from trl.trainer.utils (not public in trl)",
        "old.py:2 parameter _internal_call",
        "old.py:3 keyword _internal_call",
        "old.py:4 .tb_writer",
        "old.py:4 getattr 'tb_writer'",
        "old.py:5 getattr '_name_or_path'",
    ]
