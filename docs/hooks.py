"""mkdocs hooks: the README is the home page, and the configuration reference is generated from the fields."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- config-reference -->"


def on_files(files, config):
    """The README, its links made relative to docs/, as index.md."""
    text = (REPO / "README.md").read_text()
    text = re.sub(r"\]\(docs/", "](", text)
    # links to the repository's other folders (recipes/, benchmarks/...) are not pages of the site: their text stays
    text = re.sub(r"\[([^\]]+)\]\((?!https?:|#|[\w./-]+\.md)[^)]*\)", r"\1", text)
    files.append(File.generated(config, "index.md", content=text))
    return files


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f"`{f.default_factory()!r}`"  # type: ignore[misc]
    return "required"


def config_reference() -> str:
    """A table of HSStarArguments' fields: name, type, default, help."""
    from trl_hsstar.config import HSStarArguments

    rows = ["| field | type | default | what it does |", "|---|---|---|---|"]
    for f in dataclasses.fields(HSStarArguments):
        help_text = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
        kind = str(f.type).replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{kind}` | {_default(f).replace('|', chr(92) + '|')} | {help_text} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, config_reference())
    return markdown
