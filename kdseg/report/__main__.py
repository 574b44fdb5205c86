"""``python -m kdseg.report``: a seed-averaged table of kdseg runs from an MLflow store.

With ``--sweep-id`` the table is the sweep's, and the sweep's parent run (where its multirun made
one) gets it again: summary files and figures, summary metrics, description (:func:`kdseg.sweep.publish_summary`),
e.g. after runs were added to the sweep or the report's code changed. ``--no-update`` only prints.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kdseg.report import load_runs, per_class_markdown, summarize, teacher_row, to_markdown, wall_time, write_summary
from kdseg.sweep import SWEEP_TASK, publish_summary
from kdseg.tracking import Tracker


def update_parent(tracking_uri: str, sweep_id: str, records: list, unfinished: list, out: str | None) -> str | None:
    """Publish the summary on the sweep's parent run; its id, or None where the sweep has none."""
    from mlflow.tracking import MlflowClient  # seconds to import: only when a store is read (see kdseg.tracking)

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"tags.task = '{SWEEP_TASK}' and tags.sweep_id = '{sweep_id}'", max_results=1)
    if not found:
        return None
    parent = found[0]
    tracker = Tracker(tracking_uri, client.get_experiment(parent.info.experiment_id).name)
    tracker.start("", {}, {}, run_id=parent.info.run_id)
    sweep_dir = Path(parent.data.tags.get("sweep_dir", ""))
    folder = Path(out) if out else (sweep_dir if sweep_dir.is_dir() else Path(tempfile.mkdtemp(prefix=f"kdseg-report-{sweep_id}-")))
    try:
        publish_summary(tracker, sweep_dir, records, unfinished, out=folder)
    finally:
        tracker.end(parent.info.status if parent.info.status in ("FINISHED", "FAILED", "KILLED") else "FINISHED")
    return parent.info.run_id


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdseg.report", description="Seed-averaged table of kdseg runs from an MLflow store.")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store (default: sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment name (default: all)")
    parser.add_argument("--sweep-id", default=None, help="only runs tagged with this sweep id; also updates the sweep's parent run")
    parser.add_argument("--per-class", action="store_true", help="also print per-class IoU")
    parser.add_argument("--out", default=None, help="also write summary.md / summary.csv into this folder")
    parser.add_argument("--no-update", action="store_true", help="with --sweep-id: do not update the sweep's parent run")
    args = parser.parse_args(argv)
    try:
        records, unfinished = load_runs(args.tracking_uri, args.experiment, args.sweep_id)
    except ValueError as err:
        sys.exit(f"kdseg.report: {err}")
    rows = summarize(records)
    print(to_markdown(rows, teacher_row(records), unfinished, wall_time(records) if args.sweep_id else None), end="")
    if args.per_class:
        print()
        print(per_class_markdown(rows), end="")
    if args.sweep_id and not args.no_update:
        parent = update_parent(args.tracking_uri, args.sweep_id, records, unfinished, args.out)
        print(f"\nsweep {args.sweep_id}: " + (f"parent run {parent} updated" if parent else "no parent run to update (a sweep logged before parent runs)"))
    elif args.out:
        write_summary(args.out, records, unfinished)


if __name__ == "__main__":
    main()
