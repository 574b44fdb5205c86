"""A study's ``summary.md`` and ``gains.png``: the budget, the tuned values, and every method's paired
gain with its 95% t interval against the tuned baseline and the time-matched one, with its cost."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdseg.report import (
    gain_interval, load_runs, paired_gain, summarize, teacher_row, to_csv, to_markdown, wall_time,
)
from kdseg.sweep import sweep_id_for
from kdseg.viz import save_gain_figure


def _minutes(seconds: float | None) -> str:
    return f"{seconds / 60:.1f} min" if seconds is not None and math.isfinite(seconds) else "-"


def _points(row: Mapping[str, Any]) -> str:
    if not row.get("gain_n"):
        return ""
    spread = f" ± {100 * row['gain_std']:.2f}" if row["gain_n"] > 1 else ""
    return f"{100 * row['gain_mean']:+.2f}{spread}"


def budget_table(state: Mapping[str, Any], n_methods: int, seeds: int, trials: int) -> str:
    """Stage, what it trained, runs, wall time."""
    stages = state.get("stages", {})
    time_stage = stages.get("time", {})
    time_runs = seeds if time_stage.get("length", 0) > time_stage.get("base_length", math.inf) else 0
    lines = [
        "| stage | what | runs | wall time |", "|---|---|---|---|",
        f"| teacher | {stages.get('teacher', {}).get('teacher', '-')} | - | {_minutes(stages.get('teacher', {}).get('wall_s'))} |",
        f"| tune | {trials} Optuna trials each for the baseline and {n_methods} methods, on the held-out part of train | "
        f"{trials * (n_methods + 1)} | {_minutes(stages.get('tune', {}).get('wall_s'))} |",
        f"| final | {n_methods + 1} tuned settings x {seeds} seeds, scored on val | {(n_methods + 1) * seeds} | "
        f"{_minutes(stages.get('final', {}).get('wall_s'))} |",
        f"| time | the tuned baseline with {time_stage.get('key', '-')}={time_stage.get('length', '-')} x {seeds} seeds | {time_runs} | "
        f"{_minutes(time_stage.get('wall_s'))} |",
    ]
    return "\n".join(lines) + "\n"


def tuned_table(tuned: Mapping[str, Mapping[str, Any]]) -> str:
    """Option, its search space, the best trial's values and held-out mIoU."""
    lines = ["| option | search space | tuned values | held-out mIoU of the best trial (%) |", "|---|---|---|---|"]
    for option, found in tuned.items():
        space = "<br>".join(f"`{k}`: `{v}`" for k, v in found["space"].items())
        values = "<br>".join(f"`{k}` = {v:.4g}" if isinstance(v, float) else f"`{k}` = {v}" for k, v in found["params"].items())
        lines.append(f"| {option} | {space} | {values} | {100 * found['value']:.2f} |")
    return "\n".join(lines) + "\n"


def equal_compute_table(methods: Sequence[dict], base: dict, matched: dict | None) -> tuple[str, list[dict]]:
    """Each method's gain against the tuned baseline (equal epochs) and the time-matched one (equal
    training time), with 95% intervals and cost; also the rows against the time-matched baseline."""
    head = ["method", "Δ vs tuned baseline (pts)", "95% CI", "Δ vs time-matched baseline (pts)", "95% CI",
            "s / epoch", "train s / run", "x baseline's train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    against_matched = []
    for row in methods:
        other = paired_gain(row["by_seed"], matched["by_seed"]) if matched is not None else {"gain_n": 0}
        against_matched.append(row | other)
        lines.append("| " + " | ".join([
            row["loss"], _points(row), gain_interval(row), _points(other), gain_interval(other) if matched else "",
            f"{row['epoch_s_mean']:.1f}", f"{row['train_s_mean']:.0f}", f"{row['train_s_mean'] / base['train_s_mean']:.2f}",
        ]) + " |")
    for label, row in (("tuned baseline", base), ("time-matched baseline", matched)):
        if row is not None:
            lines.append(f"| {label} | | | | | {row['epoch_s_mean']:.1f} | {row['train_s_mean']:.0f} | "
                         f"{row['train_s_mean'] / base['train_s_mean']:.2f} |")
    return "\n".join(lines) + "\n", against_matched


def write_study_summary(out: Path, name: str, state: Mapping[str, Any], tracking_uri: str, experiment: str) -> tuple[Path, Path | None]:
    """``<out>/summary.md``, ``summary.csv`` and ``gains.png`` from the final and time-matched runs in MLflow."""
    config = state["config"]
    final, _ = load_runs(tracking_uri, experiment, sweep_id_for(out / "final"))
    timed: list = []
    if (out / "time").is_dir():
        timed, _ = load_runs(tracking_uri, experiment, sweep_id_for(out / "time"))
    rows = summarize(final)
    base = next(r for r in rows if not r["terms"])
    methods = [r for r in rows if r["terms"]]
    matched = summarize(timed)[0] if timed else None
    table, against_matched = equal_compute_table(methods, base, matched)
    stages = state["stages"]
    time_stage = stages.get("time", {})
    seeds, trials = len(config["seeds"]), config["trials"]
    total = sum(stage.get("wall_s", 0.0) for stage in stages.values())
    significant = [r["loss"] for r in methods if gain_interval(r).endswith("*")]
    text = [
        f"# Study {name}: every method against a baseline tuned with the same budget\n",
        f"Student {config['student']}; job overrides: `{' '.join(config['job_overrides']) or '(none: the built-in data)'}`. "
        f"Tuning: {trials} Optuna trials (TPE, sampler seed {config['sampler_seed']}) per option, trained on the train split "
        f"less {100 * config['tune_fraction']:.0f}% held out (seed {config['tune_seed']}) and scored on that part; "
        "the val split is only read by the final runs. "
        f"Final runs: seeds {', '.join(map(str, config['seeds']))}, on the whole train split. "
        f"Total wall time {_minutes(total)}.\n",
        "## Budget\n", budget_table(state, len(methods), seeds, trials),
        "## Tuned values\n", tuned_table(state.get("tuning", {})),
        "## Final runs (val)\n", to_markdown(rows, teacher_row(final), (), wall_time(final)),
        "## Equal epochs and equal training time\n",
        (f"The time-matched baseline trains with {time_stage.get('key')}={time_stage.get('length')} instead of "
         f"{time_stage.get('base_length')}: as long as "
         f"the costliest method ({time_stage.get('costliest')}, {time_stage.get('costliest_epoch_s', math.nan):.1f} s / epoch "
         f"against the baseline's {time_stage.get('baseline_epoch_s', math.nan):.1f}) trained.\n" if matched is not None else
         f"No time-matched baseline: the costliest method ({time_stage.get('costliest')}, "
         f"{time_stage.get('costliest_epoch_s', math.nan):.1f} s / epoch against the baseline's "
         f"{time_stage.get('baseline_epoch_s', math.nan):.1f}) scales {time_stage.get('key')}={time_stage.get('base_length')} "
         "to no more than the baseline's own.\n"),
        table,
        f"\nGains whose 95% interval excludes 0 (against the tuned baseline): {', '.join(significant) or 'none'}.\n",
    ]
    md = out / "summary.md"
    md.write_text("\n".join(text))
    (out / "summary.csv").write_text(to_csv(rows + ([matched] if matched else [])))
    figure = save_gain_figure(out / "gains.png", methods, f"{name}: gain over the tuned baseline, 95% t interval over seeds")
    if matched is not None:
        save_gain_figure(out / "gains_time_matched.png", against_matched,
                         f"{name}: gain over the time-matched baseline ({time_stage.get('key')}={time_stage.get('length')}), 95% t interval")
    return md, figure
