"""What a finished training job uploads: the best epoch's student, read back from best.pt only when it must be."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import kdseg.job
from kdseg.checkpoint import save_checkpoint
from kdseg.job import FitResult, upload_checkpoints

MODEL = {"encoder_name": "resnet18", "classes": 3}


class Uploads:
    """A tracker that records what would go to MLflow."""

    enabled, run_id = True, "run"

    def __init__(self) -> None:
        self.logged: list[tuple[Path, str | None]] = []

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.logged.append((Path(path), folder))


def finished_run(tmp_path: Path, last_epoch_best: bool) -> tuple[FitResult, tuple[torch.nn.Module, dict]]:
    """best.pt and last.pt as a Trainer leaves them (last.pt a link to best.pt when the last epoch was
    the best), and the student (network, model config) as it ended."""
    best_weights, final_weights = {"w": torch.arange(4.0)}, {"w": torch.arange(4.0) if last_epoch_best else -torch.ones(4)}
    optimizer = {"state": {0: torch.ones(4)}}
    best = save_checkpoint(tmp_path / "best.pt", state_dict=best_weights, model=MODEL, optimizer=optimizer, epoch=2)
    if last_epoch_best:
        last = save_checkpoint(tmp_path / "last.pt", keep_previous=True, same_as=best)
    else:
        last = save_checkpoint(tmp_path / "last.pt", keep_previous=True, state_dict=final_weights, model=MODEL, optimizer=optimizer, epoch=3)
    result = FitResult(0.5, 0.6, [], best, last, None)
    network = torch.nn.Module()
    network.register_buffer("w", final_weights["w"].clone())
    return result, (network, MODEL)


@pytest.mark.parametrize("last_epoch_best", [True, False])
def test_the_upload_is_the_best_epochs_student_read_back_only_when_the_last_epoch_was_not_the_best(tmp_path, monkeypatch, last_epoch_best):
    result, final = finished_run(tmp_path, last_epoch_best)
    reads: list[Path] = []
    real_load = kdseg.job.load_checkpoint
    monkeypatch.setattr(kdseg.job, "load_checkpoint", lambda path: reads.append(Path(path)) or real_load(path))
    tracker = Uploads()
    upload_checkpoints(OmegaConf.create({"logger": {"log_checkpoints": "student"}}), tracker, result, final_student=final)
    student = tmp_path / "best_student.pt"
    assert tracker.logged == [(student, "checkpoints")]
    saved = torch.load(student, weights_only=True)
    assert set(saved) == {"state_dict", "model"} and saved["model"] == MODEL
    assert torch.equal(saved["state_dict"]["w"], torch.arange(4.0))  # the best epoch's weights either way
    assert reads == ([] if last_epoch_best else [tmp_path / "best.pt"])
