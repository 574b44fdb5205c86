"""Architectures as config, taps by role, student-to-teacher resizing and smp pretrained teachers."""
from __future__ import annotations

import copy

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from kdseg.checkpoint import load_model, model_config, save_checkpoint
from kdseg.distill import Distiller, align_to, build_terms
from kdseg.errors import CheckpointError, ConfigError
from kdseg.losses import Term
from kdseg.models import (
    DECODER, ENCODER, FeatureTaps, arch_multiple, build_model, input_multiple, load_pretrained, resolve_taps,
)

from tests.conftest import compose_config

SMALL = {
    "DeepLabV3Plus": {},
    "DeepLabV3": {"output_stride": 8},
    "PSPNet": {"output_stride": None, "options": {"encoder_depth": 3}},
    "UPerNet": {"output_stride": None},
    "Segformer": {"output_stride": None},
    "FPN": {"output_stride": None},
}
"""A ResNet-18 model of each architecture (``build_model`` arguments besides the encoder)."""


def _small(arch: str, encoder: str = "resnet18", classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(encoder, classes, arch=arch, **SMALL[arch])


# ---------------------------------------------------------------------------- the factory


def test_default_arch_is_the_same_deeplabv3plus_bit_for_bit():
    """``build_model`` goes through smp's factory, yet draws and builds exactly what ``smp.DeepLabV3Plus`` did."""
    torch.manual_seed(3)
    ours = build_model("resnet18", 21, output_stride=16)
    after_ours = torch.rand(1)
    torch.manual_seed(3)
    theirs = smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None, classes=21, encoder_output_stride=16)
    assert torch.equal(after_ours, torch.rand(1))  # the same random draws
    assert type(ours) is smp.DeepLabV3Plus
    ref = theirs.state_dict()
    assert ref.keys() == ours.state_dict().keys() and all(torch.equal(ref[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_arch_multiple_is_what_the_built_model_needs(arch):
    """The config-time multiple equals the built model's, the model keeps the input size at it, and
    smp refuses half of it (where the model checks sizes at all)."""
    model = _small(arch).eval()
    options = SMALL[arch].get("options")
    multiple = arch_multiple(arch, SMALL[arch].get("output_stride", 16), options)
    assert multiple == input_multiple(model) == {"DeepLabV3Plus": 16, "DeepLabV3": 8, "PSPNet": 8}.get(arch, 32)
    wrapped = nn.Module()
    wrapped.module = model  # as DDP holds it
    assert input_multiple(wrapped) == multiple
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 3 * multiple, 2 * multiple)).shape == (1, 3, 3 * multiple, 2 * multiple)
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, 3 * multiple + multiple // 2, 2 * multiple))


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "DeepLabV3Plas"}, "config model.arch='DeepLabV3Plas': unknown smp architecture; did you mean DeepLabV3Plus"),
    ({"arch": "PSPNet", "output_stride": 16}, "config model.output_stride=16: expected null (PSPNet has no output stride"),
    ({"arch": "DeepLabV3", "output_stride": None}, "config model.output_stride=None: expected 8 or 16"),
    ({"arch": "PSPNet", "output_stride": None, "options": {"psp_out_channel": 64}}, "PSPNet has no option 'psp_out_channel'; did you mean psp_out_channels"),
])
def test_bad_arch_or_option_is_one_line_with_close_matches(kwargs, message):
    with pytest.raises(ConfigError) as err:
        build_model("resnet18", 3, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_encoder_the_arch_cannot_take_is_one_line():
    with pytest.raises(ConfigError, match=r"DeepLabV3 cannot be built with encoder 'vgg11' .*do not support dilated mode") as err:
        build_model("vgg11", 3, arch="DeepLabV3", output_stride=8)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("student.arch=Segformr", "config student.arch='Segformr': unknown smp architecture; did you mean Segformer"),
    ("student=segformer_b0 dataset.image_size=80",
     "config dataset.crop_size=80: expected a multiple of 32 (student Segformer: 32, teacher DeepLabV3Plus: 16)"),
    ("student=pspnet_resnet18 +student.options.encoder_dept=3", "config student.options.encoder_dept: PSPNet has no option"),
    ("teacher=segformer_b4 eval=slide eval.crop=48", "config eval.crop=48: expected a multiple of 32"),
])
def test_config_errors_before_any_model_is_built(make_cfg, override, message):
    from kdseg.config import validate

    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*override.split()))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_keeps_arch_and_options_and_old_files_load_as_deeplabv3plus(tmp_path):
    cfg = compose_config(["student=pspnet_resnet18", "dataset.num_classes=21"])
    conf = model_config(cfg.student)
    assert conf == {"encoder_name": "resnet18", "classes": 21, "encoder_weights": None, "output_stride": None,
                    "arch": "PSPNet", "options": {"encoder_depth": 3, "psp_out_channels": 512}}
    model = build_model(**conf)
    save_checkpoint(tmp_path / "psp.pt", state_dict=model.state_dict(), model=conf)
    loaded, _ = load_model(tmp_path / "psp.pt", expect={"arch": "PSPNet"})
    assert type(loaded) is smp.PSPNet and loaded.state_dict().keys() == model.state_dict().keys()
    old = build_model("resnet18", 21)
    save_checkpoint(tmp_path / "old.pt", state_dict=old.state_dict(),
                    model={"encoder_name": "resnet18", "classes": 21, "encoder_weights": None, "output_stride": 16})
    loaded, _ = load_model(tmp_path / "old.pt", expect={"arch": "DeepLabV3Plus"})
    assert type(loaded) is smp.DeepLabV3Plus
    with pytest.raises(CheckpointError, match="has arch=.DeepLabV3Plus., but this run needs arch=.PSPNet."):
        load_model(tmp_path / "old.pt", expect={"arch": "PSPNet"})


# ---------------------------------------------------------------------------- taps


def test_roles_read_the_head_input_and_the_deepest_encoder_feature():
    model = _small("DeepLabV3Plus").eval()
    taps = FeatureTaps(model, [DECODER, ENCODER, "decoder.block2"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        assert torch.equal(taps[DECODER], taps["decoder.block2"])  # DeepLabV3+'s head reads the decoder's output
        assert torch.equal(taps[ENCODER], model.encoder(x)[-1])
    psp = _small("PSPNet").eval()
    taps = FeatureTaps(psp, [DECODER])
    with torch.no_grad():
        psp(x)
        assert torch.equal(taps[DECODER], psp.decoder(psp.encoder(x)))


def test_taps_resolve_per_pair():
    dlv3p, dlv3p_b, psp = _small("DeepLabV3Plus"), _small("DeepLabV3Plus", "mobilenet_v2"), _small("PSPNet")
    assert resolve_taps(dlv3p, dlv3p_b, "decoder.block2.1") == ("decoder.block2.1", "decoder.block2.1")  # the paper's, exactly
    assert resolve_taps(dlv3p, dlv3p_b, "decoder.aspp.0.project.1") == ("decoder.aspp.0.project.1",) * 2
    assert resolve_taps(psp, dlv3p, "decoder.block2.1") == (DECODER, DECODER)
    assert resolve_taps(psp, dlv3p, "decoder.aspp.0.project.1") == (ENCODER, ENCODER)
    assert resolve_taps(psp, dlv3p, "logits") == ("logits", "logits")
    assert resolve_taps(psp, dlv3p, {"student": "decoder", "teacher": "decoder.block2.1"}) == (DECODER, "decoder.block2.1")
    with pytest.raises(ConfigError, match="tap module path 'decoder.block3' not found in PSPNet"):
        resolve_taps(psp, dlv3p, {"student": "decoder.block3", "teacher": "decoder"})
    with pytest.raises(ConfigError, match="'encoder.layer9' not found in DeepLabV3Plus; close matches: encoder.layer"):
        resolve_taps(dlv3p, dlv3p_b, "encoder.layer9")


# ---------------------------------------------------------------------------- alignment


def test_align_to_resizes_bilinearly_by_hand():
    """2x2 -> 4x4, align_corners=False: each axis samples at (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25
    (clamped to [0, 1]), so a map a*r + b*c becomes a*R_i + b*R_j with R = [0, 0.25, 0.75, 1]."""
    small = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]  # 2 * r + c
    target = torch.zeros(1, 5, 4, 4)
    r = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = (2 * r[:, None] + r[None, :])[None, None]
    assert torch.allclose(align_to(small, target), expected)
    same = torch.randn(1, 3, 4, 4)
    assert align_to(same, target) is same


class _Record(Term):
    """Records the shapes it is given; the loss is the mean of the student's map."""

    def __init__(self, tap) -> None:
        super().__init__(1.0, tap)
        self.shapes: list[tuple] = []

    def loss(self, feat_s, feat_t, masks):
        self.shapes.append((tuple(feat_s.shape), tuple(feat_t.shape)))
        return feat_s.mean()


def test_the_student_map_reaches_the_term_at_the_teachers_size():
    psp, segformer = _small("PSPNet"), _small("Segformer")  # decoder maps: 512 x H/8, 256 x H/4
    term = _Record("decoder")
    Distiller(psp, segformer, {"rec": term}, input_size=64)
    assert term.shapes == [((1, 512, 16, 16), (1, 256, 16, 16))]


class _SameChannels(Term):
    def loss(self, feat_s, feat_t, masks):
        return F.mse_loss(feat_s, feat_t)


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_a_term_that_cannot_take_the_channel_mismatch_says_so_at_the_probe():
    with pytest.raises(ConfigError) as err:
        Distiller(_small("PSPNet"), _small("Segformer"), {"mse": _SameChannels(1.0, "decoder")}, input_size=64)
    msg = str(err.value)
    assert "loss.terms.mse cannot be computed" in msg and "student 1x512x16x16 (decoder), teacher 1x256x16x16 (decoder)" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------------------- the matrix

TEACHERS = {"deeplabv3plus_r101": ("DeepLabV3Plus", "resnet101"), "deeplabv3_r101": ("DeepLabV3", "resnet101"),
            "segformer_b2": ("Segformer", "mit_b2")}
STUDENTS = {"deeplabv3plus_r18": ("DeepLabV3Plus", "resnet18"), "deeplabv3_r18": ("DeepLabV3", "resnet18"),
            "pspnet_r18": ("PSPNet", "resnet18"), "segformer_b0": ("Segformer", "mit_b0"), "upernet_r18": ("UPerNet", "resnet18")}
TERM_OPTIONS = ["pi", "pa", "kd", "cwd", "at", "fitnet", "dist", "ifvd", "dkd", "aicsd", "bpkd", "cirkd", "afdcd"]
SMALL_CROP = {"afdcd": ["loss.terms.afdcd.pool_size=2"]}
"""At a 64 px crop a stride-8 decoder map is 8 x 8: Af-DCD's 4-pooling would leave less than one 4 x 4 patch."""
SIGNED = {"aicsd"}
"""Terms that may be negative: AICSD's adaptive weighting adds (a - 1) x cross-entropy, a <= 1."""
FAST = {("deeplabv3plus_r101", "pspnet_r18", term) for term in ("pa", "fitnet")}
"""What the default run covers: a cross-architecture pair through both roles (pa: encoder, fitnet:
decoder), the resizing and an adapter; the rest of the matrix is slow-marked."""
_MODELS: dict[str, nn.Module] = {}


def _model(key: str) -> nn.Module:
    """A 5-class model of the matrix, built once per session (students are copied before training)."""
    if key not in _MODELS:
        arch, encoder = {**TEACHERS, **STUDENTS}[key]
        stride = 8 if arch == "DeepLabV3" else 16 if arch == "DeepLabV3Plus" else None
        torch.manual_seed(0)
        _MODELS[key] = build_model(encoder, 5, output_stride=stride, arch=arch)
    return _MODELS[key]


def _matrix():
    for teacher in TEACHERS:
        for student in STUDENTS:
            for term in TERM_OPTIONS:
                marks = () if (teacher, student, term) in FAST else (pytest.mark.slow,)
                yield pytest.param(teacher, student, term, id=f"{teacher}-{student}-{term}", marks=marks)


@pytest.mark.parametrize("teacher_key, student_key, option", list(_matrix()))
def test_one_training_step_on_every_pair(teacher_key, student_key, option):
    """One term (``loss=<option>``, its reference weight and default tap) on one pair at a 64 px crop,
    batch 2: a finite loss whose gradient reaches the student (and the term's adapter), none the teacher."""
    teacher, student = _model(teacher_key), copy.deepcopy(_model(student_key))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    masks = torch.randint(0, 5, (2, 64, 64), generator=generator)
    terms = build_terms(compose_config([f"loss={option}", "dataset.num_classes=5", *SMALL_CROP.get(option, [])]).loss.terms)
    distiller = Distiller(student, teacher, terms, input_size=64).train()
    (name, term), = distiller.terms.items()
    total, parts, _ = distiller(images, masks)
    assert torch.isfinite(total) and set(parts) == {"ce", name}
    logits_s, logits_t = student(images), distiller.run_teacher(images)
    loss = term(*distiller._inputs(name, logits_s, logits_t), masks)
    assert torch.isfinite(loss) and (loss != 0 if option in SIGNED else loss > 0)
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads) and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in term.parameters())  # fitnet's adapter
    distiller.student_taps.remove(), distiller.teacher_taps.remove()


def test_pretrained_teacher_from_a_saved_folder(tmp_path):
    model = _small("FPN", classes=4).eval()
    model.save_pretrained(tmp_path / "fpn")
    loaded = load_pretrained(str(tmp_path / "fpn"), classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert type(loaded) is smp.FPN and torch.equal(loaded(x), model(x))
    with pytest.raises(ConfigError, match="the model predicts 4 classes, the dataset has 21"):
        load_pretrained(str(tmp_path / "fpn"), classes=21)


def test_unreachable_hub_id_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time; the env var only at import
    with pytest.raises(ConfigError) as err:
        load_pretrained("kdseg-tests/no-such-model")
    msg = str(err.value)
    assert msg.startswith("config teacher.pretrained='kdseg-tests/no-such-model': could not load it as a Hugging Face hub id")
    assert "\n" not in msg


def test_cirkd_cityscapes_preset_composes_to_cirkds_recipe(make_cfg):
    from kdseg.config import validate

    cfg = make_cfg("experiment=cirkd_cityscapes", smoke=False)
    validate(cfg)
    assert (cfg.teacher.model.arch, cfg.teacher.model.encoder_name, cfg.teacher.model.output_stride) == ("DeepLabV3", "resnet101", 8)
    assert (cfg.student.arch, cfg.student.encoder_name, cfg.student.encoder_weights) == ("DeepLabV3", "resnet18", "imagenet")
    assert (cfg.dataset.name, cfg.dataset.crop_size, cfg.dataset.num_classes) == ("cityscapes", 512, 19)
    t = cfg.trainer
    assert (t.max_iters, t.batch_size, t.base_lr, t.base_batch, t.head_lr_mult, t.optimizer.weight_decay) == (40000, 16, 0.02, 16, 1, 1e-4)
    assert t.epochs * (2975 // t.batch_size) >= t.max_iters  # the iteration budget, not the epochs, ends the run
    assert cfg.teacher.train.epochs == t.epochs and cfg.dataset.blur_prob == 0 and t.eval_every == 4
