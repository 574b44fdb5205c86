"""Each experiment preset at smoke size on a small folder in its dataset's real layout
(tests/real_layouts.py): a teacher of the preset's architecture (with a small encoder, no ImageNet
weights: nothing is downloaded), then a student distilled with CIRKD's own method (loss=kd+cirkd),
both trained with the preset's optimiser and learning rates under trainer=smoke."""
from __future__ import annotations

from pathlib import Path

import pytest

from kdseg.checkpoint import load_checkpoint
from kdseg.tasks import run

from ..real_layouts import write_dataset

PRESETS = {
    # preset: dataset, its folder, teacher and student arch, a small teacher encoder, lr for a batch of 2, optimiser, classes
    "cirkd_cityscapes": ("cityscapes", "cityscapes", "DeepLabV3", "DeepLabV3", "resnet18", 0.02 * 2 / 16, "SGD", 19),
    "cirkd_voc": ("voc_aug", "VOC2012", "DeepLabV3", "DeepLabV3", "resnet18", 0.02 * 2 / 16, "SGD", 21),
    "cirkd_ade20k": ("ade20k", "ADEChallengeData2016", "DeepLabV3", "DeepLabV3", "resnet18", 0.02 * 2 / 16, "SGD", 150),
    "cirkd_camvid": ("camvid", "CamVid", "DeepLabV3", "DeepLabV3", "resnet18", 0.02 * 2 / 16, "SGD", 11),
    "segformer_cityscapes": ("cityscapes", "cityscapes", "Segformer", "Segformer", "mit_b0", 2e-4 * 2 / 8, "AdamW", 19),
}
SMALL = [
    # the presets set the trainer's budget and batch themselves (after trainer=smoke): set them back
    "trainer=smoke", "trainer.epochs=1", "trainer.max_iters=2", "trainer.batch_size=2", "trainer.eval_every=1",
    "teacher.train.epochs=1", "dataset.base_size=64", "dataset.crop_size=64", "dataset.eval_size=[64,64]",
    "student.encoder_weights=null", "teacher.model.encoder_weights=null", "speed.repeats=2", "speed.warmup=1",
    "logger.log_checkpoints=none", "loss.terms.cirkd.pixel_memory_size=64", "loss.terms.cirkd.region_memory_size=16",
    "loss.terms.cirkd.pixel_contrast_size=64", "loss.terms.cirkd.region_contrast_size=16",
]


def _trained_with(ckpt: dict, optimiser: str, lr: float) -> None:
    """Every parameter group started at the preset's lr (scaled to the batch; no head multiplier), with
    the preset's optimiser and weight decay."""
    groups = ckpt["optimizer"]["param_groups"]
    assert all(g["initial_lr"] == pytest.approx(lr) and g["weight_decay"] == 1e-4 for g in groups)
    assert all(("betas" in g and "momentum" not in g) if optimiser == "AdamW" else g["momentum"] == 0.9 for g in groups)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_trains_a_teacher_then_distils_on_its_dataset_layout(make_cfg, tmp_path: Path, preset: str) -> None:
    dataset, folder, teacher_arch, student_arch, encoder, lr, optimiser, classes = PRESETS[preset]
    root = write_dataset(dataset, tmp_path / folder).root
    common = [f"experiment={preset}", f"dataset.root={root}", *SMALL, f"teacher.model.encoder_name={encoder}"]
    if preset == "segformer_cityscapes":  # its val windows, at the smoke size: crop = stride, as the preset's halves
        common += ["eval.crop=[32,32]", "eval.stride=32"]

    assert 0.0 <= run(make_cfg(*common, "task=teacher", f"paths.output_dir={tmp_path}/teacher", smoke=False)) <= 1.0
    teacher = load_checkpoint(tmp_path / "teacher" / "last.pt")
    assert (teacher["model"]["arch"], teacher["model"]["classes"]) == (teacher_arch, classes)
    _trained_with(teacher, optimiser, lr)

    cfg = make_cfg(*common, "loss=[kd,cirkd]", f"teacher.checkpoint={tmp_path}/teacher/last.pt",
                   f"paths.output_dir={tmp_path}/student", smoke=False)
    assert 0.0 <= run(cfg) <= 1.0
    student = load_checkpoint(tmp_path / "student" / "last.pt")
    assert (student["model"]["arch"], student["model"]["classes"]) == (student_arch, classes)
    _trained_with(student, optimiser, lr)
    queue = next(value for key, value in student["terms"].items() if key.endswith("pixel_queue"))
    assert queue.shape[:2] == (classes, 64)  # CIRKD's memory was trained, one queue per class of the dataset
