"""The documentation: README.md and docs/ link only to files that exist, the mkdocs nav and
docs/ agree, and the README's set-up command is the one CI runs."""
from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def unfenced(text: str) -> list[str]:
    """The lines of ``text`` outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def prose(text: str) -> str:
    """``text`` without code blocks and inline code spans (no links live there)."""
    return "\n".join(re.sub(r"`[^`]*`", "", line) for line in unfenced(text))


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc (mkdocs) gives a heading."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    found = set()
    for line in unfenced(path.read_text()):
        match = re.match(r"#{1,6}\s+(.*?)\s*(\{#([\w-]+)\})?\s*$", line)
        if match:
            found.add(match.group(3) or slug(match.group(1)))
    return found


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_there_are_docs_pages_and_readme_links_to_them():
    assert len(PAGES) >= 10
    readme_targets = {(ROOT / t.split("#")[0]).resolve() for t in relative_links(ROOT / "README.md") if t.startswith("docs/")}
    assert {p.resolve() for p in PAGES} - {(DOCS / "index.md").resolve()} <= readme_targets, "a docs page the README does not link"


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "BENCHMARKS.md", *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_an_existing_file_and_heading(path):
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.is_file(), f"{path.name}: link {target!r} points at a missing file"
        assert ROOT in dest.parents, f"{path.name}: link {target!r} leaves the repository"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{path.name}: link {target!r}: no such heading in {dest.name}"


def test_mkdocs_nav_lists_every_page_once():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python/name:", ""))

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from (pages(value) if isinstance(value, list) else [value])

    nav = list(pages(config["nav"]))
    assert sorted(nav) == sorted(p.name for p in PAGES)


def test_readme_set_up_commands_are_the_ones_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    install = next(line.strip() for line in ci.splitlines() if line.strip().startswith("python3.11 -m venv"))
    test = re.search(r"^\s*(\.venv/bin/python -m pytest)\b", ci, re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    commands = {line.strip() for line in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in line.splitlines()}
    assert f"{install} && {test}" in commands
    assert f"{install} && .venv/bin/python run.py" in commands
    assert shlex.split(install)[:3] == ["python3.11", "-m", "venv"]
