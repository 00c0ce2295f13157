"""docs/results.md's tables, generated from the committed sweep data so that they cannot drift from it.

    python -m tasks.results_doc --check    # exit 1 naming every block that differs from its data
    python -m tasks.results_doc --write    # regenerate every block in place

A block in docs/results.md is the text between ``<!-- results: <name> -->`` and ``<!-- /results -->``: the
comparison of ``docs/results/<name>/comparison.json`` (written by ``flows.sweep``, which publishes each preset's
comparison there) as :func:`tasks.sweep.comparison_markdown` renders it, without its title; or, for a name
``<folder>/<file>.md``, that committed markdown file (e.g. a search's summary.md) without its first heading.
The text around the blocks is prose and is not generated; tests/unit/test_results_doc.py fails when a block
and its data disagree.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import typer

from gkd_core.io import atomic_write
from tasks.sweep import RESULTS_DIR, comparison_markdown

ROOT = Path(__file__).resolve().parents[1]
DOC = "docs/results.md"
_BLOCK = re.compile(r"(<!-- results: (?P<name>[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+\.md)?) -->\n)(?P<body>.*?)"
                    r"(<!-- /results -->)", re.S)


def render(root: Path, name: str) -> str:
    """The block ``name``: a comparison (``docs/results/<name>/comparison.json``) or a committed markdown file
    (``docs/results/<folder>/<file>.md``); FileNotFoundError names the missing file."""
    if ".." in name.split("/"):
        raise FileNotFoundError(f"{root / DOC}: the block 'results: {name}' leaves docs/results")
    is_file = name.endswith(".md")
    path = root / RESULTS_DIR / (name if is_file else f"{name}/comparison.json")
    if not path.is_file():
        raise FileNotFoundError(f"{root / DOC}: the block 'results: {name}' has no data: {path} is missing")
    if is_file:
        lines = path.read_text().splitlines()
        body = lines[1:] if lines and lines[0].startswith("#") else lines
        return "\n".join(body).strip() + "\n"
    return comparison_markdown(json.loads(path.read_text()), heading=False).strip() + "\n"


def generated(root: Path = ROOT) -> tuple[str, str, list[str]]:
    """(the doc as it is, the doc with every block regenerated, the names of the blocks that differ)."""
    text = (root / DOC).read_text()
    stale: list[str] = []

    def fill(match: re.Match[str]) -> str:
        body = render(root, match.group("name"))
        if body != match.group("body"):
            stale.append(match.group("name"))
        return match.group(1) + body + match.group(4)

    return text, _BLOCK.sub(fill, text), stale


def main(check: bool = typer.Option(False, "--check", help="exit 1 if a block differs from its data"),
         write: bool = typer.Option(False, "--write", help="regenerate the blocks in place"),
         root: Path = typer.Option(ROOT, help="the project folder")) -> None:
    """Check or regenerate docs/results.md's tables from docs/results/<name>/comparison.json."""
    try:
        current, wanted, stale = generated(root)
    except FileNotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    blocks = len(_BLOCK.findall(current))
    if write:
        if wanted != current:
            with atomic_write(root / DOC) as fh:
                fh.write(wanted)
        typer.echo(f"{DOC}: {blocks} generated block(s), {len(stale)} rewritten ({', '.join(stale) or 'none'})")
    elif stale:
        typer.echo(f"{DOC}: the blocks {stale} differ from docs/results/<name>/comparison.json: "
                   "python -m tasks.results_doc --write", err=True)
        raise typer.Exit(1)
    else:
        typer.echo(f"{DOC}: {blocks} generated block(s), all match their data")


if __name__ == "__main__":
    sys.exit(typer.run(main))
