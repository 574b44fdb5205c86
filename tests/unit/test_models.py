"""Models, feature taps, parameter groups, lr schedule, AMP policy and checkpoints.

Every expected number here is known by construction (shapes from the output stride,
hand-computed poly lr values, state dicts written by the test itself) or measured once
from smp and pinned so the README's parameter counts stay true.
"""
from __future__ import annotations

import copy
import errno
import math
import os
from pathlib import Path
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdseg.checkpoint import load_checkpoint, load_model, previous_path, save_checkpoint, save_student
from kdseg.errors import CheckpointError
from kdseg.losses import PairwiseLoss, PixelwiseLoss
from kdseg.models import FeatureTaps, build_model, count_params, resolve_module, zero_init_residual_
from kdseg.runtime import amp_policy
from kdseg.train import PolyLR, param_groups

ENCODERS = ("resnet101", "resnet18", "mobilenet_v2")
PA_TAP = "decoder.aspp.0.project.1"
PI_TAP = "decoder.block2.1"
# Measured from smp's DeepLabV3Plus at 21 classes (README numbers).
PARAMS = {"resnet18": 12.3e6, "mobilenet_v2": 4.4e6, "resnet101": 45.7e6}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """Each encoder's model built once for the whole module (ResNet-101 only here)."""
    torch.manual_seed(0)
    return {name: build_model(name, classes=21) for name in ENCODERS}


def _relu_after(path: str) -> str:
    """Module path of the ReLU that follows the BatchNorm at ``path`` (index + 1 in its Sequential)."""
    parent, _, idx = path.rpartition(".")
    return f"{parent}.{int(idx) + 1}"


# ---------------------------------------------------------------------------- taps


def test_loss_default_taps_are_the_reference_taps():
    assert PairwiseLoss(1).tap == PA_TAP
    assert PixelwiseLoss(1).tap == PI_TAP


@pytest.mark.parametrize("encoder", ENCODERS)
def test_taps_are_pre_relu_bn_outputs(models, encoder):
    model = models[encoder]
    model.train()
    taps = FeatureTaps(model, [PA_TAP, PI_TAP])
    relu_out: dict[str, torch.Tensor] = {}
    handles = []
    for path in (PA_TAP, PI_TAP):
        relu = model.get_submodule(_relu_after(path))
        assert isinstance(relu, nn.ReLU)
        assert isinstance(model.get_submodule(path), nn.BatchNorm2d)
        handles.append(relu.register_forward_hook(lambda m, i, o, p=path: relu_out.__setitem__(p, o.detach().clone())))
    try:
        torch.manual_seed(1)
        logits = model(torch.randn(2, 3, 128, 128))
        assert logits.shape == (2, 21, 128, 128)
        pa, pi = taps[PA_TAP], taps[PI_TAP]
        assert pa.shape == (2, 256, 8, 8)  # output stride 16
        assert pi.shape == (2, 256, 32, 32)  # decoder at stride 4
        for path, feat in ((PA_TAP, pa), (PI_TAP, pi)):
            assert (feat < 0).any(), f"{encoder} {path}: tap is not pre-ReLU"
            assert torch.equal(F.relu(feat.detach()), relu_out[path])
    finally:
        for h in handles:
            h.remove()
        taps.remove()


def _toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))


def test_inplace_relu_after_tap_is_disabled():
    net = _toy()
    taps = FeatureTaps(net, ["1"])
    assert net[2].inplace is False
    out = net(torch.randn(2, 3, 8, 8))
    feat = taps["1"]
    assert (feat < 0).any()
    assert torch.equal(F.relu(feat), out)


def test_tap_modified_in_place_after_capture_raises():
    net = _toy()
    taps = FeatureTaps(net, ["1"])
    net(torch.randn(2, 3, 8, 8))
    taps["1"].relu_()  # someone overwrites the captured tensor
    with pytest.raises(RuntimeError, match="modified in place"):
        taps["1"]


def test_inplace_relu_switched_back_on_is_caught():
    net = _toy()
    taps = FeatureTaps(net, ["1"])
    net[2].inplace = True  # re-enabled behind the guard's back
    net(torch.randn(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match="modified in place"):
        taps["1"]


def test_tapped_model_runs_under_inference_mode():
    net = _toy().eval()
    taps = FeatureTaps(net, ["1"])
    with torch.inference_mode():
        out = net(torch.randn(2, 3, 8, 8))
    assert torch.equal(F.relu(taps["1"]), out)


def test_tap_before_forward_is_a_key_error():
    taps = FeatureTaps(_toy(), ["1"])
    with pytest.raises(KeyError, match="run a forward pass"):
        taps["1"]


def test_remove_detaches_hooks():
    net = _toy()
    taps = FeatureTaps(net, ["1"])
    assert len(net[1]._forward_hooks) == 1
    taps.remove()
    assert len(net[1]._forward_hooks) == 0
    net(torch.randn(1, 3, 8, 8))
    with pytest.raises(KeyError):
        taps["1"]


def test_unknown_tap_path_lists_close_matches(models):
    with pytest.raises(ValueError, match="close matches") as err:
        FeatureTaps(models["resnet18"], ["decoder.aspp.0.projct.1"])
    assert "decoder.aspp.0.project.1" in str(err.value)
    with pytest.raises(ValueError, match="not found"):
        resolve_module(models["resnet18"], "no.such.module")
    assert resolve_module(models["resnet18"], PI_TAP) is models["resnet18"].decoder.block2[1]


def test_unknown_encoder_names_valid_ones_and_close_match():
    with pytest.raises(ValueError) as err:
        build_model("resnet181", classes=21)
    msg = str(err.value)
    assert "Did you mean" in msg and "resnet18" in msg
    assert "Valid smp encoders" in msg and "mobilenet_v2" in msg and "resnet101" in msg


@pytest.mark.parametrize("kwargs", [{"classes": 0}, {"classes": 21, "output_stride": 32}])
def test_build_model_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        build_model("resnet18", **kwargs)


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("encoder", ENCODERS)
def test_param_counts_match_readme(models, encoder):
    n = count_params(models[encoder])
    assert abs(n - PARAMS[encoder]) / PARAMS[encoder] < 0.01, f"{encoder}: {n / 1e6:.2f}M"


def test_count_params_counts_frozen_params_too():
    net = _toy()
    before = count_params(net)
    net.requires_grad_(False)
    assert count_params(net) == before == 3 * 4 * 9 + 4 + 4 + 4


# ---------------------------------------------------------------------------- optimiser


def test_param_groups_encoder_1x_rest_10x(models):
    model = models["resnet18"]
    groups = param_groups(model, lr=0.01, head_lr_mult=10)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    names = {id(p): n for n, p in model.named_parameters()}
    enc = {id(p) for p in groups[0]["params"]}
    rest = {id(p) for p in groups[1]["params"]}
    assert enc and rest and not enc & rest
    assert enc | rest == set(names)
    assert all(names[i].startswith("encoder.") for i in enc)
    assert not any(names[i].startswith("encoder.") for i in rest)
    assert any(names[i].startswith("decoder.") for i in rest)
    assert any(names[i].startswith("segmentation_head.") for i in rest)
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # no duplicate-parameter error


def test_poly_lr_hand_computed():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 1.0}], lr=0.1)
    sched = PolyLR(opt, max_iters=10)
    expected = {0: 1.0, 5: 0.5**0.9, 10: 0.0}  # (1 - k/10) ** 0.9
    assert math.isclose(0.5**0.9, 0.5358867312681466)
    seen = {}
    for k in range(11):
        seen[k] = [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    for k, factor in expected.items():
        assert seen[k] == pytest.approx([0.1 * factor, 1.0 * factor], abs=1e-12)


def test_amp_policy():
    cpu = torch.device("cpu")
    assert amp_policy("auto", cpu) == (None, False)
    assert amp_policy("off", cpu) == (None, False)
    assert amp_policy("bf16", cpu) == (torch.bfloat16, False)
    assert amp_policy("fp16", cpu) == (torch.float16, True)
    with pytest.raises(ValueError, match="trainer.amp"):
        amp_policy("fp8", cpu)


# ---------------------------------------------------------------------------- checkpoints

MODEL_CFG = {"encoder_name": "resnet18", "classes": 21, "encoder_weights": None, "output_stride": 16}


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
    model = models["resnet18"]
    path = tmp_path_factory.mktemp("ckpt") / "run" / "best.pt"
    save_checkpoint(path, state_dict=model.state_dict(), model=dict(MODEL_CFG), metrics={"miou": 0.5}, epoch=3)
    return path


def test_checkpoint_round_trip(models, saved):
    model = models["resnet18"]
    assert [p.name for p in saved.parent.iterdir()] == ["best.pt"]  # no temporary left behind
    loaded, ckpt = load_model(saved, expect={"classes": 21, "encoder_name": "resnet18"})
    assert ckpt["metrics"] == {"miou": 0.5} and ckpt["epoch"] == 3
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    model.eval(), loaded.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_checkpoint_class_mismatch_is_one_line(saved):
    with pytest.raises(ValueError, match="classes") as err:
        load_model(saved, expect={"classes": 19})
    assert "\n" not in str(err.value)
    assert "19" in str(err.value) and "21" in str(err.value)


def test_truncated_checkpoint(saved, tmp_path):
    data = saved.read_bytes()
    bad = tmp_path / "half.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"not a readable kdseg checkpoint: the file is truncated \(\d+ bytes") as err:
        load_checkpoint(bad)
    assert "\n" not in str(err.value)
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty"):
        load_checkpoint(bad)
    bad.write_text("epoch,miou\n1,0.5\n")
    with pytest.raises(CheckpointError, match="it is not a PyTorch checkpoint file"):
        load_checkpoint(bad)


class Harmless:
    """A custom object; weights_only loading must refuse to rebuild it."""

    def __init__(self) -> None:
        self.value = 1


CALLED = []


def _mark_called(*args):
    CALLED.append(args)
    return 0


class Payload:
    """A __reduce__ payload that only records a call (stands in for os.system)."""

    def __reduce__(self):
        return (_mark_called, ("would run",))


def test_checkpoint_with_custom_object_is_refused(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"state_dict": {}, "model": dict(MODEL_CFG), "extra": Harmless()}, path)
    with pytest.raises(CheckpointError, match=r"holds Python objects or code \(.*Harmless\) that safe loading"):
        load_checkpoint(path)


def test_checkpoint_with_reduce_payload_is_refused_without_running_it(tmp_path):
    path = tmp_path / "payload.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "model": dict(MODEL_CFG), "x": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="holds Python objects or code .*_mark_called"):
        load_checkpoint(path)
    assert CALLED == []
    torch.save({"state_dict": {}, "model": dict(MODEL_CFG), "x": Payload()}, tmp_path / "payload2.pt")
    assert CALLED == []  # saving does not call it either
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(tmp_path / "payload2.pt")
    assert CALLED == []


@pytest.mark.parametrize("content", [[1, 2, 3], {"model": MODEL_CFG}, {"state_dict": {}}])
def test_not_a_kdseg_checkpoint(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not a kdseg checkpoint"):
        load_checkpoint(path)


def test_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, keep_previous=True, state_dict={}, model={}, epoch=1)
    assert not previous_path(path).exists()
    save_checkpoint(path, keep_previous=True, state_dict={}, model={}, epoch=2)
    assert load_checkpoint(path)["epoch"] == 2 and load_checkpoint(previous_path(path))["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


def test_same_as_links_and_the_names_stay_independent(tmp_path, monkeypatch):
    best = save_checkpoint(tmp_path / "best.pt", state_dict={"w": torch.ones(2)}, model={}, epoch=1)
    save_checkpoint(tmp_path / "last.pt", keep_previous=True, state_dict={}, model={}, epoch=0)
    last = save_checkpoint(tmp_path / "last.pt", keep_previous=True, same_as=best)
    assert last.samefile(best) and load_checkpoint(previous_path(last))["epoch"] == 0  # linked, not written again
    # replacing last.pt later (a new epoch) renames: best.pt keeps epoch 1
    save_checkpoint(last, keep_previous=True, state_dict={}, model={}, epoch=2)
    assert load_checkpoint(best)["epoch"] == 1 and load_checkpoint(last)["epoch"] == 2
    assert load_checkpoint(previous_path(last))["epoch"] == 1
    # where the file system refuses hard links: a copy with the same bytes
    def no_links(*args):
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(os, "link", no_links)
    copy = save_checkpoint(tmp_path / "copy.pt", same_as=best)
    assert not copy.samefile(best) and copy.read_bytes() == best.read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_written_checkpoint_leaves_the_page_cache_unless_it_is_kept(tmp_path, monkeypatch):
    """Training states are dropped from the page cache once fsynced (each new one would grow it);
    a student written to be uploaded at once stays cached; a link writes no pages."""
    dropped = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: dropped.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice)))
    best = save_checkpoint(tmp_path / "best.pt", state_dict={"w": torch.ones(2)}, model={}, epoch=1)
    assert [(Path(name).name.startswith(".best.pt.tmp"), offset, length, advice) for name, offset, length, advice in dropped] == [
        (True, 0, 0, os.POSIX_FADV_DONTNEED)]
    save_checkpoint(tmp_path / "last.pt", keep_previous=True, same_as=best)
    save_student(tmp_path / "best_student.pt", load_checkpoint(best) | {"model": dict(MODEL_CFG)})
    save_checkpoint(tmp_path / "kept.pt", keep_cached=True, state_dict={}, model={})
    assert len(dropped) == 1
    assert torch.equal(load_checkpoint(best)["state_dict"]["w"], torch.ones(2))


def test_save_student_keeps_weights_and_model_only(models, saved, tmp_path):
    ckpt = load_checkpoint(saved) | {"optimizer": {"state": {}}, "terms": {"x": torch.ones(3)}, "model": dict(MODEL_CFG, extra=1)}
    path = save_student(tmp_path / "best_student.pt", ckpt)
    got = torch.load(path, weights_only=True)
    assert set(got) == {"state_dict", "model"} and "extra" not in got["model"]
    loaded, _ = load_model(path)
    ref = models["resnet18"].state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())


def test_checkpoint_state_dict_mismatch(models, tmp_path):
    path = save_checkpoint(
        tmp_path / "wrong.pt", state_dict=models["mobilenet_v2"].state_dict(), model=dict(MODEL_CFG)
    )
    with pytest.raises(ValueError, match="does not match"):
        load_model(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.pt")


def test_checkpoint_does_not_share_memory_with_model(models, tmp_path):
    model = copy.deepcopy(models["mobilenet_v2"])
    cfg = dict(MODEL_CFG, encoder_name="mobilenet_v2")
    path = save_checkpoint(tmp_path / "m.pt", state_dict=model.state_dict(), model=cfg)
    loaded, _ = load_model(path)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(model.parameters()), next(loaded.parameters()))


def test_zero_init_residual_starts_every_block_as_identity():
    from torchvision.models.resnet import BasicBlock

    model = build_model("resnet18", classes=21, zero_init_residual=True)
    blocks = [m for m in model.encoder.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    block = blocks[1]  # no downsample: output = relu(x + 0)
    block.eval()
    x = torch.randn(1, 64, 8, 8)
    assert torch.equal(block(x), torch.relu(x))
    plain = build_model("resnet18", classes=21)
    assert all(torch.all(m.bn2.weight == 1) for m in plain.encoder.modules() if isinstance(m, BasicBlock))
    assert zero_init_residual_(build_model("resnet101", classes=21).encoder) == 33


def test_a_folder_given_as_checkpoint_says_it_is_a_folder_and_names_the_checkpoints_in_it(tmp_path):
    save_checkpoint(tmp_path / "last.pt", state_dict={}, model={})
    save_checkpoint(tmp_path / "best.pt", state_dict={}, model={})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert str(err.value) == (f"checkpoint '{tmp_path}' is a folder, not a file (expected a checkpoint file, "
                              f"e.g. '{tmp_path}/best.pt' of best.pt, last.pt there)")
    assert not isinstance(err.value, FileNotFoundError)


FULL_DISK = """
import resource, signal, sys, torch
from kdseg.checkpoint import save_checkpoint
from kdseg.errors import reported
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
path = sys.argv[1]
save_checkpoint(path, state_dict={"w": torch.ones(10)}, model={})
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
with reported():
    save_checkpoint(path, keep_previous=True, state_dict={"w": torch.zeros(100_000)}, model={})
"""


def test_a_full_disk_while_saving_is_one_line_and_leaves_the_previous_checkpoint(tmp_path):
    """A 100 kB file-size limit (RLIMIT_FSIZE) makes the second, 400 kB checkpoint's write fail."""
    path = tmp_path / "last.pt"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith(f"error: cannot write checkpoint '{path}': File too large (") and proc.stderr.count("\n") == 1
    assert "free there, about 97.7 KiB needed); the previous" in proc.stderr and "run the same command again" in proc.stderr
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(10))  # intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file, nothing moved to last.prev.pt
