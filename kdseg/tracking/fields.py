"""What a kdseg run fills in of MLflow's standard fields: where it came from (source, user, commit,
command line), what it read (dataset inputs), what it is (a markdown description), and which of the
resolved config's keys are worth a param.

The resolved config stays whole in the run folder's ``config.yaml`` (also an artifact); params leave
out plumbing (``_target_``, ``logger.*``, ``paths.*``) and the options of terms at weight 0, which
otherwise fill the runs table with columns nobody compares.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from kdseg.utils import is_setting

ROOT = Path(__file__).resolve().parents[2]
PLUMBING_PREFIXES = ("logger.", "paths.", "hydra.")
"""Config keys that say where things go, not what is trained: kept in config.yaml, not as params."""
TERM_KEY = re.compile(r"^loss\.terms\.([^.]+)\.")
DIGEST_CHARS = 16
"""Hex digits of a dataset input's digest (a hash of its sample list; MLflow keeps up to 36)."""
DESCRIPTION_TAG = "mlflow.note.content"
"""The tag MLflow shows as a run's description."""
PARENT_TAG = "mlflow.parentRunId"
"""The tag that nests a run under another in MLflow's runs table."""


# ------------------------------------------------------------------------------ params


def inactive_terms(flat: Mapping[str, Any]) -> set[str]:
    """Names of the flattened config's terms at weight 0 (or a weight that is not a number)."""
    out = set()
    for key, value in flat.items():
        m = TERM_KEY.match(key)
        if m and key.endswith(".weight"):
            try:
                if not float(value) > 0:
                    out.add(m.group(1))
            except (TypeError, ValueError):
                out.add(m.group(1))
    return out


def is_param(key: str, inactive: set[str]) -> bool:
    """Whether a flattened config key is logged as a param: a setting (not a loss option's search
    space), not plumbing (:data:`PLUMBING_PREFIXES`, Hydra's ``_target_`` / ``_partial_`` keys), and
    not an option of an inactive term."""
    last = key.rsplit(".", 1)[-1]
    if not is_setting(key) or key.startswith(PLUMBING_PREFIXES) or (last.startswith("_") and last.endswith("_")):
        return False
    m = TERM_KEY.match(key)
    return not (m and m.group(1) in inactive)


def select_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config's :func:`is_param` keys."""
    inactive = inactive_terms(flat)
    return {key: value for key, value in flat.items() if is_param(key, inactive)}


# ------------------------------------------------------------------------------ source


@lru_cache(maxsize=8)
def git_state(path: str | os.PathLike = ROOT) -> tuple[str, bool | None]:
    """(commit, dirty) of the repository at ``path``: ``unknown`` and None outside git. Dirty means a
    tracked file differs from the commit (untracked files do not count)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, check=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return commit, dirty


def command_line() -> str:
    """The command that started this process, as typed (``python run.py -m seed=0,1 ...``)."""
    return shlex.join(["python", *sys.argv])


def job_overrides() -> list[str] | None:
    """This Hydra job's own overrides (a multirun child's one value per swept key); None outside Hydra."""
    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def source_tags() -> dict[str, str]:
    """MLflow's source fields (Source, User, Version) and kdseg's: whether the tree was dirty, the
    command line and the job's overrides."""
    commit, dirty = git_state()
    entry = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    tags = {
        "mlflow.source.name": str(Path(entry).resolve()) if Path(entry).is_file() else entry,  # run.py, or pytest's entry
        "mlflow.source.type": "LOCAL",
        "mlflow.user": _user(),
        "mlflow.source.git.commit": commit,
        "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
        "command": command_line(),
    }
    overrides = job_overrides()
    if overrides is not None:
        tags["overrides"] = " ".join(overrides)
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


# ------------------------------------------------------------------------------ dataset inputs


def dataset_inputs(dataset_cfg: Mapping[str, Any], datasets: Sequence[Any]) -> list[tuple[dict[str, str], str]]:
    """The run's train and val data as MLflow dataset inputs, ``(fields, context)``: name, a digest
    of the sample list (the files' paths, relative to the root), the source (root and split list) and a
    profile (sample count, skipped samples, the generator's settings of the built-in data, the
    tuning split). A tuning run's "val" is the part of the train split held out for tuning."""
    root = Path(str(dataset_cfg.get("root")))
    tuning = dataset_cfg.get("tune_fraction") is not None
    out = []
    for split, dataset in zip(("train", "val"), datasets):
        listed = "\n".join(_relative(path, root) for pair in dataset.samples for path in pair)
        profile: dict[str, Any] = {"num_samples": len(dataset), "skipped": len(getattr(dataset, "skipped", ()))}
        if dataset_cfg.get("generated"):
            profile["generator"] = {k: dataset_cfg.get(k) for k in ("num_train", "num_val", "image_size", "seed")}
        source: dict[str, Any] = {"root": str(root), "split": _split_name(dataset_cfg, split, tuning)}
        if tuning:
            source |= {"tune_fraction": dataset_cfg.get("tune_fraction"), "tune_seed": dataset_cfg.get("tune_seed")}
        fields = {
            "name": f"{dataset_cfg.get('name')}/{'tune-' if tuning else ''}{split}",
            "digest": hashlib.sha1(listed.encode()).hexdigest()[:DIGEST_CHARS],
            "source_type": "local",
            "source": json.dumps(source, sort_keys=True),
            "profile": json.dumps(profile, sort_keys=True),
        }
        out.append((fields, "training" if split == "train" else ("tuning" if tuning else "validation")))
    return out


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _split_name(dataset_cfg: Mapping[str, Any], split: str, tuning: bool) -> str:
    if tuning:
        split = "train"  # both parts come from the train split
    for key in (f"{split}_list", f"{split}_split"):
        if dataset_cfg.get(key) is not None:
            return str(dataset_cfg.get(key))
    return split


# ------------------------------------------------------------------------------ description


def describe(
    what: str,
    model: str,
    teacher: str | None = None,
    terms: Mapping[str, float] | None = None,
    dataset: str | None = None,
    seed: Any = None,
    result: Mapping[str, float] | None = None,
    run_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] | None = None,
) -> str:
    """A run's markdown description: what it trains (task, model, teacher, active terms and their
    weights, data, seed), its result (final and best val mIoU, in %) once known, the command and, for
    a job of a multirun, its own ``overrides``."""
    head = f"**{what}** `{model}`"
    if teacher:
        head += f" from teacher `{teacher}`"
    lines = [head]
    if terms is not None:
        lines.append("terms: " + (", ".join(f"`{name}` × {weight:g}" for name, weight in terms.items()) or "none (cross-entropy only)"))
    if dataset:
        lines.append(f"data: `{dataset}`" + (f", seed {seed}" if seed is not None else ""))
    if result:
        parts = [f"final val mIoU **{100 * result['final_miou']:.2f}%**"]
        if "best_miou" in result:
            parts.append(f"best {100 * result['best_miou']:.2f}%")
        lines.append(", ".join(parts))
    text = "  \n".join(lines) + "\n\n```\n" + command_line() + "\n```\n"
    if overrides is not None:
        text += f"\nthis job of the multirun: `{' '.join(overrides) or '(no overrides)'}`\n"
    if run_dir is not None:
        text += f"\nrun folder: `{run_dir}`\n"
    return text
