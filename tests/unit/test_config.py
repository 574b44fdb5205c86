"""Every option of every config group composes, validates and instantiates; validation catches bad values (kdseg.config, kdseg.schema)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from kdseg.config import ConfigError, validate
from kdseg.distill import build_terms
from kdseg.train import PolyLR

from ..conftest import CONF_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_groups_have_the_documented_options():
    assert {"none", "pi", "pa", "pi_pa", "kd", "cwd", "at", "fitnet", "dist", "ifvd"} <= set(options("loss"))
    assert {"resnet18", "mobilenet_v2", "deeplabv3_resnet18", "deeplabv3_mobilenet_v2", "pspnet_resnet18", "segformer_b0",
            "upernet_resnet18"} <= set(options("student"))
    assert {"resnet101", "deeplabv3_resnet101", "segformer_b4"} <= set(options("teacher"))
    assert {"synthetic", "voc", "voc_aug", "cityscapes", "ade20k", "camvid"} <= set(options("dataset"))
    assert {"default", "smoke"} <= set(options("trainer"))
    assert {"sgd", "adamw"} <= set(options("trainer/optimizer"))


@pytest.mark.parametrize("option", options("student"))
def test_student_options_build(make_cfg, option):
    cfg = make_cfg(f"student={option}")
    validate(cfg)
    model = instantiate(cfg.student)
    assert type(model).__name__ == cfg.student.arch and model.segmentation_head[0].out_channels == 21


@pytest.mark.parametrize("option", options("teacher"))
def test_teacher_options_build(make_cfg, option):
    cfg = make_cfg(f"teacher={option}")
    validate(cfg)
    model = instantiate(cfg.teacher.model)
    assert type(model).__name__ == cfg.teacher.model.arch and model.segmentation_head[0].out_channels == 21


def test_default_teacher_starts_residual_blocks_as_identity(make_cfg):
    """The from-scratch ResNet-101 teacher zero-inits the last BN of each of its 33 blocks."""
    from torchvision.models.resnet import Bottleneck

    teacher = instantiate(make_cfg().teacher.model)
    blocks = [m for m in teacher.encoder.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 33 and all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)


BASELINES = {
    "kd": 1, "cwd": 3, "at": 10000, "fitnet": 1, "dist": 1, "ifvd": 200, "dkd": 1, "aicsd": 1, "bpkd": 1, "cirkd": 1, "afdcd": 1,
}
"""Each method's option switches on its own term at its reference weight."""


@pytest.mark.parametrize("option", options("loss"))
def test_loss_options_instantiate(make_cfg, option):
    cfg = make_cfg(f"loss={option}")
    validate(cfg)
    terms = {name: instantiate(term) for name, term in cfg.loss.terms.items()}
    assert terms["pi"].weight == cfg.loss.pi_lambda and terms["pa"].weight == cfg.loss.pa_lambda
    expected = {"none": {}, "pi": {"pi": 100}, "pa": {"pa": 1}, "pi_pa": {"pi": 100, "pa": 1}}.get(option)
    expected = expected if expected is not None else {option: BASELINES[option]}
    assert {name: term.weight for name, term in build_terms(cfg.loss.terms).items()} == expected


@pytest.mark.parametrize("option", ["none", "pi", "pa", "pi_pa"])
def test_pi_lambda_override_works_from_every_loss(make_cfg, option):
    cfg = make_cfg(f"loss={option}", "loss.pi_lambda=100")
    assert cfg.loss.terms.pi.weight == 100
    assert "pi" in build_terms(cfg.loss.terms)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["loss=[kd,cwd]"], {"kd": 1, "cwd": 3}),
        (["loss=pi_pa", "loss.terms.kd.weight=1"], {"pi": 100, "pa": 1, "kd": 1}),
        (["loss=[pi_pa,dist]", "loss.terms.dist.weight=2"], {"pi": 100, "pa": 1, "dist": 2}),
    ],
)
def test_loss_combinations_compose(make_cfg, overrides, expected):
    terms = build_terms(make_cfg(*overrides).loss.terms)
    assert {name: term.weight for name, term in terms.items()} == expected


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.terms.kd.temperature=0", r"config loss\.terms\.kd: temperature=0: expected a number > 0"),
        ("+loss.terms.kd.temprature=2", r"config loss\.terms\.kd: .*unexpected keyword argument 'temprature'"),
        ("loss.terms.kd._target_=kdseg.losses.kd.nope", r"config loss\.terms\.kd: .*kdseg\.losses\.kd\.nope"),
        ("loss.terms.kd._target_=torch.nn.Identity", r"config loss\.terms\.kd\._target_='torch\.nn\.Identity': expected a subclass"),
    ],
)
def test_bad_term_value_is_one_config_error_line(make_cfg, override, message):
    cfg = make_cfg("loss=kd", override)
    validate(cfg)
    with pytest.raises(ConfigError, match=message) as err:
        build_terms(cfg.loss.terms)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_instantiate(make_cfg, option):
    cfg = make_cfg(f"trainer={option}", smoke=False)
    validate(cfg)
    model = torch.nn.Linear(2, 2)
    optimizer = instantiate(cfg.trainer.optimizer)(model.parameters(), lr=0.1)
    scheduler = instantiate(cfg.trainer.scheduler)(optimizer, max_iters=10)
    assert isinstance(scheduler, PolyLR) and optimizer.defaults["momentum"] == 0.9


@pytest.mark.parametrize("option, kind, weight_decay", [("sgd", torch.optim.SGD, 5e-4), ("adamw", torch.optim.AdamW, 1e-2)])
def test_optimizer_options_instantiate_and_checkpoint(make_cfg, option, kind, weight_decay, tmp_path):
    """trainer/optimizer=<option> (under trainer=smoke too) builds that optimiser, which the teacher's
    training shares, and its state dict loads back as a checkpoint does (weights_only)."""
    cfg = make_cfg(f"trainer/optimizer={option}")
    validate(cfg)
    assert cfg.teacher.train.optimizer == cfg.trainer.optimizer and cfg.trainer.max_iters == 2  # smoke's
    model = torch.nn.Linear(2, 2)
    optimizer = instantiate(cfg.trainer.optimizer)(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    assert type(optimizer) is kind and optimizer.defaults["weight_decay"] == weight_decay
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    assert torch.load(tmp_path / "optimizer.pt", weights_only=True)["param_groups"][0]["lr"] == 0.1


@pytest.mark.parametrize("group", ["logger", "paths", "experiment"])
def test_other_groups_compose(make_cfg, group, tmp_path):
    """Every option composes into a valid config that sets what the option is for."""
    expected = {
        ("logger", "mlflow"): lambda cfg: cfg.logger.enabled is True,
        ("logger", "none"): lambda cfg: cfg.logger.enabled is False,
        ("paths", "default"): lambda cfg: cfg.paths.root_dir == str(tmp_path) and cfg.paths.output_dir == f"{tmp_path}/out",
        ("experiment", "paper"): lambda cfg: cfg.trainer.epochs == cfg.teacher.train.epochs == 120 and cfg.dataset.name == "voc",
        ("experiment", "cirkd_cityscapes"): lambda cfg: cfg.dataset.name == "cityscapes" and cfg.student.arch == "DeepLabV3"
        and cfg.teacher.model.arch == "DeepLabV3" and cfg.trainer.max_iters == 40000,
        **{("experiment", preset): lambda cfg, preset=preset: cfg.dataset.name == RECIPES[preset][0] for preset in RECIPES},
    }
    assert {option for g, option in expected if g == group} == set(options(group))
    for option in options(group):
        cfg = make_cfg(f"{group}={option}", smoke=group != "experiment")
        validate(cfg)
        assert expected[group, option](cfg), option


RECIPES = {
    # preset: dataset, its train images, crop, base size, teacher and student (arch, encoder, output stride),
    # optimiser, lr for base_batch images, global batch, iterations, weight decay, eval mode and window stride,
    # evaluation every n epochs; read off CIRKD's training scripts and the defaults of its train_*.py
    "cirkd_voc": ("voc_aug", 10582, 512, 375, ("DeepLabV3", "resnet101", 8), ("DeepLabV3", "resnet18", 8),
                  "torch.optim.SGD", 0.02, 16, 40000, 1e-4, ("whole", None), 1),
    "cirkd_ade20k": ("ade20k", 20210, 512, 512, ("DeepLabV3", "resnet101", 8), ("DeepLabV3", "resnet18", 8),
                     "torch.optim.SGD", 0.02, 16, 40000, 1e-4, ("whole", None), 1),
    "cirkd_camvid": ("camvid", 367, 352, 360, ("DeepLabV3", "resnet101", 8), ("DeepLabV3", "resnet18", 8),
                     "torch.optim.SGD", 0.02, 16, 40000, 1e-4, ("whole", None), 36),
    "segformer_cityscapes": ("cityscapes", 2975, 1024, 1024, ("Segformer", "mit_b4", None), ("Segformer", "mit_b0", None),
                             "torch.optim.AdamW", 2e-4, 8, 160000, 1e-4, ("slide", 1024), 2),
}
CIRKD_PARTS = {"cirkd_voc": (0.01, 0.01, 20000), "segformer_cityscapes": (0.1, 0.1, 2000)}
"""The presets that set CIRKD's options as their dataset's scripts do: pixel and region weights, pixel memory."""


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_experiment_presets_compose_to_cirkds_recipes(make_cfg, preset):
    data, images, crop, base, teacher, student, optimizer, lr, batch, iters, decay, (mode, stride), every = RECIPES[preset]
    cfg = make_cfg(f"experiment={preset}", smoke=False)
    validate(cfg)
    t, ds, m = cfg.trainer, cfg.dataset, cfg.teacher.model
    assert (ds.name, ds.crop_size, ds.base_size, list(ds.scale_range), ds.blur_prob) == (data, crop, base, [0.5, 2.0], 0)
    assert (m.arch, m.encoder_name, m.output_stride) == teacher and m.encoder_weights == "imagenet"
    assert (cfg.student.arch, cfg.student.encoder_name, cfg.student.output_stride) == student
    assert cfg.student.encoder_weights == "imagenet"
    assert (t.optimizer._target_, t.base_lr, t.base_batch, t.batch_size, t.head_lr_mult) == (optimizer, lr, batch, batch, 1)
    assert (t.max_iters, t.optimizer.weight_decay, t.scheduler.power, t.eval_every) == (iters, decay, 0.9, every)
    assert "momentum" not in t.optimizer if optimizer.endswith("AdamW") else t.optimizer.momentum == 0.9
    # the fewest epochs whose iterations (the train loader drops the last partial batch) reach max_iters
    per_epoch = images // batch
    assert (t.epochs - 1) * per_epoch < iters <= t.epochs * per_epoch and cfg.teacher.train.epochs == t.epochs
    assert (cfg.eval.mode, cfg.eval.stride, list(cfg.eval.scales), cfg.eval.flip) == (mode, stride, [1.0], False)
    assert ds.eval_mode == "full" and (mode == "whole" or list(cfg.eval.crop) == [crop, crop])
    cirkd = cfg.loss.terms.cirkd
    assert (cirkd.pixel_weight, cirkd.region_weight, cirkd.pixel_memory_size) == CIRKD_PARTS.get(preset, (0.1, 0.1, 20000))
    assert cirkd.weight == 0 and set(build_terms(cfg.loss.terms)) == {"pi", "pa"}  # the method is loss=...'s


def test_experiment_paper_selects_voc_and_recipe(make_cfg):
    cfg = make_cfg("experiment=paper", smoke=False)
    validate(cfg)
    assert cfg.dataset.name == "voc" and set(build_terms(cfg.loss.terms)) == {"pi", "pa"}
    assert cfg.trainer.batch_size == 6 and cfg.dataset.crop_size == 512


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.pa_lambda=-1", "loss.pa_lambda"),
        ("dataset.crop_size=100", "dataset.crop_size"),
        ("task=trian", "task"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.amp=fp8", "trainer.amp"),
        ("student.classes=19", "student.classes"),
        ("dataset.image_size=16", "dataset.image_size"),
        ("teacher.bn_mode=frozen", "teacher.bn_mode"),
        ("dataset.eval_mode=tiles", "dataset.eval_mode"),
        ("trainer.base_lr=abc", "trainer.base_lr"),
        ("dataset.on_bad_sample=ignore", "dataset.on_bad_sample"),
        ("trainer.resume=''", "trainer.resume"),
        ("loss.terms.pi.weight=-5", "loss.terms.pi.weight"),
        ("dataset.eval_size=[64,60]", "dataset.eval_size"),
        ("dataset.eval_size=64", "dataset.eval_size"),
        ("speed.repeats=0", "speed.repeats"),
        ("speed.enabled=maybe", "speed.enabled"),
        ("dataset.tune_fraction=1.5", "dataset.tune_fraction"),
        ("dataset.tune_fraction=0", "dataset.tune_fraction"),
        ("dataset.tune_seed=-1", "dataset.tune_seed"),
    ],
)
def test_validation_names_the_bad_key(make_cfg, override, key):
    cfg = make_cfg(override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.parametrize("key", ["student.encoder_name", "teacher.model.encoder_name"])
def test_unknown_encoder_lists_close_and_valid_names(make_cfg, key):
    cfg = make_cfg(f"{key}=resnet19")
    with pytest.raises(ConfigError, match=rf"config {key.replace('.', '[.]')}='resnet19': unknown encoder; did you mean resnet18") as err:
        validate(cfg)
    assert "Valid smp encoders: " in str(err.value) and "mobilenet_v2" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("+trainer.batchsize=4", "config key trainer.batchsize is not a kdseg setting"),
        ("~trainer.epochs", "config key trainer.epochs is missing"),
        ("trainer.batch_size='3'", "config trainer.batch_size='3': expected an integer >= 1"),
        ("trainer.deterministic=1", "config trainer.deterministic=1: expected true or false"),
        ("trainer.amp=fp8", "config trainer.amp='fp8': expected one of auto, bf16, fp16, off"),
        ("student.output_stride=32", "config student.output_stride=32: expected one of 8, 16"),
        ("trainer.batch_size=0", "config trainer.batch_size=0: expected"),  # where it is set, not teacher.train's copy
        ("teacher.train.epochs=0", "config teacher.train.epochs=0: expected an integer >= 1"),
        ("dataset.image_size=40", "config dataset.crop_size=40 (from ${.image_size}): expected a multiple of 16"),
        ("trainer.channels_last=yes", "config trainer.channels_last='yes': expected one of auto, true, false"),
    ],
)
def test_schema_errors_are_one_line_naming_key_value_and_expectation(make_cfg, override, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(override))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)



def test_the_schema_is_in_hydras_config_store_and_types_a_composed_config():
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from kdseg.schema import SCHEMA

    schema = ConfigStore.instance().load(f"{SCHEMA}.yaml").node
    assert set(schema) >= {"task", "seed", "teacher", "student", "dataset", "loss", "trainer", "eval", "logger", "paths", "speed"}
    with pytest.raises(ValidationError, match="batch_size"):
        OmegaConf.merge(schema, {"trainer": {"batch_size": "eight"}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.batch_size=1"], "config trainer.batch_size=1: a training batch of 1 image per process cannot train"),
        (["task=teacher", "trainer.batch_size=1"], "config teacher.train.batch_size=1 (from ${trainer.batch_size}): a training"),
        (["teacher.train.batch_size=1"], "config teacher.train.batch_size=1: a training batch"),  # the cached teacher
        (["task=distill", "trainer.batch_size=1", "trainer.sync_bn=true"], "config trainer.batch_size=1:"),  # not under DDP
    ],
)
def test_a_training_batch_of_one_is_a_config_error_naming_the_key_reason_and_remedy(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*overrides))
    text = str(err.value)
    assert text.startswith(message) and "ASPP image-pooling branch" in text and "\n" not in text
    assert "a batch of 2 or more per process" in text


def test_a_batch_of_one_is_allowed_where_it_trains(make_cfg, monkeypatch, tmp_path):
    """Cross-entropy only with a given teacher needs no cached teacher; task=eval does not train;
    under DDP on CUDA, SyncBatchNorm normalises over the global batch."""
    validate(make_cfg("teacher.train.batch_size=1", "loss=none"))
    validate(make_cfg("task=eval", "trainer.batch_size=1"))
    monkeypatch.setattr("kdseg.dist.launched_distributed", lambda: True)
    monkeypatch.setattr("kdseg.config.resolve_device", lambda device: torch.device("cuda"))
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")
    validate(make_cfg("trainer.batch_size=1", "trainer.sync_bn=true", f"teacher.checkpoint={teacher}"))
    with pytest.raises(ConfigError, match="trainer.batch_size=1"):
        validate(make_cfg("trainer.batch_size=1", "trainer.sync_bn=false", f"teacher.checkpoint={teacher}"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["teacher.checkpoint={folder}"], "config teacher.checkpoint='{folder}' is a folder, not a file: expected a checkpoint file (such as last.pt"),
        (["teacher.checkpoint={missing}"], "config teacher.checkpoint='{missing}' does not exist: expected a checkpoint file"),
        (["task=eval", "checkpoint={folder}"], "config checkpoint='{folder}' is a folder, not a file: expected a checkpoint file"),
        (["dataset=voc", "dataset.root={file}"], "config dataset.root='{file}' is a file, not a folder: expected a VOC2012-style folder holding JPEGImages/"),
        (["dataset=cityscapes", "dataset.root={file}"], "config dataset.root='{file}' is a file, not a folder: expected a Cityscapes folder holding leftImg8bit/"),
        (["dataset.root={file}"], "config dataset.root='{file}' is a file: expected a folder (kdseg creates it if missing)"),
        (["paths.cache_dir={file}"], "config paths.cache_dir='{file}' is a file: expected a folder"),
        (["paths.data_dir={file}/data"], "config paths.data_dir='{file}/data' lies under the file '{file}': expected a folder"),
        (["paths.output_dir={file}"], "config paths.output_dir='{file}' is a file: expected a folder"),
    ],
)
def test_a_path_of_the_wrong_kind_says_what_it_is_and_what_was_expected(make_cfg, tmp_path, overrides, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("not a folder")
    names = {name: tmp_path / name for name in ("folder", "file", "missing")}
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*(o.format(**names) for o in overrides), smoke=not overrides[0].startswith("dataset=")))
    assert str(err.value).startswith(message.format(**names)) and "\n" not in str(err.value)


def test_paths_of_the_right_kind_pass(make_cfg, tmp_path):
    """A teacher checkpoint that is a file; folders that exist or can be created."""
    (tmp_path / "teacher.pt").write_bytes(b"")
    validate(make_cfg(f"teacher.checkpoint={tmp_path / 'teacher.pt'}", f"paths.cache_dir={tmp_path}/new/cache"))


def test_a_teacher_is_not_trained_on_a_tuning_split(make_cfg):
    with pytest.raises(ConfigError, match=r"^config dataset.tune_fraction=0.2: expected null with task=teacher"):
        validate(make_cfg("task=teacher", "dataset.tune_fraction=0.2"))


def test_a_loss_options_search_space_is_not_a_setting_of_the_run(make_cfg):
    """loss.search (what a tuning study searches) is neither a param nor part of the fingerprint."""
    from kdseg.resume import fingerprint, run_config
    from kdseg.tracking import run_params

    cfg = make_cfg("loss=kd")
    assert cfg.loss.search["loss.terms.kd.weight"] == "tag(log, interval(0.1, 10))"
    assert not [key for key in run_params(cfg, 1) if key.startswith("loss.search")]
    assert not [key for key in run_config(cfg) if key.startswith("loss.search")]
    other = make_cfg("loss=kd", "loss.search={}")
    assert fingerprint(run_config(other)) == fingerprint(run_config(cfg)) and run_params(other, 1) == run_params(cfg, 1)


@pytest.mark.parametrize("option", [o for o in options("loss") if o != "_terms"])
def test_every_loss_option_has_a_search_space_of_its_own_knobs(make_cfg, option):
    """Kept next to the method (conf/loss/<option>.yaml): the baseline searches its own knobs, a method its loss.* keys."""
    from kdseg.study import search_space

    space = search_space(make_cfg(f"loss={option}"), option)
    assert space and all(isinstance(v, str) and ("interval(" in v or "choice(" in v) for v in space.values())


def test_help_lists_only_the_groups_and_options_a_user_picks():
    """``python run.py --help``: no internal node (the terms list under every loss option) and no folder that
    is not a group of run.py (the study presets, which kdseg.study reads)."""
    import subprocess
    import sys

    from ..conftest import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], capture_output=True, text=True, check=True, timeout=120).stdout
    section = out.split("== Configuration groups ==")[1].split("== Config ==")[0]
    groups = dict(line.split(": ", 1) for line in section.splitlines() if ": " in line)
    assert sorted(groups) == ["dataset", "eval", "experiment", "logger", "loss", "paths", "student", "sweep", "teacher", "trainer",
                              "trainer/optimizer"]
    assert groups["loss"].split(", ") == options("loss") and "_terms" not in out
