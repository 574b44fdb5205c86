"""Multirun support: a sweep id for every child run, and the seed summary when the sweep ends."""
from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdseg.dist import is_main
from kdseg.figure import qualitative_figure
from kdseg.report import extra_columns, load_runs, student_order, summarize, write_summary
from kdseg.tracking import Tracker
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
             (f"student {student}", Path(base.params["paths.output_dir"]) / "best.pt"),
             *[(f"student {student}\n+ {' + '.join(run.terms)}", Path(run.params["paths.output_dir"]) / "best.pt")
               for run in distilled]],
            val_list=p["dataset.val_list"], mask_dir=p["dataset.val_mask_dir"],
        ))
    if not made:
        return None
    shutil.copyfile(made[0], out)
    return out


class SweepSummary(Callback):
    """At the end of a multirun, write summary.md / summary.csv and log one MLflow summary run."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main():  # a sweep run by every rank under torchrun: rank 0 summarises
            return
        # Hydra unsets its config between jobs; the default tracking URI interpolates
        # ${hydra:runtime.cwd}, so make it resolvable again for the summary.
        HydraConfig.instance().set_config(config)
        if not config.logger.enabled:
            print("kdseg: tracking is off (logger=none), so there is no sweep summary")
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_id = sweep_id_for(sweep_dir)
        tracking_uri = OmegaConf.select(config, "logger.tracking_uri")
        records, unfinished = load_runs(tracking_uri, config.logger.experiment_name, sweep_id)
        md, csv_path, rows = write_summary(sweep_dir, records, unfinished)
        figure = sweep_figure(sweep_dir / "qualitative.png", records)
        gains = save_gain_figure(sweep_dir / "gains.png", rows)
        tracker = Tracker(tracking_uri, config.logger.experiment_name)
        params = {"n_runs": len(records), "sweep_dir": str(sweep_dir.resolve())}
        with tracker.run(f"summary-{sweep_id}", params, {"task": "summary", "sweep_id": sweep_id, "kdseg.summary": "true"}):
            extra = extra_columns(rows)
            for row in rows:
                label = "-".join([row["student"], row["loss"], *(f"{k}={row['varying'][k]}" for k in extra)])
                label = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
                values = {
                    "miou_mean": row["final_miou_mean"], "miou_std": row["final_miou_std"],
                    "best_miou_mean": row["best_miou_mean"], "n_seeds": len(row["seeds"]),
                    "gain_mean": row["gain_mean"], "gain_std": row["gain_std"], "gain_ci95": row["gain_ci"],
                    "epoch_s": row["epoch_s_mean"], "peak_mib": row["peak_mib_mean"],
                }
                tracker.log_metrics({f"summary/{label}/{k}": v for k, v in values.items() if math.isfinite(v)}, 0)
            for artifact in (md, csv_path, figure, gains):
                if artifact is not None:
                    tracker.log_artifact(artifact)
        print(f"\nsweep {sweep_id}: {len(records)} runs summarised -> {md}\n")
        print(md.read_text())
