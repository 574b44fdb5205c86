"""Multirun support: a sweep id for every child run, and the seed summary when the sweep ends."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf


def sweep_id_for(sweep_dir: str | os.PathLike) -> str:
    """A short, stable id of a multirun: a hash of its (absolute) sweep folder."""
    return hashlib.sha1(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:10]


def current_sweep() -> tuple[str, str]:
    """(sweep id, sweep folder) of the multirun this job belongs to; empty strings otherwise."""
    if not HydraConfig.initialized():
        return "", ""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return "", ""
    return sweep_id_for(hydra_cfg.sweep.dir), str(Path(hydra_cfg.sweep.dir).resolve())


def sweep_figure(out: Path, records: list) -> Path | None:
    """The qualitative figure from seed-0-first runs: teacher, baseline (loss none) and pi_pa student.

    Made for every student of the sweep that has both a baseline and a distilled run
    (``paper_table`` does), as ``<out stem>_<student>.png``; ``out`` itself shows the largest
    such student (the paper's ResNet-18). None when no student qualifies.
    """
    import shutil

    from kdseg.figure import qualitative_figure
    from kdseg.report import student_order

    def first(student: str, loss: str):
        runs = [r for r in records if r.params.get("student.encoder_name") == student and r.params.get("loss.name") == loss]
        return min(runs, key=lambda r: int(r.params.get("seed", 0)), default=None)

    made = []
    for student in student_order(records):
        base, distilled = first(student, "none"), first(student, "pi_pa")
        if base is None or distilled is None or "teacher_checkpoint" not in distilled.params:
            continue
        p = distilled.params
        made.append(qualitative_figure(
            out.with_name(f"{out.stem}_{student}{out.suffix}"), p["dataset.root"],
            [(f"teacher {p['teacher.model.encoder_name']}", p["teacher_checkpoint"]),
             (f"student {student}", Path(base.params["paths.output_dir"]) / "best.pt"),
             (f"student {student}\n+ pi + pa", Path(p["paths.output_dir"]) / "best.pt")],
            val_list=p["dataset.val_list"], mask_dir=p["dataset.val_mask_dir"],
        ))
    if not made:
        return None
    shutil.copyfile(made[0], out)
    return out


class SweepSummary(Callback):
    """At the end of a multirun, write summary.md / summary.csv and log one MLflow summary run."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kdseg.dist import is_main
        from kdseg.report import extra_columns, load_runs, write_summary
        from kdseg.tracking import Tracker

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
        tracker = Tracker(tracking_uri, config.logger.experiment_name)
        params = {"n_runs": len(records), "sweep_dir": str(sweep_dir.resolve())}
        with tracker.run(f"summary-{sweep_id}", params, {"task": "summary", "sweep_id": sweep_id, "kdseg.summary": "true"}):
            extra = extra_columns(rows)
            for row in rows:
                label = "-".join([row["student"], row["loss"], *(f"{k}={row['varying'][k]}" for k in extra)])
                label = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
                tracker.log_metrics(
                    {
                        f"summary/{label}/miou_mean": row["final_miou_mean"],
                        f"summary/{label}/miou_std": row["final_miou_std"],
                        f"summary/{label}/best_miou_mean": row["best_miou_mean"],
                        f"summary/{label}/n_seeds": len(row["seeds"]),
                    },
                    0,
                )
            for artifact in (md, csv_path, figure):
                if artifact is not None:
                    tracker.log_artifact(artifact)
        print(f"\nsweep {sweep_id}: {len(records)} runs summarised -> {md}\n")
        print(md.read_text())
