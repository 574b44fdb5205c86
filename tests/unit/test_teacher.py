"""The teacher cache's key (kdseg.teacher): what decides which teacher is trained, and nothing else."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdseg.errors import ConfigError
from kdseg.teacher import cache_path, cached_teacher, trainer_config


@pytest.mark.parametrize(
    "override",
    ["teacher.train.epochs=2", "teacher.train.seed=1", "trainer.base_lr=0.01", "trainer.batch_size=4", "trainer.max_iters=3",
     "teacher.model.encoder_name=resnet50", "dataset.num_train=20", "dataset.scale_range=[0.5,2.0]"],
)
def test_what_the_teacher_learns_from_changes_the_key(make_cfg, override):
    assert cache_path(make_cfg(override)) != cache_path(make_cfg())


@pytest.mark.parametrize(
    "override",
    ["seed=3", "loss=pa", "trainer.epochs=7", "student=mobilenet_v2", "dataset.on_bad_sample=skip", "trainer.num_workers=1",
     "paths.data_dir=/elsewhere",  # the generated dataset's root is a function of its settings: not in the key
     "dataset.tune_fraction=0.2", "dataset.tune_seed=4"],  # a teacher always trains on the whole train split
)
def test_what_the_teacher_does_not_depend_on_keeps_the_key(make_cfg, override):
    assert cache_path(make_cfg(override)) == cache_path(make_cfg())


def test_a_teacher_trains_with_the_students_settings_unless_teacher_train_sets_its_own(make_cfg):
    cfg = make_cfg()
    assert OmegaConf.to_container(trainer_config(cfg), resolve=True) == OmegaConf.to_container(cfg.trainer, resolve=True)
    own = make_cfg("teacher.train.batch_size=4", "teacher.train.amp=off", "teacher.train.epochs=3")
    teacher = trainer_config(own)
    assert (teacher.batch_size, teacher.amp, teacher.epochs) == (4, "off", 3)
    assert (own.trainer.batch_size, own.trainer.amp, own.trainer.epochs) == (2, "auto", 1)  # the student's stay


def test_the_default_teachers_key_is_the_one_it_had(make_cfg):
    """Keys added to the config since (a tuning run's split, the loss options' search spaces) leave the
    default job's cached teacher where it was: no user's cache is trained again."""
    assert cache_path(make_cfg(smoke=False)).name == "resnet101-synthetic-1ba58e214af1.pt"


def test_a_tuning_run_does_not_train_a_missing_teacher(make_cfg, tmp_path):
    cfg = make_cfg("loss=kd", "dataset.tune_fraction=0.2", f"paths.cache_dir={tmp_path}/empty")
    with pytest.raises(ConfigError, match=r"^dataset.tune_fraction=0.2 \(a tuning run\) needs its teacher trained first"):
        cached_teacher(cfg, (), torch.device("cpu"))
    assert not list((tmp_path / "empty").rglob("*.pt"))  # nothing trained
