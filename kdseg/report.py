"""Seed aggregation: group runs by setting (everything but the seed) -> mean +- std tables.

Used by the multirun callback (:mod:`kdseg.sweep`) and on its own, to rebuild a sweep's
table from any MLflow store::

    python -m kdseg.report --tracking-uri sqlite:///mlflow.db --sweep-id 1a2b3c4d5e [--per-class]
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdseg.data.classes import dataset_classes

NOT_SETTING = ("seed", "logger.run_name", "sweep_id")
NOT_SETTING_PREFIXES = ("paths.", "hydra.")


@dataclass
class RunRecord:
    """What the summary needs of one finished child run."""

    run_id: str
    params: dict[str, str]
    tags: dict[str, str]
    final_miou: float
    best_miou: float
    pixel_acc: float
    iou: dict[str, float] = field(default_factory=dict)
    teacher_miou: float | None = None

    @property
    def setting(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            sorted(
                (k, v) for k, v in self.params.items()
                if k not in NOT_SETTING and not k.startswith(NOT_SETTING_PREFIXES)
            )
        )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def load_runs(tracking_uri: str, experiment: str | None = None, sweep_id: str | None = None) -> tuple[list[RunRecord], list[str]]:
    """Finished distill/teacher runs of an experiment and/or sweep, and the ids of unfinished ones."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no MLflow experiment named '{experiment}' in {tracking_uri}")
        experiment_ids = [exp.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    query = "tags.task = 'distill'" + (f" and tags.sweep_id = '{sweep_id}'" if sweep_id else "")
    records, unfinished = [], []
    for run in client.search_runs(experiment_ids, query, max_results=50000):
        if run.info.status != "FINISHED" or "val/miou" not in run.data.metrics:
            unfinished.append(run.info.run_id)
            continue
        history = [m.value for m in client.get_metric_history(run.info.run_id, "val/miou")]
        metrics = run.data.metrics
        records.append(
            RunRecord(
                run_id=run.info.run_id,
                params=dict(run.data.params),
                tags=dict(run.data.tags),
                final_miou=metrics["val/miou"],
                best_miou=max(history),
                pixel_acc=metrics["val/pixel_acc"],
                iou=class_ious(metrics, run.data.params.get("dataset.name")),
                teacher_miou=metrics.get("teacher/val_miou"),
            )
        )
    if sweep_id and not records and not unfinished:
        raise ValueError(f"no distill runs tagged sweep_id={sweep_id} in {tracking_uri}")
    return records, unfinished


def class_ious(metrics: dict[str, float], dataset: str | None) -> dict[str, float]:
    """A run's ``val/iou/<class>`` metrics by class name, in its dataset's class order
    (names the dataset does not know, last, sorted)."""
    found = {k.removeprefix("val/iou/"): v for k, v in metrics.items() if k.startswith("val/iou/")}
    try:
        known = dataset_classes(dataset).names
    except ValueError:
        known = ()
    order = [c for c in known if c in found] + sorted(set(found) - set(known))
    return {c: found[c] for c in order}


def summarize(records: Sequence[RunRecord]) -> list[dict]:
    """One row per setting: seeds, mean/std of final and best mIoU and pixel accuracy (fractions)."""
    groups: dict[tuple, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.setting, []).append(record)
    varying = sorted({k for s in groups for k, _ in s if len({dict(g).get(k) for g in groups}) > 1})
    rows = []
    for setting, runs in groups.items():
        params = dict(setting)
        row = {
            "student": params.get("student.encoder_name", "?"),
            "loss": params.get("loss.name", "?"),
            "pixel_wise": float(params.get("loss.pi_lambda", 0)) > 0,
            "pair_wise": float(params.get("loss.pa_lambda", 0)) > 0,
            "seeds": sorted(int(r.params.get("seed", -1)) for r in runs),
            "params_m": float(params.get("params/student_m", "nan")),
            "varying": {k: params.get(k, "") for k in varying},
            "run_ids": [r.run_id for r in runs],
        }
        for name in ("final_miou", "best_miou", "pixel_acc"):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([getattr(r, name) for r in runs])
        classes = dict.fromkeys(c for r in runs for c in r.iou)  # in class order, first seen first
        row["iou"] = {c: statistics.fmean(r.iou[c] for r in runs if c in r.iou) for c in classes}
        rows.append(row)
    # as in the paper: the larger student first, then per student none, pa, pi, pi + pa
    order = student_order(records)
    rows.sort(key=lambda r: (order.index(r["student"]), r["pixel_wise"], r["pair_wise"], str(r["varying"])))
    return rows


def student_order(records: Sequence[RunRecord]) -> list[str]:
    """The students of ``records``, the larger (parameter count) first, ties by name."""
    size: dict[str, float] = {}
    for record in records:
        student = record.params.get("student.encoder_name", "?")
        params_m = float(record.params.get("params/student_m", "nan"))
        size[student] = max(size.get(student, 0.0), params_m if math.isfinite(params_m) else 0.0)
    return sorted(size, key=lambda s: (-size[s], s))


def teacher_row(records: Sequence[RunRecord]) -> dict | None:
    """The (cached, shared) teacher's mIoU as reported by the distill runs that used it."""
    found = [(r.teacher_miou, r.params) for r in records if r.teacher_miou is not None]
    if not found:
        return None
    values = sorted({round(v, 8) for v, _ in found})
    params = found[0][1]
    return {
        "name": params.get("teacher.model.encoder_name", "teacher"),
        "miou_mean": statistics.fmean(values),
        "miou_std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "params_m": float(params.get("params/teacher_m", "nan")),
    }


def _shown(key: str, rows: Sequence[dict]) -> bool:
    """Whether a varying setting needs its own column (model and check marks already say the rest)."""
    if key in ("loss.name", "teacher_checkpoint") or key.startswith(("student.", "params/", "loss.terms.")):
        return False
    if key in ("loss.pi_lambda", "loss.pa_lambda"):
        return len({r["varying"][key] for r in rows if float(r["varying"][key] or 0) > 0}) > 1
    return True


def extra_columns(rows: Sequence[dict]) -> list[str]:
    """Settings that vary across rows and are not already told by the model name and check marks."""
    return [k for k in (rows[0]["varying"] if rows else {}) if _shown(k, rows)]


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def to_markdown(rows: Sequence[dict], teacher: dict | None = None, unfinished: Sequence[str] = ()) -> str:
    """The paper-style table: teacher row, then per student the loss rows with check marks."""
    varying = extra_columns(rows)
    head = ["model", "pixel-wise", "pair-wise", *varying, "seeds", "mIoU final (%)", "mIoU best (%)", "pixel acc (%)", "params (M)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if teacher:
        cells = [f"Teacher {teacher['name']}", "", "", *[""] * len(varying), str(teacher["n"]), f"{100 * teacher['miou_mean']:.2f}", "", "", f"{teacher['params_m']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        cells = [
            f"Student {row['student']}",
            "✓" if row["pixel_wise"] else "-",
            "✓" if row["pair_wise"] else "-",
            *[str(row["varying"].get(k, "")) for k in varying],
            str(len(row["seeds"])),
            _pct(row["final_miou_mean"], row["final_miou_std"]),
            _pct(row["best_miou_mean"], row["best_miou_std"]),
            _pct(row["pixel_acc_mean"], row["pixel_acc_std"]),
            f"{row['params_m']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if unfinished:
        text += f"\n{len(unfinished)} run(s) not finished or without val/miou, left out: {', '.join(unfinished)}\n"
    return text


def to_csv(rows: Sequence[dict]) -> str:
    """Machine-readable summary (fractions, not percent)."""
    out = io.StringIO()
    fields = ["student", "loss", "pixel_wise", "pair_wise", "varying", "n_seeds", "seeds", "final_miou_mean", "final_miou_std",
              "best_miou_mean", "best_miou_std", "pixel_acc_mean", "pixel_acc_std", "params_m", "run_ids"]
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in fields} | {
            "n_seeds": len(row["seeds"]), "seeds": " ".join(map(str, row["seeds"])),
            "varying": " ".join(f"{k}={v}" for k, v in row["varying"].items()), "run_ids": " ".join(row["run_ids"]),
        })
    return out.getvalue()


def per_class_markdown(rows: Sequence[dict]) -> str:
    """Per-class IoU (%), seed-averaged, one column per setting."""
    names = [f"{r['student']} {r['loss']}" for r in rows]
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(rows)]
    for c in dict.fromkeys(c for r in rows for c in r["iou"]):
        cells = [f"{100 * r['iou'][c]:.2f}" if c in r["iou"] and not math.isnan(r["iou"][c]) else "-" for r in rows]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path, records: Sequence[RunRecord], unfinished: Sequence[str] = ()) -> tuple[Path, Path, list[dict]]:
    """Write ``summary.md`` and ``summary.csv`` into ``out_dir``; returns their paths and the rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    md = out_dir / "summary.md"
    md.write_text(to_markdown(rows, teacher_row(records), unfinished))
    csv_path = out_dir / "summary.csv"
    csv_path.write_text(to_csv(rows))
    return md, csv_path, rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdseg.report", description="Seed-averaged table of kdseg runs from an MLflow store.")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store (default: sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment name (default: all)")
    parser.add_argument("--sweep-id", default=None, help="only runs tagged with this sweep id")
    parser.add_argument("--per-class", action="store_true", help="also print per-class IoU")
    parser.add_argument("--out", default=None, help="also write summary.md / summary.csv into this folder")
    args = parser.parse_args(argv)
    try:
        records, unfinished = load_runs(args.tracking_uri, args.experiment, args.sweep_id)
    except ValueError as err:
        sys.exit(f"kdseg.report: {err}")
    rows = summarize(records)
    print(to_markdown(rows, teacher_row(records), unfinished), end="")
    if args.per_class:
        print()
        print(per_class_markdown(rows), end="")
    if args.out:
        write_summary(args.out, records, unfinished)


if __name__ == "__main__":
    main()
