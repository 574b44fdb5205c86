"""DKD, AICSD and BPKD on the logits, and the training progress the Trainer tells the terms.

Each term is checked against a hand-computed small case and against an independent formula
written here (float64, random tensors), value and gradient; void pixels, an all-void batch,
and AICSD's schedule at known epochs.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdseg.checkpoint import previous_path
from kdseg.errors import ConfigError
from kdseg.losses import AICSDLoss, BPKDLoss, DKDLoss, Progress, Term, bpkd_loss, dkd_loss, ics_loss, kd_loss
from kdseg.losses.aicsd import pi_kl_loss
from kdseg.losses.bpkd import edge_mask
from kdseg.losses.dkd import dkd_parts
from kdseg.train import Trainer

VOID = 255


def _rand(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def _labels(b: int, h: int, w: int, classes: int, seed: int, void: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (b, h, w), generator=g)
    labels[torch.rand(b, h, w, generator=g) < void] = VOID
    return labels


def _same_grad(ours, reference, s: torch.Tensor, *rest) -> None:
    a, b = ours(s, *rest), reference(s, *rest)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    (ga,) = torch.autograd.grad(a, s)
    (gb,) = torch.autograd.grad(b, s)
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-12)


def _all_void_is_zero_with_a_zero_gradient(loss) -> None:
    s, t = _rand(2, 4, 6, 6, seed=0, grad=True), _rand(2, 4, 6, 6, seed=1)
    value = loss(s, t, torch.full((2, 6, 6), VOID))
    (grad,) = torch.autograd.grad(value, s)
    assert value.item() == 0.0 and torch.isfinite(grad).all() and grad.abs().max() == 0


# ----------------------------------------------------------------------------- dkd


def _mdistiller_dkd(s, t, labels, alpha, beta, temperature):
    """mdistiller's dkd_loss on the labelled pixels as rows (probabilities, -1000 on the target logit)."""
    c = s.shape[1]
    keep = labels.flatten() != VOID
    s = s.permute(0, 2, 3, 1).reshape(-1, c)[keep]
    t = t.permute(0, 2, 3, 1).reshape(-1, c)[keep]
    target = labels.flatten()[keep]
    gt = torch.zeros_like(s).scatter_(1, target[:, None], 1)
    p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature**2 / s.shape[0]
    q_t = F.softmax(t / temperature - 1000.0 * gt, 1)
    log_q_s = F.log_softmax(s / temperature - 1000.0 * gt, 1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * temperature**2 / s.shape[0]
    return alpha * tckd + beta * nckd


def test_dkd_hand_computed():
    # student uniform over 3 classes, label 1; teacher softmax (1/5, 3/5, 1/5)
    s = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    t = torch.tensor([0.0, math.log(3.0), 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    labels = torch.tensor([[[1]]])
    tckd = 0.6 * math.log(0.6 / (1 / 3)) + 0.4 * math.log(0.4 / (2 / 3))  # (3/5, 2/5) vs (1/3, 2/3)
    nckd = 0.0  # both renormalised over classes 0 and 2: (1/2, 1/2)
    assert dkd_loss(s, t, labels, alpha=1.0, beta=2.0).item() == pytest.approx(tckd + 2 * nckd, rel=1e-6)
    # label 0 instead: teacher's rest (3/4, 1/4) against the student's (1/2, 1/2)
    tckd0 = 0.2 * math.log(0.2 / (1 / 3)) + 0.8 * math.log(0.8 / (2 / 3))  # (1/5, 4/5) vs (1/3, 2/3)
    nckd0 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert dkd_loss(s, t, torch.tensor([[[0]]]), alpha=0.5, beta=2.0).item() == pytest.approx(0.5 * tckd0 + 2 * nckd0, rel=1e-6)


@pytest.mark.parametrize("alpha, beta, temperature", [(1.0, 2.0, 1.0), (1.0, 8.0, 4.0), (0.5, 0.0, 2.0)])
def test_dkd_matches_mdistiller_value_and_gradient_on_labelled_pixels(alpha, beta, temperature):
    s, t = _rand(2, 5, 4, 3, seed=0, grad=True), _rand(2, 5, 4, 3, seed=1)
    labels = _labels(2, 4, 3, 5, seed=2)
    _same_grad(
        lambda a, b, m: dkd_loss(a, b, m, alpha, beta, temperature),
        lambda a, b, m: _mdistiller_dkd(a, b, m, alpha, beta, temperature),
        s, t, labels,
    )


def test_dkd_parts_recompose_kd():
    """The paper's identity: KD = TCKD + (1 - p_t[target]) * NCKD, per pixel."""
    s, t = _rand(1, 6, 5, 5, seed=3), _rand(1, 6, 5, 5, seed=4)
    labels = _labels(1, 5, 5, 6, seed=5, void=0.0)
    rows_s, rows_t = s.permute(0, 2, 3, 1).reshape(-1, 6), t.permute(0, 2, 3, 1).reshape(-1, 6)
    tckd, nckd = dkd_parts(rows_s, rows_t, labels.flatten(), 2.0)
    p_target = F.softmax(rows_t / 2.0, 1).gather(1, labels.flatten()[:, None])[:, 0]
    torch.testing.assert_close((tckd + (1 - p_target) * nckd).mean() * 4.0, kd_loss(s, t, 2.0), rtol=1e-10, atol=1e-12)


def test_dkd_void_pixels_change_nothing_and_all_void_is_zero():
    s, t = _rand(1, 4, 4, 4, seed=6), _rand(1, 4, 4, 4, seed=7)
    labels = _labels(1, 4, 4, 4, seed=8, void=0.0)
    voided = labels.clone()
    voided[0, :2] = VOID
    left = dkd_loss(s[..., 2:, :], t[..., 2:, :], labels[:, 2:])
    torch.testing.assert_close(dkd_loss(s, t, voided), left)
    _all_void_is_zero_with_a_zero_gradient(lambda a, b, m: DKDLoss(1.0)(a, b, m))


def test_dkd_warmup_ramps_in_over_epochs_and_bad_options_are_errors():
    s, t, labels = _rand(1, 4, 3, 3, seed=9), _rand(1, 4, 3, 3, seed=10), _labels(1, 3, 3, 4, seed=11, void=0.0)
    term = DKDLoss(2.0, warmup=4)
    full = 2.0 * dkd_loss(s, t, labels)
    for epoch, factor in [(1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)]:
        term.set_progress(Progress(epoch=epoch, epochs=10))
        torch.testing.assert_close(term(s, t, labels), factor * full)
    with pytest.raises(ConfigError, match=r"^warmup=-1: expected"):
        DKDLoss(1.0, warmup=-1)
    with pytest.raises(ValueError, match="needs the batch's labels"):
        DKDLoss(1.0)(s, t, None)


# ----------------------------------------------------------------------------- aicsd


def _reference_ics(logits, temperature):
    """The authors' loop (for i, for j >= i: ICS[i, j] = ICS[j, i] = kl(i, j), batchmean) on flattened H*W, row-normalised."""
    b, c = logits.shape[:2]
    flat = logits.reshape(b, c, -1) / temperature
    m = torch.zeros(c, c, dtype=logits.dtype)
    for i in range(c):
        for j in range(i, c):
            value = F.kl_div(F.log_softmax(flat[:, i], 1), F.softmax(flat[:, j], 1), reduction="batchmean")
            m = m.index_put((torch.tensor([i, j]), torch.tensor([j, i])), value.expand(2))
    return m / m.norm(dim=1, keepdim=True)


def _reference_icsd(s, t, temperature):
    return (_reference_ics(s, temperature) - _reference_ics(t, temperature)).pow(2).mean() / s.shape[0]


def _reference_pi(s, t, temperature):
    """nn.KLDivLoss()'s default 'mean': the summed KL over every logit's count B*C*H*W."""
    p_t = F.softmax(t / temperature, 1)
    return (p_t * (p_t.log() - F.log_softmax(s / temperature, 1))).sum() / s.numel()


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_ics_and_pixel_kl_match_the_authors_form(temperature):
    s, t = _rand(2, 4, 3, 5, seed=12, grad=True), _rand(2, 4, 3, 5, seed=13)
    _same_grad(lambda a, b: ics_loss(a, b, temperature), lambda a, b: _reference_icsd(a, b, temperature), s, t)
    _same_grad(lambda a, b: pi_kl_loss(a, b, temperature), lambda a, b: _reference_pi(a, b, temperature), s, t)


def test_ics_hand_computed():
    # 2 classes over 2 positions, one image: p_0 = (1/2, 1/2), p_1 = (3/4, 1/4); ICS[0, 1] = ICS[1, 0] = KL(p_1 || p_0) > 0,
    # the diagonal 0, so the normalised rows are (0, 1) and (1, 0); a uniform teacher's matrix is all 0 (rows stay 0)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]).view(1, 2, 1, 2)
    assert ics_loss(logits, logits).item() == 0.0
    assert ics_loss(logits, torch.zeros_like(logits)).item() == pytest.approx(0.5, rel=1e-6)  # mean(0, 1, 1, 0) / B


def test_aicsd_schedule_at_known_epochs():
    """a = (epoch - 1) / epochs: loss = a * ICSD + (1 - a) * PI + (a - 1) * CE, so CE + loss = a * CE + ..."""
    s, t = _rand(2, 4, 3, 3, seed=14), _rand(2, 4, 3, 3, seed=15)
    labels = _labels(2, 3, 3, 4, seed=16)
    ics, pi = 9500 * _reference_icsd(s, t, 1.0), 10 * _reference_pi(s, t, 1.0)
    ce = F.cross_entropy(s, labels, ignore_index=VOID)
    term = AICSDLoss(1.0)
    for epoch, a in [(1, 0.0), (2, 0.25), (3, 0.5), (4, 0.75)]:
        term.set_progress(Progress(epoch=epoch, epochs=4, iteration=10 * (epoch - 1), max_iters=40))
        total = ce + term(s, t, labels)
        torch.testing.assert_close(total, a * (ce + ics) + (1 - a) * pi, rtol=1e-10, atol=1e-12)
    # the term's weight scales the distillation parts, never the schedule's cross-entropy
    heavy = AICSDLoss(3.0)
    heavy.set_progress(Progress(epoch=2, epochs=4))
    torch.testing.assert_close(ce + heavy(s, t, labels), 0.25 * ce + 3.0 * (0.25 * ics + 0.75 * pi), rtol=1e-10, atol=1e-12)
    plain = AICSDLoss(2.0, alw=False)
    plain.set_progress(Progress(epoch=3, epochs=4))
    torch.testing.assert_close(plain(s, t, labels), 2.0 * (ics + pi), rtol=1e-10, atol=1e-12)


def test_aicsd_all_void_batch_keeps_the_label_free_parts_and_a_finite_gradient():
    s, t = _rand(1, 3, 4, 4, seed=17, grad=True), _rand(1, 3, 4, 4, seed=18)
    term = AICSDLoss(1.0)
    term.set_progress(Progress(epoch=2, epochs=4))
    value = term(s, t, torch.full((1, 4, 4), VOID))
    expected = 0.25 * 9500 * _reference_icsd(s, t, 1.0) + 0.75 * 10 * _reference_pi(s, t, 1.0)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(value, s)
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------- bpkd


def test_edge_mask_marks_pixels_near_a_label_change():
    labels = torch.zeros(1, 1, 8, dtype=torch.long)
    labels[0, 0, 4:] = 1
    assert edge_mask(labels, 3)[0, 0].tolist() == [False] * 3 + [True] * 2 + [False] * 3
    assert edge_mask(labels, 5)[0, 0].tolist() == [False] * 2 + [True] * 4 + [False] * 2
    labels[0, 0, 0] = VOID  # void is a label: its neighbour becomes an edge pixel
    assert edge_mask(labels, 3)[0, 0, :2].tolist() == [True, True]


def _reference_bpkd(s, t, labels, kernel, ew, bw, te, tb):
    """Loops over pixels and channels: edge = another label within the window; KL per edge pixel; CWD over body pixels."""
    b, c, h, w = s.shape
    r = kernel // 2
    edge_terms, body_total, images = [], 0.0, 0
    for n in range(b):
        edge = torch.zeros(h, w, dtype=torch.bool)
        for y in range(h):
            for x in range(w):
                window = labels[n, max(0, y - r): y + r + 1, max(0, x - r): x + r + 1]
                edge[y, x] = bool((window != labels[n, y, x]).any())
        valid = labels[n] != VOID
        for y, x in (edge & valid).nonzero().tolist():
            p_t = F.softmax(t[n, :, y, x] / te, 0)
            edge_terms.append((p_t * (p_t.log() - F.log_softmax(s[n, :, y, x] / te, 0))).sum())
        body = ~edge & valid
        if body.any():
            images += 1
            for k in range(c):
                q_t = F.softmax(t[n, k][body] / tb, 0)
                body_total = body_total + (q_t * (q_t.log() - F.log_softmax(s[n, k][body] / tb, 0))).sum()
    edge_loss = torch.stack(edge_terms).mean() * te**2
    body_loss = body_total / (images * c) * tb**2
    return ew * edge_loss + bw * body_loss


@pytest.mark.parametrize("kernel", [3, 5])
def test_bpkd_matches_a_pixel_loop_value_and_gradient(kernel):
    s, t = _rand(2, 3, 6, 7, seed=19, grad=True), _rand(2, 3, 6, 7, seed=20)
    labels = torch.zeros(2, 6, 7, dtype=torch.long)
    labels[:, 3:, :] = 1
    labels[0, :, 5:] = 2
    labels[1, 0, :2] = VOID
    _same_grad(
        lambda a, b, m: bpkd_loss(a, b, m, 1.5, 3.0, 2.0, 4.0, kernel),
        lambda a, b, m: _reference_bpkd(a, b, m, kernel, 1.5, 3.0, 2.0, 4.0),
        s, t, labels,
    )


def test_bpkd_hand_computed_edge_only():
    # two pixels, labels 0 | 1: both are edge pixels, no body; each pixel's KL is KL((.75, .25) || (.5, .5))
    s = torch.zeros(1, 2, 1, 2)
    t = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert bpkd_loss(s, t, torch.tensor([[[0, 1]]]), kernel=3).item() == pytest.approx(kl, rel=1e-6)


def test_bpkd_void_pixels_and_all_void_batch():
    s, t = _rand(1, 3, 5, 5, seed=21), _rand(1, 3, 5, 5, seed=22)
    labels = torch.zeros(1, 5, 5, dtype=torch.long)  # one class: no edge, all body
    voided = labels.clone()
    voided[0, 2, 2] = VOID  # every pixel's 5x5 window now holds another label: all edge, body empty
    p_t, log_p_s = F.softmax(t, 1), F.log_softmax(s, 1)
    per_pixel = (p_t * (p_t.log() - log_p_s)).sum(1)[0]
    keep = voided[0] != VOID
    torch.testing.assert_close(bpkd_loss(s, t, voided, kernel=5), per_pixel[keep].mean(), rtol=1e-10, atol=1e-12)
    _all_void_is_zero_with_a_zero_gradient(lambda a, b, m: BPKDLoss(1.0)(a, b, m))


@pytest.mark.parametrize("kernel", [2, 1, True, 3.0])
def test_bpkd_bad_kernel_is_a_config_error(kernel):
    with pytest.raises(ConfigError, match=r"^kernel=.*expected an odd integer >= 3"):
        BPKDLoss(1.0, kernel=kernel)


# ----------------------------------------------------------------------------- progress


class Recorder(Term):
    """A term that keeps every progress it is told (its loss is 0)."""

    def __init__(self) -> None:
        super().__init__(1.0, "logits")
        self.seen: list[Progress] = []

    def set_progress(self, progress: Progress) -> None:
        super().set_progress(progress)
        self.seen.append(progress)


class ToyDistiller(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Conv2d(3, 21, 1)
        self.terms = nn.ModuleDict({"rec": Recorder()})

    def forward(self, images, masks):
        logits = self.student(images)
        ce = F.cross_entropy(logits, masks)
        return ce, {"ce": ce.detach()}, logits


def _trainer(make_cfg, tmp_path, epochs: int) -> Trainer:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(6, 3, 4, 4, generator=generator), torch.randint(0, 21, (6, 4, 4), generator=generator))
    train = DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    cfg = make_cfg("trainer.max_iters=null", "trainer.channels_last=false", "trainer.amp=off").trainer
    config = {"encoder_name": "toy", "classes": 21, "output_stride": 16}
    return Trainer(ToyDistiller(), train, DataLoader(data, batch_size=2), cfg=cfg, epochs=epochs, num_classes=21,
                   out_dir=tmp_path, model_config=config, device=torch.device("cpu"))


def test_trainer_tells_each_step_its_progress_and_a_resume_continues_it(make_cfg, tmp_path):
    whole = _trainer(make_cfg, tmp_path, epochs=2)
    whole.fit()
    seen = whole.model.terms["rec"].seen
    assert seen == [Progress(epoch, 2, it, 6) for epoch, its in [(1, range(3)), (2, range(3, 6))] for it in its]
    # resumed from the checkpoint of epoch 1 (kept as the previous last.pt), epoch 2 sees the same progress
    resumed = _trainer(make_cfg, tmp_path / "resumed", epochs=2)
    resumed.restore(torch.load(previous_path(tmp_path / "last.pt"), weights_only=False))
    resumed.fit()
    assert resumed.model.terms["rec"].seen == seen[3:]
