"""Every generated section of the docs is a function of a committed record: the benchmark script that owns a section
renders it from its record under ``benchmarks/results/`` alone, and the docs hold exactly that text. Every record
says where it comes from (commit, command, machine), and the shipped checkpoints' figures in toy_world.md are
their build files'. Pure rendering from JSON: no model, no torch."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

SECTION = re.compile(r"<!-- ([\w-]+(?::[\w-]+)?):start -->.*?<!-- \1:end -->", re.S)
OWNED_ELSEWHERE = {
    "bench_study": "the pre-registered study, from a folder of records: test_the_study_and_the_demo_are_their_records",
    "bench_demo": "the demo's timing, with a line in the README: test_the_study_and_the_demo_are_their_records",
}
"""Sections checked by their own test below."""
REGENERATE = {
    "bench_methods": "hsstar bench --report-only",
    "world_regime": "python benchmarks/world_regime.py --report-only",
}
"""The command that rewrites a section from its record, where it is not ``python benchmarks/<owner>.py
--report-only --output <page>``."""
ABSOLUTE = ("/work/", "/home/", "/tmp/", "/root/")


def sections() -> list[tuple[str, str, str]]:
    """(page, section name, the section's text with its markers) of every marked section under docs/."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        starts = re.findall(r"<!-- ([\w:-]+):start -->", text)
        matched = [m.group(1) for m in SECTION.finditer(text)]
        assert sorted(starts) == sorted(matched), f"{page.name}: a start marker without its end marker"
        found += [(str(page.relative_to(ROOT)), m.group(1), m.group(0)) for m in SECTION.finditer(text)]
    return found


SECTIONS = sections()


def owner(name: str) -> str:
    return name.split(":")[0]


def provenance(record: dict) -> dict:
    """Where a record keeps its commit, command and machine: its ``meta``, else its top level."""
    return record.get("meta", record)


def test_the_known_sections_are_found():
    names = {owner(name) for _, name, _ in SECTIONS}
    known = {
        "bench_sampling",
        "bench_m0",
        "bench_methods",
        "bench_vllm",
        "bench_smollm2",
        "bench_calibration",
    }
    known |= {"bench_grpo", "bench_scale", "world_regime", "bench_grpo_study", "bench_grpo_smollm2"}
    assert known <= names, f"sections missing from the docs: {sorted(known - names)}"


@pytest.mark.parametrize(
    ("page", "name", "text"),
    [s for s in SECTIONS if owner(s[1]) not in OWNED_ELSEWHERE],
    ids=[f"{s[0]}:{s[1]}" for s in SECTIONS if owner(s[1]) not in OWNED_ELSEWHERE],
)
def test_each_section_is_its_record_rendered(page, name, text):
    script = owner(name)
    assert (ROOT / "benchmarks" / f"{script}.py").exists(), f"{page}: no benchmarks/{script}.py owns {name}"
    module = importlib.import_module(script)
    regenerate = REGENERATE.get(script, f"python benchmarks/{script}.py --report-only --output {page}")
    record_path = ROOT / module.RESULTS
    if not record_path.exists():  # figures without a record are not shown
        assert "not kept as a record" in text and f"python benchmarks/{script}.py" in text, (
            f"{page}: section {name} has no record ({module.RESULTS}); it must say that its figures were not kept "
            "as a record and give the command that measures them"
        )
        assert not [line for line in text.splitlines() if line.startswith("|")], (
            f"{page}: section {name} has no record ({module.RESULTS}) but shows a table"
        )
        return
    record = json.loads(record_path.read_text())
    rendered = module.render(record)
    assert text == rendered, (
        f"{page}: section {name} is not what its record renders ({module.RESULTS}); rewrite it with `{regenerate}`"
    )
    meta = provenance(record)
    assert meta["commit"] in rendered and meta["command"] in rendered, (
        f"{page}: section {name} does not show its record's commit and command"
    )


RECORDS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


@pytest.mark.parametrize("path", RECORDS, ids=[p.name for p in RECORDS])
def test_every_record_carries_its_provenance(path):
    meta = provenance(json.loads(path.read_text()))
    missing = [key for key in ("commit", "command", "machine") if not meta.get(key)]
    assert not missing, f"benchmarks/results/{path.name} lacks {', '.join(missing)}"
    machine_paths = [p for p in ABSOLUTE if p in meta["command"]]
    assert not machine_paths, (
        f"benchmarks/results/{path.name}: its command names a path of one machine ({machine_paths[0]}...): "
        "use bench_methods.portable_command"
    )


def test_toy_world_quotes_the_shipped_builds():
    """The figures docs/toy_world.md gives of the shipped checkpoints are those of their build files."""
    from trl_hsstar.toy.world import CHECKPOINTS, LEVELS

    doc = " ".join((ROOT / "docs" / "toy_world.md").read_text().split())
    m0 = json.loads((CHECKPOINTS / "m0" / "build.json").read_text())
    quoted = (
        f"The shipped M_0 stopped at step {m0['steps_trained']:,} ({m0['seconds']} s on an {m0['cpu']}, "
        f"{m0['torch_threads']} threads)."
    )
    levels = json.loads((CHECKPOINTS / "m0" / "levels.json").read_text())
    accuracy = (
        "Its greedy held-out accuracy: "
        + ", ".join(f"{lv} {levels[lv]:.2f}" for lv in LEVELS)
        + f"; {levels['all']:.3f} in all."
    )
    prm = json.loads((CHECKPOINTS / "prm" / "prm_metrics.json").read_text())
    step_accuracy = (
        f"{prm['eval_step_accuracy']:.3f} on held-out steps, against {prm['majority_accuracy']:.3f} for always "
        "answering the majority label"
    )
    sizes = [p.stat().st_size / 1e6 for p in CHECKPOINTS.glob("*/model.safetensors")]
    size = f"{min(sizes):.1f} to {max(sizes):.1f} MB each"
    for figure in (quoted, accuracy, step_accuracy, size):
        assert figure in doc, f"docs/toy_world.md does not quote the shipped checkpoints as built: {figure!r}"


def _section(text: str, marks: tuple[str, str]) -> str | None:
    if marks[0] not in text:
        return None
    return text[text.index(marks[0]) : text.index(marks[1]) + len(marks[1])]


def test_the_study_and_the_demo_are_their_records():
    """The pre-registered study's section and README line are its records (benchmarks/results/study/) rendered; the
    demo's section and README line are its record rendered."""
    import bench_demo
    import bench_study

    docs, readme = (ROOT / "docs" / "benchmarks.md").read_text(), (ROOT / "README.md").read_text()
    records = bench_study.read_records(ROOT / "benchmarks" / "results" / "study")
    assert records, "the study has no records"
    for name, record in records.items():
        missing = [key for key in ("commit", "command", "machine") if not record.get(key)]
        assert not missing, f"benchmarks/results/study/{name}.json lacks {', '.join(missing)}"
        assert not [p for p in ABSOLUTE if p in record["command"]], (
            f"study/{name}.json: a path of one machine"
        )
    again = "hsstar bench --protocol --report-only"
    assert _section(docs, bench_study.MARKS) == bench_study.report(
        records, bench_study.power_calculation()
    ), f"docs/benchmarks.md: the study's section is not what its records render; rewrite it with `{again}`"
    assert _section(readme, bench_study.README_MARKS) == bench_study.readme_line(records), (
        f"README.md: the study's line is not what its records render; rewrite it with `{again}`"
    )
    demo = json.loads((ROOT / "benchmarks" / "results" / "bench_demo.json").read_text())
    section, line = bench_demo.render(demo)
    assert (
        _section(docs, bench_demo.MARKS) == section and _section(readme, bench_demo.README_MARKS) == line
    ), (
        "the demo's section or README line is not what its record renders; rewrite them with "
        "`python benchmarks/bench_demo.py --report-only`"
    )
    assert demo["command"] in section and demo["commit"] in section and demo["commit"] in line


def test_republish_writes_a_section_and_its_readme_line(tmp_path):
    import bench_methods

    record = tmp_path / "r.json"
    record.write_text(json.dumps({"x": 7}))
    docs, readme = tmp_path / "docs.md", tmp_path / "README.md"
    docs.write_text("# Page\n<!-- a:start -->\nold\n<!-- a:end -->\ntail\n")
    readme.write_text("top\n<!-- a:readme:start -->\nold\n<!-- a:readme:end -->\n")

    def render(r):
        return (
            f"<!-- a:start -->\nx={r['x']}\n<!-- a:end -->",
            f"<!-- a:readme:start -->\nx is {r['x']}\n<!-- a:readme:end -->",
        )

    bench_methods.republish(
        render,
        results=str(record),
        output=str(docs),
        marks=("<!-- a:start -->", "<!-- a:end -->"),
        readme=str(readme),
        readme_marks=("<!-- a:readme:start -->", "<!-- a:readme:end -->"),
    )
    assert docs.read_text() == "# Page\n<!-- a:start -->\nx=7\n<!-- a:end -->\ntail\n"
    assert readme.read_text() == "top\n<!-- a:readme:start -->\nx is 7\n<!-- a:readme:end -->\n"
    with pytest.raises(SystemExit, match="no record to render"):
        bench_methods.republish(render, results=str(tmp_path / "none.json"), output=None, marks=("a", "b"))
