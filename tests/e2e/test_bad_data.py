"""Bad datasets: every kind of broken file is one clear error line naming it, or skipped and counted.

Each test writes a small built-in dataset (8 train / 2 val images of 64 px, VOC layout) into
its own folder, breaks it in one way and runs it as ``dataset=voc``, through the same
error reporting as ``run.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdseg.data import build_datasets
from kdseg.errors import reported
from kdseg.resume import read_run
from kdseg.tasks import run

from ..bad_voc import KINDS, TRAIN_IDS, VAL_IDS, VOC64, image, labels_out_of_range, missing_image, missing_root, size_mismatch, truncate, write_voc64, wrong_mask_mode
from ..conftest import ROOT


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_voc64(tmp_path)


@pytest.mark.parametrize("breaks", KINDS, ids=[k.__name__ for k in KINDS])
def test_each_kind_of_bad_file_is_one_error_line_naming_it(make_cfg, root, tmp_path, breaks):
    named, phrase, preflight = breaks(root)
    data_root = named if breaks is missing_root else root
    cfg = make_cfg(*VOC64, f"dataset.root={data_root}", smoke=False)
    with pytest.raises(SystemExit) as exit_info, reported():
        run(cfg)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert f"'{named}'" in message and phrase in message
    started = read_run(tmp_path / "out")
    assert started is None if preflight else started["status"] == "failed"  # pre-flight: stopped before training


def test_bad_samples_are_skipped_counted_and_listed(make_cfg, root, tmp_path, capsys):
    bad = [missing_image(root)[0], wrong_mask_mode(root)[0], size_mismatch(root)[0],
           truncate(image(root, TRAIN_IDS[6])), labels_out_of_range(root)[0]]
    cfg = make_cfg(*VOC64, f"dataset.root={root}", "dataset.on_bad_sample=skip", "logger.run_name=skip-bad", smoke=False)
    train, val = build_datasets(cfg.dataset)
    assert (len(train), len(val)) == (len(TRAIN_IDS) - 4, len(VAL_IDS) - 1)
    assert 0.0 <= run(cfg) <= 1.0
    listed = (tmp_path / "out" / "bad_samples.txt").read_text()
    assert all(str(path) in listed for path in bad)
    assert "skipped 5 bad sample(s) (train 4, val 1)" in capsys.readouterr().out
    client = MlflowClient(cfg.logger.tracking_uri)
    (mrun,) = client.search_runs([client.get_experiment_by_name("kdseg").experiment_id], "attributes.run_name = 'skip-bad'")
    assert mrun.data.metrics["data/skipped_train"] == 4 and mrun.data.metrics["data/skipped_val"] == 1
    assert "bad_samples.txt" in {a.path for a in client.list_artifacts(mrun.info.run_id)}


def test_run_py_prints_one_line_without_traceback(tmp_path, session_dir):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "dataset=voc", f"dataset.root={tmp_path}/nowhere", "loss=none",
         f"paths.cache_dir={session_dir}/cache", f"logger.tracking_uri=sqlite:///{session_dir}/mlflow.db",
         f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: dataset.root '{tmp_path}/nowhere' does not exist (expected a VOC2012-style folder holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/)"
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_first_touch_error_in_a_worker_is_one_line(tmp_path, session_dir, root):
    """A truncated image met by a DataLoader worker process: still one line, naming the file."""
    bad = truncate(image(root, VAL_IDS[0]))
    cmd = [sys.executable, str(ROOT / "run.py"), *VOC64, f"dataset.root={root}", "trainer.num_workers=1",
           f"paths.cache_dir={session_dir}/cache", f"logger.tracking_uri=sqlite:///{session_dir}/mlflow.db",
           f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: image '{bad}' is truncated or corrupt")
    debug = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800, env={**os.environ, "KDSEG_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr
