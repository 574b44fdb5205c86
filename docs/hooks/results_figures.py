"""mkdocs hook: serve the repository's ``results/`` figures in the site.

The results pages show the figures the sweeps wrote under ``results/`` at the repository
root, which is outside ``docs/``. The pages link them as ``../results/...`` (so the links
also work when the Markdown is read on GitHub); this hook adds every ``results/**/*.png``
to the build as ``results/...`` and rewrites those links to it, so the site never holds a
copy that could drift from the files the sweeps wrote.
"""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = "results"


def _repo_root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files, config):
    root = _repo_root(config)
    for png in sorted((root / RESULTS).rglob("*.png")):
        files.append(File.generated(config, png.relative_to(root).as_posix(), abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")
    outside = re.escape("../" * (depth + 1) + RESULTS + "/")
    return re.sub(r"\]\(" + outside, "](" + "../" * depth + RESULTS + "/", markdown)
