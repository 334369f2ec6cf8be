"""The algorithm's core (difficulty, budget, selection) stays pure Python."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import trl_hsstar

CORE = ["difficulty", "budget", "selection", "checks"]
HEAVY = ["torch", "transformers", "trl", "accelerate", "datasets", "peft", "numpy", "math_verify"]


def test_importing_the_core_leaves_heavy_libraries_unimported():
    code = (
        "import sys\n"
        + "".join(f"import trl_hsstar.{m}\n" for m in CORE)
        + "import trl_hsstar\n"
        + "trl_hsstar.allocate, trl_hsstar.Level, trl_hsstar.select_dpo_pairs\n"
        + f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("module", CORE)
def test_core_imports_only_the_standard_library_and_the_core(module):
    path = Path(trl_hsstar.__file__).parent / f"{module}.py"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only other core modules
                assert node.module in CORE, f"{module} imports .{node.module}"
                continue
            names = [node.module.split(".")[0]]
        else:
            continue
        for name in names:
            assert name == "__future__" or name in sys.stdlib_module_names, f"{module} imports {name}"


def test_lazy_top_level_names():
    assert trl_hsstar.allocate.__module__ == "trl_hsstar.budget"
    with pytest.raises(AttributeError):
        trl_hsstar.does_not_exist  # noqa: B018
