"""Multirun support: a sweep is an MLflow parent run with every job nested under it, and the seed
summary (tables, gains and qualitative figures, summary metrics) is the parent's when the sweep ends.

The parent's id is kept in ``<sweep dir>/mlflow_sweep.json``, which every job of the sweep reads
(whatever launches it: in this process, a fused group, joblib workers, SLURM tasks); a relaunched
sweep reopens the same parent.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdseg.dist import is_main
from kdseg.errors import one_line
from kdseg.figure import qualitative_figure
from kdseg.report import RunRecord, extra_columns, load_runs, student_order, summarize, write_summary
from kdseg.tracking import Tracker
from kdseg.tracking.fields import DESCRIPTION_TAG, PARENT_TAG, source_tags
from kdseg.viz import save_gain_figure

SWEEP_ID_CHARS = 10
"""Hex digits of a sweep id (the ``sweep_id`` tag of every run of a multirun): short enough to
type in ``python -m kdseg.report --sweep-id``, and one user's sweep folders do not collide."""


def sweep_id_for(sweep_dir: str | os.PathLike) -> str:
    """A short, stable id of a multirun: a hash of its (absolute) sweep folder."""
    return hashlib.sha1(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:SWEEP_ID_CHARS]


def current_sweep() -> tuple[str, str]:
    """(sweep id, sweep folder) of the multirun this job belongs to; empty strings otherwise."""
    if not HydraConfig.initialized():
        return "", ""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return "", ""
    return sweep_id_for(hydra_cfg.sweep.dir), str(Path(hydra_cfg.sweep.dir).resolve())


SWEEP_FILE = "mlflow_sweep.json"
"""In a sweep folder: the sweep's MLflow parent run (``parent_run_id``) and its swept keys (``swept``)."""
SWEEP_TASK = "sweep"
"""The ``task`` tag of a sweep's parent run."""


def sweep_record(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """The sweep folder's :data:`SWEEP_FILE` (empty where there is none, e.g. tracking off)."""
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def parent_tags() -> dict[str, str]:
    """``mlflow.parentRunId`` of a job of a tracked multirun: nests its run under the sweep's."""
    _, sweep_dir = current_sweep()
    parent = sweep_record(sweep_dir).get("parent_run_id") if sweep_dir else None
    return {PARENT_TAG: parent} if parent else {}


def swept_keys() -> list[str]:
    """The keys this job's multirun sweeps (``seed`` and ``loss`` of ``seed=0,1 loss=none,pi_pa``)."""
    _, sweep_dir = current_sweep()
    return list(sweep_record(sweep_dir).get("swept", [])) if sweep_dir else []


def sweep_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """A multirun's overrides as ``{key: value as typed}`` and the keys it sweeps."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    given = {o.get_key_element(): o.input_line.split("=", 1)[1] if "=" in o.input_line else "" for o in parsed}
    return given, [o.get_key_element() for o in parsed if o.is_sweep_override()]


def sweep_figure(out: Path, records: list) -> Path | None:
    """The qualitative figure per student: teacher, baseline (no term) and every distilled setting.

    Each row is the lowest-seed run of a setting, in the summary's row order, labelled with its
    active terms (``student resnet18`` / ``+ pi + pa``). Made for every student of the sweep
    that has a baseline and at least one distilled run (``paper_table`` and ``zoo`` do), as
    ``<out stem>_<student>.png``; ``out`` itself shows the largest such student (the paper's
    ResNet-18). None when no student qualifies, or for a sweep of tuning runs (``dataset.tune_fraction``).
    """
    if any(r.params.get("dataset.tune_fraction") not in (None, "None") for r in records):
        return None  # tuning runs: the figure would show val images, which tuning never reads
    by_run = {r.run_id: r for r in records}
    made = []
    for student in student_order(records):
        rows = [row for row in summarize(records) if row["student"] == student]
        firsts = [min((by_run[i] for i in row["run_ids"]), key=lambda r: int(r.params.get("seed", 0))) for row in rows]
        base = next((run for run in firsts if not run.terms), None)
        distilled = [run for run in firsts if run.terms and "teacher_checkpoint" in run.params]
        if base is None or not distilled:
            continue
        p = distilled[0].params
        made.append(qualitative_figure(
            out.with_name(f"{out.stem}_{student}{out.suffix}"), p["dataset.root"],
            [(f"teacher {p['teacher.model.encoder_name']}", p["teacher_checkpoint"]),
             (f"student {student}", run_dir(base) / "best.pt"),
             *[(f"student {student}\n+ {' + '.join(run.terms)}", run_dir(run) / "best.pt")
               for run in distilled]],
            val_list=p["dataset.val_list"], mask_dir=p["dataset.val_mask_dir"],
        ))
    if not made:
        return None
    shutil.copyfile(made[0], out)
    return out


def run_dir(record: RunRecord) -> Path:
    """A run's folder: its ``run_dir`` tag (runs logged before it was a tag: the ``paths.output_dir`` param)."""
    return Path(record.tags.get("run_dir") or record.params["paths.output_dir"])


def open_parent(config: DictConfig) -> Tracker | None:
    """The sweep's parent run, created (or, for a relaunched sweep, reopened) and recorded in the
    sweep folder's :data:`SWEEP_FILE`; None with tracking off."""
    if not config.logger.enabled:
        return None
    sweep_dir = Path(config.hydra.sweep.dir).resolve()
    sweep_id = sweep_id_for(sweep_dir)
    given, swept = sweep_overrides(config.hydra.overrides.task)
    preset = OmegaConf.select(config, "hydra.runtime.choices.sweep", default=None)
    tracker = Tracker(config.logger.tracking_uri, config.logger.experiment_name, retries=config.logger.retries,
                      retry_wait_s=config.logger.retry_wait_s)
    earlier = sweep_record(sweep_dir).get("parent_run_id")
    found = tracker.find_run(earlier) if earlier else None
    tags = source_tags() | {"task": SWEEP_TASK, "sweep_id": sweep_id, "sweep_dir": str(sweep_dir), "sweep": str(preset or "-"),
                            "swept": ",".join(swept)}
    tags[DESCRIPTION_TAG] = (f"**sweep**{f' `{preset}`' if preset else ''} {sweep_id}: {', '.join(swept) or 'no swept key'}, running\n\n"
                             f"```\n{tags['command']}\n```\n")
    tracker.start(f"{preset or 'sweep'}-{sweep_id}", given, tags, run_id=found.info.run_id if found else None)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record = {"parent_run_id": tracker.run_id, "swept": swept, "sweep_id": sweep_id,
              "tracking_uri": tracker.tracking_uri, "experiment_name": config.logger.experiment_name}
    tmp = sweep_dir / f".{SWEEP_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, sweep_dir / SWEEP_FILE)
    return tracker


SWEEP_METRICS = {
    "miou_mean": ("final_miou_mean", 100), "miou_std": ("final_miou_std", 100), "best_miou_mean": ("best_miou_mean", 100),
    "gain_mean": ("gain_mean", 100), "gain_std": ("gain_std", 100), "gain_ci95": ("gain_ci", 100), "n_seeds": (None, 1),
    "epoch_s": ("epoch_s_mean", 1), "peak_mib": ("peak_mib_mean", 1),
}
"""The summary's quantities logged as ``sweep/<name>`` on every run of a setting (in percent points
where the quantity is a fraction): one metric name per quantity, the setting being the run's own."""


def publish_summary(tracker: Tracker, sweep_dir: Path, records: list[RunRecord], unfinished: list[str], out: Path | None = None) -> Path:
    """Write the sweep's summary (summary.md / .csv, gains and qualitative figures) into ``out``
    (default: the sweep folder) and make it the parent run's (``tracker``'s): its artifacts, a
    ``summary_table.json`` table, its description and ``n_runs`` / ``n_settings`` / ``best_miou``
    metrics (the best setting is the ``best_setting`` tag); each child run gets its setting's
    :data:`SWEEP_METRICS`. Returns summary.md."""
    out = Path(out or sweep_dir)
    md, csv_path, rows = write_summary(out, records, unfinished)
    figure = sweep_figure(out / "qualitative.png", records)
    gains = save_gain_figure(out / "gains.png", rows)
    extra = extra_columns(rows)
    table: dict[str, list] = {"setting": [], "student": [], "loss": [], "seeds": [], "miou_mean_pct": [], "miou_std_pct": [],
                              "gain_pts": [], "gain_ci95_pts": [], "epoch_s": []}
    for row in rows:
        setting = " ".join([row["student"], row["loss"], *(f"{k}={row['varying'][k]}" for k in extra)])
        values = {name: (len(row["seeds"]) if key is None else row[key] * scale) for name, (key, scale) in SWEEP_METRICS.items()}
        for run_id in row["run_ids"]:
            tracker.log_metrics({f"sweep/{k}": v for k, v in values.items() if math.isfinite(v)}, 0, run_id=run_id)
        for name, value in (("setting", setting), ("student", row["student"]), ("loss", row["loss"]), ("seeds", len(row["seeds"])),
                            ("miou_mean_pct", values["miou_mean"]), ("miou_std_pct", values["miou_std"]),
                            ("gain_pts", values["gain_mean"]), ("gain_ci95_pts", values["gain_ci95"]), ("epoch_s", values["epoch_s"])):
            table[name].append(value if not isinstance(value, float) or math.isfinite(value) else None)
    best = max(rows, key=lambda r: r["final_miou_mean"] if math.isfinite(r["final_miou_mean"]) else -1.0, default=None)
    summary = {"n_runs": len(records), "n_settings": len(rows)}
    if best is not None and math.isfinite(best["final_miou_mean"]):
        summary["best_miou"] = 100 * best["final_miou_mean"]
        tracker.set_tags({"best_setting": f"{best['student']} {best['loss']}"})
    tracker.log_metrics(summary, 0)
    tracker.log_table(table, "summary_table.json")
    for artifact in (md, csv_path, figure, gains, *(out.glob("qualitative_*.png") if figure else ())):
        if artifact is not None:
            tracker.log_artifact(artifact)
    tracker.describe(sweep_description(tracker, records) + "\n" + md.read_text())
    return md


def sweep_description(tracker: Tracker, records: list[RunRecord]) -> str:
    """The head of a sweep's description: its preset, swept keys, run count and command (from its parent's tags)."""
    found = tracker.find_run(tracker.run_id) if tracker.run_id else None
    tags = found.data.tags if found is not None else {}
    preset = f" `{tags['sweep']}`" if tags.get("sweep", "-") != "-" else ""
    return (f"**sweep**{preset} {tags.get('sweep_id', '-')}: {len(records)} runs, swept "
            f"{tags.get('swept') or 'nothing'}\n\n```\n{tags.get('command', '')}\n```\n")


class SweepSummary(Callback):
    """A multirun's MLflow parent run: opened when the multirun starts, summarised and closed when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main():  # a sweep run by every rank under torchrun: rank 0 tracks it
            return
        HydraConfig.instance().set_config(config)  # the default tracking URI interpolates ${hydra:runtime.cwd}
        open_parent(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main():
            return
        HydraConfig.instance().set_config(config)  # Hydra unsets its config between jobs
        if not config.logger.enabled:
            print("kdseg: tracking is off (logger=none), so there is no sweep summary")
            return
        tracker = open_parent(config)  # reopened (or, for a sweep folder without one, created)
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        sweep_id = sweep_id_for(sweep_dir)
        try:
            records, unfinished = load_runs(tracker.tracking_uri, config.logger.experiment_name, sweep_id)
            md = publish_summary(tracker, sweep_dir, records, unfinished)
        except BaseException:
            tracker.end("FAILED")
            raise
        tracker.end()
        print(f"\nsweep {sweep_id}: {len(records)} runs summarised -> {md}\n")
        print(md.read_text())
        print(tracker.ui_hint())
