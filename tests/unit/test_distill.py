"""Distiller: frozen teacher, one teacher pass per batch, loss = ce + weighted terms.

A ResNet-18 "teacher" keeps most tests fast; one test uses the real ResNet-101 teacher.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdseg.distill import Distiller, freeze
from kdseg.losses import FitNetLoss, KDLoss, PairwiseLoss, PixelwiseLoss, Term, kd_loss, pairwise_loss, pixelwise_loss
from kdseg.models import build_model

PA_TAP = "decoder.aspp.0.project.1"
PI_TAP = "decoder.block2.1"


def _model(encoder: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(encoder, classes=21)


def _batch(seed: int, b: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g)
    masks = torch.randint(0, 21, (b, size, size), generator=g)
    masks[:, :4] = 255  # a void border
    masks[torch.rand(b, size, size, generator=g) < 0.1] = 255
    return images, masks


def _terms() -> dict[str, nn.Module]:
    return {"pi": PixelwiseLoss(100), "pa": PairwiseLoss(1)}


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_frozen_and_unchanged(teacher: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = teacher.state_dict()
    assert after.keys() == before.keys()
    assert any("running_mean" in k for k in after) and any("num_batches_tracked" in k for k in after)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"teacher {key} changed"
    for name, p in teacher.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name


def _train_steps(distiller: Distiller, steps: int) -> list[dict[str, torch.Tensor]]:
    opt = torch.optim.SGD(distiller.student.parameters(), lr=0.01, momentum=0.9)
    parts = []
    for step in range(steps):
        images, masks = _batch(step)
        total, losses, logits = distiller(images, masks)
        assert logits.shape == (2, 21, 64, 64)
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        parts.append(losses)
    return parts


def test_teacher_frozen_while_student_trains():
    teacher, student = _model("resnet18", 0), _model("resnet18", 1)
    teacher.train()  # the distiller must freeze it anyway
    distiller = Distiller(student, teacher, _terms()).train()
    assert distiller.teacher is teacher
    before_t, before_s = _snapshot(teacher), _snapshot(student)
    calls = _count_calls(teacher)

    parts = _train_steps(distiller, 3)

    assert calls[0] == 3  # exactly one teacher pass per batch
    assert distiller.training and student.training and not teacher.training
    _assert_frozen_and_unchanged(teacher, before_t)
    assert all(set(p) == {"ce", "pi", "pa"} for p in parts)
    assert all(float(p["pi"]) > 0 and float(p["pa"]) > 0 for p in parts)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before_s[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("decoder.") for k in changed)
    assert all(p.grad is not None for p in student.parameters())


def test_resnet101_teacher_frozen_and_run_once():
    teacher, student = _model("resnet101", 0), _model("resnet18", 1)
    distiller = Distiller(student, teacher, _terms()).train()
    before = _snapshot(teacher)
    calls = _count_calls(teacher)
    _train_steps(distiller, 1)
    assert calls[0] == 1
    assert not teacher.training
    _assert_frozen_and_unchanged(teacher, before)


def test_eval_and_train_toggle_keeps_teacher_in_eval():
    distiller = Distiller(_model("resnet18", 1), _model("resnet18", 0), _terms())
    for mode in (True, False, True):
        distiller.train(mode)
        assert distiller.student.training is mode
        assert distiller.teacher.training is False


def test_no_terms_means_no_teacher_and_plain_cross_entropy():
    teacher, student = _model("resnet18", 0), _model("resnet18", 1)
    calls = _count_calls(teacher)
    images, masks = _batch(0)
    distiller = Distiller(student, teacher, {"pi": PixelwiseLoss(0), "pa": PairwiseLoss(0)}).eval()
    assert distiller.teacher is None and len(distiller.terms) == 0
    assert distiller.student_taps is None and not student.decoder.block2[1]._forward_hooks
    with torch.no_grad():
        total, parts, logits = distiller(images, masks)
        expected = F.cross_entropy(student(images), masks, ignore_index=255)
    assert set(parts) == {"ce"}
    assert torch.equal(total, expected)
    assert torch.equal(parts["ce"], expected)
    assert calls[0] == 0
    for terms in ({}, None):
        assert Distiller(student, teacher, terms).teacher is None
    assert teacher.training  # a teacher that is not needed is not touched (not frozen either)
    assert all(p.requires_grad for p in teacher.parameters())
    Distiller(student)  # a student alone is fine


def test_total_is_sum_of_parts_and_parts_match_independent_losses():
    teacher, student = _model("resnet18", 0), _model("resnet18", 1)
    distiller = Distiller(student, teacher, _terms()).train()
    captured: dict[tuple[str, str], torch.Tensor] = {}
    for who, net in (("s", student), ("t", teacher)):
        for path in (PA_TAP, PI_TAP):
            net.get_submodule(path).register_forward_hook(
                lambda m, i, o, key=(who, path): captured.__setitem__(key, o)
            )
    images, masks = _batch(3)
    total, parts, logits = distiller(images, masks)

    assert total.requires_grad
    assert all(not v.requires_grad for v in parts.values())
    assert torch.allclose(total.detach(), parts["ce"] + parts["pi"] + parts["pa"], rtol=1e-6, atol=0)
    assert torch.equal(parts["ce"], F.cross_entropy(logits.detach(), masks, ignore_index=255))

    s_pi, t_pi = captured[("s", PI_TAP)], captured[("t", PI_TAP)]
    s_pa, t_pa = captured[("s", PA_TAP)], captured[("t", PA_TAP)]
    assert s_pi.shape == t_pi.shape == (2, 256, 16, 16)
    assert s_pa.shape == t_pa.shape == (2, 256, 4, 4)
    assert not t_pi.requires_grad and not t_pa.requires_grad  # teacher ran under no_grad
    with torch.no_grad():
        assert torch.allclose(parts["pi"], 100 * pixelwise_loss(s_pi, t_pi), rtol=1e-6, atol=0)
        assert torch.allclose(parts["pa"], 1 * pairwise_loss(s_pa, t_pa), rtol=1e-6, atol=0)
        # and the taps really are pre-ReLU (the student's BN output has negatives)
        assert (s_pi < 0).any() and (t_pa < 0).any()


def test_only_nonzero_terms_are_active():
    teacher, student = _model("resnet18", 0), _model("resnet18", 1)
    distiller = Distiller(student, teacher, {"pi": PixelwiseLoss(0), "pa": PairwiseLoss(2)}).train()
    _, parts, _ = distiller(*_batch(0))
    assert set(parts) == {"ce", "pa"}
    assert distiller.student_taps.paths == [PA_TAP]


def test_teacher_bn_mode_train_reproduces_reference():
    teacher, student = _model("resnet18", 0), _model("resnet18", 1)
    distiller = Distiller(student, teacher, _terms(), teacher_bn_mode="train")
    distiller.train()
    assert teacher.training
    before = teacher.decoder.block2[1].running_mean.clone()
    with torch.no_grad():
        distiller(*_batch(0))
    # batch statistics: running stats drift (the reference behaviour), weights still get no grad
    assert not torch.equal(teacher.decoder.block2[1].running_mean, before)
    assert all(not p.requires_grad for p in teacher.parameters())
    distiller.eval()
    assert not teacher.training


def test_invalid_teacher_bn_mode():
    with pytest.raises(ValueError, match="bn_mode"):
        Distiller(_model("resnet18", 1), _model("resnet18", 0), _terms(), teacher_bn_mode="frozen")


def test_terms_without_teacher():
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(_model("resnet18", 1), None, _terms())


def test_freeze():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert freeze(net) is net
    assert not net.training and not net[1].training
    assert all(not p.requires_grad for p in net.parameters())
    before = copy.deepcopy(net.state_dict())
    net(torch.randn(2, 3, 4, 4))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_teacher_runs_under_inference_mode_once():
    distiller = Distiller(_model("resnet18", 1), _model("resnet18", 0), _terms()).train()
    seen = []
    distiller.teacher.decoder.block2[1].register_forward_hook(lambda m, i, o: seen.append(o.is_inference()))
    _train_steps(distiller, 1)
    assert seen == [True]


def test_teacher_grad_reproduces_reference_gradient_flow():
    teacher, student = _model("resnet18", 0), _model("resnet18", 1)
    reference = Distiller(student, teacher, _terms(), teacher_bn_mode="train", teacher_grad=True).train()
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    weights = {k: v.clone() for k, v in teacher.named_parameters()}
    running_mean = teacher.decoder.block2[1].running_mean.clone()

    _train_steps(reference, 1)  # its optimiser holds only the student's parameters

    # gradients flowed through the teacher into its weights, which no optimiser stepped
    for module in (teacher.encoder.conv1, teacher.decoder.aspp[0].project[0], teacher.decoder.block2[0][1]):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert all(torch.equal(p, weights[k]) for k, p in teacher.named_parameters())
    assert not torch.equal(teacher.decoder.block2[1].running_mean, running_mean)


def test_teacher_grad_changes_gradients_not_loss_values():
    images, masks = _batch(0)
    results = {}
    for grad in (False, True):
        distiller = Distiller(_model("resnet18", 1), _model("resnet18", 0), _terms(), teacher_grad=grad).train()
        torch.manual_seed(0)  # the same dropout masks
        total, parts, _ = distiller(images, masks)
        total.backward()
        results[grad] = (parts, distiller.student.decoder.block2[0][1].weight.grad.clone())
    for name in ("ce", "pi", "pa"):
        torch.testing.assert_close(results[True][0][name], results[False][0][name])
    torch.testing.assert_close(results[True][1], results[False][1])  # the student's own gradient is the same


# ----------------------------------------------------------------------------- the term protocol


class Recorder(Term):
    """A term that keeps what the Distiller handed it, and returns a constant loss."""

    def __init__(self, weight: float, tap: str) -> None:
        super().__init__(weight, tap)
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def loss(self, feat_s, feat_t, masks):
        self.seen.append((feat_s, feat_t, masks))
        return feat_s.sum() * 0 + 1.0


def test_terms_read_logits_or_taps_and_get_the_masks():
    teacher, student = _model("resnet18", 0), _model("resnet18", 1)
    logits_term, tap_term = Recorder(2.0, "logits"), Recorder(3.0, PI_TAP)
    distiller = Distiller(student, teacher, {"a": logits_term, "b": tap_term}, input_size=32).train()
    # the probe pass at construction handed each term the shapes it reads, at the input size
    assert logits_term.seen[0][0].shape == (1, 21, 32, 32) and tap_term.seen[0][0].shape == (1, 256, 8, 8)
    logits_term.seen.clear(), tap_term.seen.clear()
    images, masks = _batch(7)
    total, parts, logits = distiller(images, masks)
    assert parts["a"].item() == 2.0 and parts["b"].item() == 3.0
    (s, t, m), (fs, ft, fm) = logits_term.seen[0], tap_term.seen[0]
    assert s is logits and m is masks and fm is masks
    with torch.no_grad():
        torch.testing.assert_close(t, teacher.eval()(images))
    assert fs.shape == ft.shape == (2, 256, 16, 16) and ft.is_inference()


def test_kd_in_the_distiller_is_kd_of_the_two_networks_logits():
    teacher, student = _model("resnet18", 0), _model("resnet18", 1)
    distiller = Distiller(student, teacher, {"kd": KDLoss(1.0, temperature=2.0)}).eval()
    images, masks = _batch(8)
    with torch.no_grad():
        _, parts, _ = distiller(images, masks)
        expected = kd_loss(student(images), teacher(images), 2.0, valid=masks != 255)
    torch.testing.assert_close(parts["kd"], expected)


def test_term_that_cannot_run_at_the_input_size_is_a_config_error():
    from kdseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"loss\.terms\.pa cannot be computed for 16x16 inputs .*too small"):
        Distiller(_model("resnet18", 1), _model("resnet18", 0), {"pa": PairwiseLoss(1.0)}, input_size=16)


def test_fitnet_adapter_is_built_from_the_probe_and_trained_with_the_student():
    from kdseg.train import param_groups

    teacher, student = _model("resnet50", 0), _model("resnet18", 1)
    term = FitNetLoss(1.0, tap="encoder.layer4")
    distiller = Distiller(student, teacher, {"fitnet": term}).train()
    conv = term.adapter[0]
    assert (conv.in_channels, conv.out_channels) == (512, 2048)
    groups = param_groups(student, 0.01, 10.0, distiller.terms)
    assert len(groups) == 3 and groups[2]["lr"] == pytest.approx(0.1)
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in distiller.terms.parameters()}
    assert not any(n.startswith("adapter") for n, _ in student.named_parameters())
    before = conv.weight.clone()
    opt = torch.optim.SGD([p for g in groups for p in g["params"]], lr=0.1)
    total, parts, _ = distiller(*_batch(9))
    total.backward()
    opt.step()
    assert parts["fitnet"] > 0 and not torch.equal(conv.weight, before)


def test_cross_entropy_is_zero_with_zero_gradient_on_an_all_void_batch():
    student = _model("resnet18", 0)
    images, _ = _batch(0)
    loss, parts, _ = Distiller(student)(images, torch.full((2, 64, 64), 255))
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert loss.item() == 0.0 and parts["ce"].item() == 0.0
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_cross_entropy_on_a_labelled_batch_is_bit_identical_to_the_plain_formula():
    images, masks = _batch(1)
    student, plain = _model("resnet18", 2), _model("resnet18", 2)
    torch.manual_seed(3)  # the same ASPP dropout draws in both passes
    loss, parts, _ = Distiller(student)(images, masks)
    loss.backward()
    torch.manual_seed(3)
    expected = F.cross_entropy(plain(images), masks, ignore_index=255)
    expected.backward()
    assert torch.equal(loss, expected) and torch.equal(parts["ce"], expected.detach())
    for (name, p), q in zip(student.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
