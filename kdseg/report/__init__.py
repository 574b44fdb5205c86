"""Seed aggregation: group runs by setting (everything but the seed) -> mean +- std tables.

Used by the multirun callback (:mod:`kdseg.sweep`) and on its own (:mod:`kdseg.report.__main__`),
to rebuild a sweep's table from any MLflow store::

    python -m kdseg.report --tracking-uri sqlite:///mlflow.db --sweep-id 1a2b3c4d5e [--per-class]
"""
from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdseg.data.classes import dataset_classes
from kdseg.distill import active_terms
from kdseg.models import DEFAULT_ARCH, model_name

NOT_SETTING = ("seed", "logger.run_name", "sweep_id")
NOT_SETTING_PREFIXES = ("paths.", "hydra.")
TERM_SEED = re.compile(r"^loss\.terms\.[^.]+\.seed$")
"""A stateful term's own seed (``${seed}`` by default): part of the run's seed, not of its setting."""
TERM_WEIGHT = re.compile(r"^loss\.terms\.([^.]+)\.weight$")
"""Flattened param of a term's weight: ``loss.terms.<name>.weight``."""
WEIGHT_KEYS = ("loss.pi_lambda", "loss.pa_lambda")
"""The paper's two weights (each one's term's weight interpolates it)."""


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
    epoch_s: float = math.nan
    train_s: float = math.nan
    """The run's training time: its epochs' times summed (evaluation left out)."""
    peak_mib: float = math.nan
    start_ms: int | None = None
    end_ms: int | None = None
    speed: dict[str, float] = field(default_factory=dict)
    """``speed/<student|teacher>_{gflops,latency_ms,fps}`` metrics, without the ``speed/`` prefix."""

    @property
    def setting(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            sorted(
                (k, v) for k, v in self.params.items()
                if k not in NOT_SETTING and not k.startswith(NOT_SETTING_PREFIXES) and not TERM_SEED.match(k)
            )
        )

    @property
    def terms(self) -> list[str]:
        """The run's active distillation terms (weight > 0), in its config's order."""
        return params_terms(self.params)


def params_terms(params: dict[str, str]) -> list[str]:
    """:func:`~kdseg.distill.active_terms` of a run's logged params: the terms whose
    ``loss.terms.<name>.weight`` is > 0, in ``loss.term_order``."""
    weights = {m.group(1): _number(v) for k, v in params.items() if (m := TERM_WEIGHT.match(k))}
    order = params.get("loss.term_order", "").split(",")
    ranked = sorted(weights, key=lambda name: (order.index(name) if name in order else len(order), name))
    return active_terms({name: weights[name] for name in ranked})


def _number(value: str | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604, 2.1448,
         2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484,
         2.0452, 2.0423)
"""The 0.975 quantile of Student's t with 1 .. 30 degrees of freedom."""


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a table to 30, then the
    Cornish-Fisher expansion around the normal quantile, within 1e-4 of the exact value)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def paired_gain(values: Mapping[int, float], base: Mapping[int, float]) -> dict[str, Any]:
    """``values - base`` over the seeds both have: ``gain_by_seed``, ``gain_n``, ``gain_mean``,
    ``gain_std`` (sample) and ``gain_ci`` (half-width of the 95% t interval of the mean gain,
    ``t_975(n - 1) * std / sqrt(n)``; NaN below 2 seeds)."""
    seeds = sorted(set(values) & set(base))
    diffs = [values[s] - base[s] for s in seeds]
    mean, std = mean_std(diffs) if diffs else (math.nan, math.nan)
    ci = t_975(len(diffs) - 1) * std / math.sqrt(len(diffs)) if len(diffs) > 1 and math.isfinite(std) else math.nan
    return {"gain_by_seed": dict(zip(seeds, diffs)), "gain_n": len(diffs), "gain_mean": mean, "gain_std": std, "gain_ci": ci}


def excludes_zero(row: Mapping[str, Any]) -> bool:
    """Whether the 95% interval of a row's gain lies wholly above or below 0."""
    return math.isfinite(row.get("gain_ci", math.nan)) and abs(row["gain_mean"]) > row["gain_ci"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for both if a value is missing."""
    if not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def load_runs(tracking_uri: str, experiment: str | None = None, sweep_id: str | None = None) -> tuple[list[RunRecord], list[str]]:
    """Finished distill/teacher runs of an experiment and/or sweep, and the ids of unfinished ones."""
    from mlflow.tracking import MlflowClient  # seconds to import: only when a store is read (see kdseg.tracking)

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
        epoch_times = [m.value for m in client.get_metric_history(run.info.run_id, "time/epoch_s")]
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
                epoch_s=statistics.fmean(epoch_times) if epoch_times else math.nan,
                train_s=math.fsum(epoch_times) if epoch_times else math.nan,
                peak_mib=metrics.get("memory/peak_mib", math.nan),
                start_ms=run.info.start_time,
                end_ms=run.info.end_time,
                speed={k.removeprefix("speed/"): v for k, v in metrics.items() if k.startswith("speed/")},
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
    """One row per setting: seeds, mean/std of final and best mIoU and pixel accuracy (fractions),
    cost (seconds per epoch, peak memory), and the gain over the same student's baseline
    (no distillation term, same other settings), paired by seed."""
    groups: dict[tuple, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.setting, []).append(record)
    varying = sorted({k for s in groups for k, _ in s if len({dict(g).get(k) for g in groups}) > 1})
    rows = []
    for setting, runs in groups.items():
        params = dict(setting)
        terms = runs[0].terms
        row = {
            "student": params_model_name(params, "student"),
            "loss": "+".join(terms) or "none",
            "terms": terms,
            "seeds": sorted(int(r.params.get("seed", -1)) for r in runs),
            "params_m": _number(params.get("params/student_m")),
            "varying": {k: params.get(k, "") for k in varying},
            "run_ids": [r.run_id for r in runs],
            "by_seed": {int(r.params.get("seed", -1)): r.final_miou for r in runs},
        }
        for name in ("final_miou", "best_miou", "pixel_acc", "epoch_s", "train_s", "peak_mib"):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([getattr(r, name) for r in runs])
        for name in SPEED:
            row[f"{name}_mean"] = _mean_of(r.speed.get(f"student_{name}") for r in runs)
        row["speed_device"] = runs[0].tags.get("speed_device", "")
        row["speed_method"] = runs[0].tags.get("speed_method", IN_JOB_SPEED if row["speed_device"] else "")
        classes = dict.fromkeys(c for r in runs for c in r.iou)  # in class order, first seen first
        row["iou"] = {c: statistics.fmean(r.iou[c] for r in runs if c in r.iou) for c in classes}
        rows.append(row)
    columns = term_columns(records)
    for row in rows:
        row["term_columns"] = columns  # the table's check-mark columns, the same for every row
    _add_paired_gains(rows)
    # as in the paper: the larger student first, then per student none, pi, pa, pi + pa (fewer terms first,
    # then in the order the terms are configured)
    order = student_order(records)
    rows.sort(key=lambda r: (order.index(r["student"]), len(r["terms"]), [columns.index(t) for t in r["terms"]], str(r["varying"])))
    return rows


SPEED = ("gflops", "latency_ms", "fps")
IN_JOB_SPEED = ("the median latency measured inside each training job (runs without a speed_method tag), "
                "so it follows the host's load: compare FPS across runs with care")
"""How the FPS of runs logged before speed figures were cached was measured (their summaries say so)."""
"""The real-time figures of a model (kdseg.profile), averaged over the runs that measured them."""


def _mean_of(values) -> float:
    found = [v for v in values if v is not None]
    return statistics.fmean(found) if found else math.nan


def _add_paired_gains(rows: list[dict]) -> None:
    """:func:`paired_gain` of each row: final mIoU minus the baseline's, over the seeds both ran.

    The baseline of a row is the row of the same student with no active term whose other
    settings (everything but the loss) are the same.
    """
    def context(row: dict) -> tuple:  # what a baseline must share: not the loss, nor what a teacher adds
        return row["student"], tuple(
            (k, v) for k, v in row["varying"].items()
            if not k.startswith(("loss.", "params/")) and k != "teacher_checkpoint"
        )

    baselines = {context(r): r for r in rows if not r["terms"]}
    for row in rows:
        base = baselines.get(context(row))
        row |= paired_gain(row["by_seed"], base["by_seed"] if base is not None and row["terms"] else {})


def term_columns(records: Sequence[RunRecord]) -> list[str]:
    """The terms active in any run, in the configured order (``loss.term_order``), one column each."""
    names: list[str] = []
    for record in sorted(records, key=lambda r: -len(r.terms)):
        names += [t for t in record.terms if t not in names]
    order = next((r.params["loss.term_order"].split(",") for r in records if "loss.term_order" in r.params), [])
    return sorted(names, key=lambda name: (order.index(name) if name in order else len(order), name))


def params_model_name(params: Mapping[str, Any], prefix: str, missing: str = "?") -> str:
    """The :func:`~kdseg.models.model_name` of a run's ``<prefix>.*`` params (``resnet18``, ``pspnet-resnet18``)."""
    if f"{prefix}.encoder_name" not in params:
        return missing
    return model_name({"arch": params.get(f"{prefix}.arch", DEFAULT_ARCH), "encoder_name": params[f"{prefix}.encoder_name"]})


def student_order(records: Sequence[RunRecord]) -> list[str]:
    """The students of ``records``, the larger (parameter count) first, ties by name."""
    size: dict[str, float] = {}
    for record in records:
        student = params_model_name(record.params, "student")
        params_m = _number(record.params.get("params/student_m"))
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
        "name": params_model_name(params, "teacher.model", "teacher"),
        "miou_mean": statistics.fmean(values),
        "miou_std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "params_m": _number(params.get("params/teacher_m")),
    } | {f"{name}_mean": _mean_of(r.speed.get(f"teacher_{name}") for r in records) for name in SPEED}


TERM_KEY = re.compile(r"^loss\.terms\.([^.]+)\.")


def _shown(key: str, rows: Sequence[dict]) -> bool:
    """Whether a varying setting needs its own column (model and check marks already say the rest).

    A term's setting (its weight included) counts only in the rows where the term is active,
    and is shown when those rows use more than one value of it.
    """
    if key in ("teacher_checkpoint", "loss.term_order") or key.startswith(("student.", "params/")):
        return False
    if key in WEIGHT_KEYS:
        return len({r["varying"][key] for r in rows if _number(r["varying"][key]) > 0}) > 1
    term = TERM_KEY.match(key)
    if term:
        return len({r["varying"][key] for r in rows if term.group(1) in r["terms"]}) > 1
    return True


def extra_columns(rows: Sequence[dict]) -> list[str]:
    """Settings that vary across rows and are not already told by the model name and check marks."""
    return [k for k in (rows[0]["varying"] if rows else {}) if _shown(k, rows)]


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _gain(row: dict) -> str:
    if not row["gain_n"]:
        return ""
    return f"{100 * row['gain_mean']:+.2f} ± {100 * row['gain_std']:.2f} ({row['gain_n']})"


def gain_interval(row: Mapping[str, Any]) -> str:
    """``[+0.11, +2.35] *``: the 95% t interval of the mean gain in points, ``*`` when it excludes 0."""
    if not math.isfinite(row.get("gain_ci", math.nan)):
        return ""
    low, high = 100 * (row["gain_mean"] - row["gain_ci"]), 100 * (row["gain_mean"] + row["gain_ci"])
    return f"[{low:+.2f}, {high:+.2f}]" + (" *" if excludes_zero(row) else "")


def _cost(mean: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if math.isfinite(mean) else "-"


def wall_time(records: Sequence[RunRecord]) -> float | None:
    """Seconds from the first run's start to the last run's end (None if a time is missing)."""
    if not records or any(r.start_ms is None or r.end_ms is None for r in records):
        return None
    return (max(r.end_ms for r in records) - min(r.start_ms for r in records)) / 1000


def to_markdown(
    rows: Sequence[dict], teacher: dict | None = None, unfinished: Sequence[str] = (), wall_s: float | None = None
) -> str:
    """The paper-style table: teacher row, then per student a row per loss setting, a check mark per
    active term, the paired gain over the baseline and the cost; ``wall_s`` adds the runs' wall time."""
    varying = extra_columns(rows)
    columns = rows[0]["term_columns"] if rows else []
    head = ["model", *columns, *varying, "seeds", "mIoU final (%)", "mIoU best (%)", "Δ vs none, paired (pts)",
            "95% CI of Δ (pts)", "pixel acc (%)", "s / epoch", "train s / run", "peak mem (MiB)", "params (M)", "GFLOPs", "FPS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if teacher:
        cells = [f"Teacher {teacher['name']}", *[""] * (len(columns) + len(varying)), str(teacher["n"]),
                 f"{100 * teacher['miou_mean']:.2f}", "", "", "", "", "", "", "", f"{teacher['params_m']:.1f}",
                 _cost(teacher["gflops_mean"], 2), _cost(teacher["fps_mean"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        cells = [
            f"Student {row['student']}",
            *["✓" if name in row["terms"] else "-" for name in columns],
            *[str(row["varying"].get(k, "")) for k in varying],
            str(len(row["seeds"])),
            _pct(row["final_miou_mean"], row["final_miou_std"]),
            _pct(row["best_miou_mean"], row["best_miou_std"]),
            _gain(row),
            gain_interval(row),
            _pct(row["pixel_acc_mean"], row["pixel_acc_std"]),
            _cost(row["epoch_s_mean"], 1),
            _cost(row["train_s_mean"], 0),
            _cost(row["peak_mib_mean"], 0),
            f"{row['params_m']:.1f}",
            _cost(row["gflops_mean"], 2),
            _cost(row["fps_mean"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    devices = sorted({r["speed_device"] for r in rows if r["speed_device"]})
    if devices:
        methods = sorted({r["speed_method"] for r in rows if r["speed_method"]})
        text += f"\nGFLOPs (a multiply-add = 2) and FPS (fp32): {'; '.join(devices)}; FPS {'; '.join(methods)}\n"
    if any(math.isfinite(r.get("gain_ci", math.nan)) for r in rows):
        text += ("\n95% CI: the mean paired gain ± t(0.975, n - 1) x std / sqrt(n) over the n seeds (Student's t); "
                 "* marks an interval that excludes 0\n")
    if wall_s is not None:
        runs = sum(len(r["seeds"]) for r in rows)
        text += f"\n{runs} student runs, {wall_s / 60:.1f} min wall time (first run's start to last run's end)\n"
    if unfinished:
        text += f"\n{len(unfinished)} run(s) not finished or without val/miou, left out: {', '.join(unfinished)}\n"
    return text


def to_csv(rows: Sequence[dict]) -> str:
    """Machine-readable summary (fractions, not percent)."""
    out = io.StringIO()
    fields = ["student", "loss", "terms", "varying", "n_seeds", "seeds", "final_miou_mean", "final_miou_std",
              "best_miou_mean", "best_miou_std", "gain_mean", "gain_std", "gain_n", "gain_ci", "pixel_acc_mean", "pixel_acc_std",
              "epoch_s_mean", "epoch_s_std", "train_s_mean", "train_s_std", "peak_mib_mean", "peak_mib_std", "params_m", "gflops_mean", "latency_ms_mean",
              "fps_mean", "run_ids"]
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in fields} | {
            "terms": " ".join(row["terms"]), "n_seeds": len(row["seeds"]), "seeds": " ".join(map(str, row["seeds"])),
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
    md.write_text(to_markdown(rows, teacher_row(records), unfinished, wall_time(records)))
    csv_path = out_dir / "summary.csv"
    csv_path.write_text(to_csv(rows))
    return md, csv_path, rows
