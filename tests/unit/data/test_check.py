"""Bad datasets without a run (kdseg.data.check and its CLI, ``python -m kdseg.data``): every problem listed
at once; all samples bad is an error even when skipping.

Each test writes a small built-in dataset (8 train / 2 val images of 64 px, VOC layout) into
its own folder and breaks it in one way.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from kdseg.data import build_datasets
from kdseg.data.__main__ import main as check_main
from kdseg.data.synthetic import generate

from ...bad_voc import VAL_IDS, VOC64, mask, missing_mask, size_mismatch, truncate_png, truncated_image, truncated_mask, unreadable_image, write_voc64


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_voc64(tmp_path)


def test_all_samples_bad_is_an_error_even_when_skipping(make_cfg, root):
    for sample in VAL_IDS:
        truncate_png(mask(root, sample))
    cfg = make_cfg(*VOC64, f"dataset.root={root}", "dataset.on_bad_sample=skip", smoke=False)
    with pytest.raises(ValueError, match=r"all 2 samples are bad, nothing left"):
        build_datasets(cfg.dataset)


def test_check_reports_every_problem_at_once(root, tmp_path, capsys, monkeypatch):
    broken = [k(root)[0] for k in (missing_mask, unreadable_image, size_mismatch, truncated_image, truncated_mask)]
    monkeypatch.chdir(tmp_path)
    assert check_main(["dataset=voc", f"dataset.root={root}"]) == 1
    out = capsys.readouterr().out
    for path in broken:
        assert str(path) in out
    assert "train: 8 samples" in out and "val: 2 samples" in out and "5 problem(s) found" in out
    assert check_main(["dataset=voc", f"dataset.root={generate(tmp_path / 'good', 4, 2, 64, 0)}"]) == 0
    assert "dataset OK" in capsys.readouterr().out


def test_check_with_a_bad_override_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        check_main(["dataset=vocc"])
    assert str(exit_info.value.code).startswith("error: ") and "vocc" in str(exit_info.value.code)
