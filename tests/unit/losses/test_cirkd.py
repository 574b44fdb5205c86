"""CIRKD (cirkd): its mini-batch and memory parts against the authors' formulas written here
(float64, random tensors, value and gradient), hand-computed cases, the queues after known
updates, void pixels, and the term's state through the probe, the Distiller and a checkpoint."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdseg.checkpoint import load_checkpoint, save_checkpoint
from kdseg.distill import Distiller
from kdseg.errors import ConfigError
from kdseg.losses import CIRKDLoss, minibatch_pair_loss
from kdseg.losses.base import step_generator
from kdseg.losses.cirkd import contrast_kd, enqueue


def _rand(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def _reference_minibatch(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """CIRKD losses/cirkd_mini_batch.py: a loop over the B x B pairs, batchmean KL per pair."""
    b = s.shape[0]
    if s.shape[2] >= 256 and s.shape[3] >= 256:
        s, t = F.avg_pool2d(s, 4, 4, ceil_mode=True), F.avg_pool2d(t, 4, 4, ceil_mode=True)
    s, t = F.normalize(s, p=2, dim=1), F.normalize(t, p=2, dim=1)
    total = 0.0
    for i in range(b):
        for j in range(b):
            sim_s = s[i].reshape(s.shape[1], -1).T @ s[j].reshape(s.shape[1], -1)
            sim_t = t[i].reshape(t.shape[1], -1).T @ t[j].reshape(t.shape[1], -1)
            total = total + F.kl_div(F.log_softmax(sim_s / tau, dim=1), F.softmax(sim_t / tau, dim=1), reduction="batchmean")
    return total / (b * b)


def _reference_contrast(s: torch.Tensor, t: torch.Tensor, bank: torch.Tensor, tau: float, kd_tau: float) -> torch.Tensor:
    """CIRKD losses/cirkd_memory.py ``contrast_sim_kd`` of the anchors' similarities to the bank."""
    s_logits, t_logits = torch.mm(s, bank.T) / tau, torch.mm(t, bank.T) / tau
    p_s = F.log_softmax(s_logits / kd_tau, dim=1)
    p_t = F.softmax(t_logits / kd_tau, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * kd_tau**2


# ------------------------------------------------------------------ mini-batch part


def test_minibatch_hand_computed():
    # one image, two pixels: the student's are orthogonal (S = I), the teacher's equal (T = all ones)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    t = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    # each row: KL((.5, .5) || softmax(1, 0)) = log((1 + e) / 2) - 1/2
    expected = math.log((1 + math.e) / 2) - 0.5
    assert minibatch_pair_loss(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_minibatch_matches_cirkd_value_and_gradient(tau):
    s, t = _rand(3, 4, 3, 5, seed=0, grad=True), _rand(3, 6, 3, 5, seed=1)  # channel counts may differ
    ours, ref = minibatch_pair_loss(s, t, tau), _reference_minibatch(s, t, tau)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(ref, s)[0], rtol=1e-7, atol=1e-12)


def test_minibatch_pools_maps_of_256_and_more():
    s, t = _rand(1, 2, 256, 258, seed=2).float(), _rand(1, 2, 256, 258, seed=3).float()  # 64 x 65 nodes (ceil mode)
    torch.testing.assert_close(minibatch_pair_loss(s, t), _reference_minibatch(s, t, 0.1), rtol=1e-4, atol=1e-6)


def test_minibatch_needs_one_batch_and_size():
    with pytest.raises(ValueError, match="one batch and size"):
        minibatch_pair_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))


# ------------------------------------------------------------------ memory part


def test_contrast_kd_matches_cirkd_and_is_zero_without_anchors():
    s = F.normalize(_rand(7, 5, seed=4, grad=True), dim=1)
    t, bank = F.normalize(_rand(7, 5, seed=5), dim=1), F.normalize(_rand(11, 5, seed=6), dim=1)
    torch.testing.assert_close(contrast_kd(s, t, bank, 0.1, 2.0), _reference_contrast(s, t, bank, 0.1, 2.0), rtol=1e-9, atol=1e-12)
    empty = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    value = contrast_kd(empty, empty.detach(), bank)
    assert value.item() == 0.0


def _queues(classes: int = 3, pixel_slots: int = 4, region_slots: int = 2, dim: int = 2):
    return (torch.zeros(classes, pixel_slots, dim), torch.zeros(classes, dtype=torch.long),
            torch.zeros(classes, region_slots, dim), torch.zeros(classes, dtype=torch.long))


def test_enqueue_known_updates():
    # one image of 1 x 4 pixels, labels (0, 0, 2, 255); keys are unit vectors
    keys = torch.tensor([[1.0, 0.0, 0.6, 0.0], [0.0, 1.0, 0.8, 1.0]]).view(1, 2, 1, 4)
    labels = torch.tensor([[0, 0, 2, 255]]).view(1, 1, 4)
    pixel_q, pixel_ptr, region_q, region_ptr = _queues()
    enqueue(pixel_q, pixel_ptr, region_q, region_ptr, keys, labels, 16, torch.Generator().manual_seed(0))
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(region_q[0, 0], torch.tensor([s, s]))  # normalize(mean((1,0), (0,1)))
    torch.testing.assert_close(region_q[2, 0], torch.tensor([0.6, 0.8]))
    assert region_q[1].abs().sum() == 0 and region_ptr.tolist() == [1, 0, 1]
    # class 0 has 2 pixels: both pushed (in a random order), the pointer moves by 2
    assert sorted(pixel_q[0, :2].tolist()) == [[0.0, 1.0], [1.0, 0.0]] and pixel_ptr.tolist() == [2, 0, 1]
    # class 2 has 1 pixel: the code takes position perm[:1] of the image's first 1 positions, i.e. position 0
    torch.testing.assert_close(pixel_q[2, 0], torch.tensor([1.0, 0.0]))
    # a second image of the same batch size: the region ring wraps, the full pixel queue writes its last slots
    enqueue(pixel_q, pixel_ptr, region_q, region_ptr, keys, labels, 16, torch.Generator().manual_seed(0))
    assert region_ptr.tolist() == [0, 0, 0]
    torch.testing.assert_close(region_q[0, 1], torch.tensor([s, s]))
    assert pixel_ptr[0] == 0  # 2 + 2 >= 4 slots: written to the last 2 slots, pointer back to 0
    assert sorted(pixel_q[0, 2:].tolist()) == [[0.0, 1.0], [1.0, 0.0]]
    assert pixel_ptr[2] == 2


def test_enqueue_pushes_at_most_pixels_per_class():
    keys = F.normalize(_rand(2, 3, 4, 4, seed=7).float(), dim=1)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[1] = 255
    pixel_q, pixel_ptr, region_q, region_ptr = _queues(pixel_slots=10, dim=3)
    enqueue(pixel_q, pixel_ptr, region_q, region_ptr, keys, labels, 5, torch.Generator().manual_seed(1))
    assert pixel_ptr.tolist() == [5, 0, 0] and region_ptr.tolist() == [1, 0, 0]  # the void image pushes nothing
    flat = keys[0].flatten(1).T
    for row in pixel_q[0, :5]:
        assert any(torch.allclose(row, k) for k in flat)


# ------------------------------------------------------------------ the term


def _term(**kwargs) -> CIRKDLoss:
    options = dict(weight=1.0, num_classes=3, pixel_memory_size=6, region_memory_size=4, pixel_contrast_size=6,
                   region_contrast_size=3, pixels_per_update=2, seed=0)
    term = CIRKDLoss(**{**options, **kwargs})
    term.setup((2, 4, 3, 3), (2, 5, 3, 3))
    return term.double()


def _reference_term(term: CIRKDLoss, s: torch.Tensor, t: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The authors' three parts on the term's own head and queues (the contrast slots it draws at its step)."""
    draws = step_generator(term.seed, int(term.step), stream=1)
    pixel_index = torch.randperm(6, generator=draws)[: 6 // 3 + 1]  # train_cirkd.py: contrast size // classes + 1
    region_index = torch.randperm(4, generator=draws)[: 3 // 3 + 1]
    emb_s = F.normalize(term.project(s), dim=1).permute(0, 2, 3, 1)
    emb_t = F.normalize(t, dim=1).permute(0, 2, 3, 1)
    valid = masks != 255
    rows_s, rows_t = emb_s[valid], emb_t[valid]
    pixel = _reference_contrast(rows_s, rows_t, term.pixel_queue[:, pixel_index].reshape(-1, 5), 0.1, 1.0)
    region = _reference_contrast(rows_s, rows_t, term.region_queue[:, region_index].reshape(-1, 5), 0.1, 1.0)
    return _reference_minibatch(s, t, 0.1) + 0.1 * pixel + 0.1 * region


def test_term_matches_the_authors_parts_value_and_gradient():
    term = _term()
    term.train()
    s, t = _rand(2, 4, 3, 3, seed=8, grad=True), _rand(2, 5, 3, 3, seed=9)
    masks = torch.tensor([[[0, 1, 2], [255, 0, 1], [2, 2, 255]], [[1, 1, 1], [0, 255, 0], [2, 1, 0]]])
    term.update_state(s.detach(), t, masks)
    ours = term(s, t, masks)
    ref = _reference_term(term, s, t, masks)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(ref, s)[0], rtol=1e-7, atol=1e-12)


def test_term_leaves_out_void_pixels_and_an_all_void_batch_gives_the_mini_batch_part_only():
    term = _term().eval()  # BN on running statistics: void pixels' features do not move the labelled ones'
    s, t = _rand(2, 4, 3, 3, seed=10, grad=True), _rand(2, 5, 3, 3, seed=11)
    masks = torch.randint(0, 3, (2, 3, 3), generator=torch.Generator().manual_seed(12))
    masks[0, 0] = 255
    memory = lambda a, m: term(a, t, m) - minibatch_pair_loss(a, t)  # noqa: E731
    changed = s.detach().clone()
    changed[0, :, 0] += 5.0  # the void row's student features: the memory parts do not see them
    torch.testing.assert_close(memory(changed, masks), memory(s.detach(), masks))
    void = torch.full_like(masks, 255)
    value = term(s, t, void)
    torch.testing.assert_close(value, minibatch_pair_loss(s, t))  # the memory parts are 0
    grads = torch.autograd.grad(value, [s, *term.project.parameters()], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert all(g is None or (g == 0).all() for g in grads[1:])  # the head gets a zero gradient


def test_update_state_pushes_the_batch_and_advances_the_step():
    term = _term()
    before = term.region_queue.clone()
    t = _rand(1, 5, 3, 3, seed=13)
    masks = torch.full((1, 3, 3), 255)
    masks[0, 1, 1] = 2
    term.update_state(None, t, masks)
    assert term.step.item() == 1 and term.region_ptr.tolist() == [0, 0, 1] and term.pixel_ptr.tolist() == [0, 0, 1]
    torch.testing.assert_close(term.region_queue[2, 0], F.normalize(t[0, :, 1, 1], dim=0))
    torch.testing.assert_close(term.region_queue[:2], before[:2])


def test_labels_are_nearest_resized_to_the_map():
    term = _term()
    t = _rand(1, 5, 3, 3, seed=14)
    masks = torch.full((1, 6, 6), 255)
    masks[0, 2:4, 2:4] = 1  # the 3x3 map's centre pixel
    term.update_state(None, t, masks)
    torch.testing.assert_close(term.region_queue[1, 0], F.normalize(t[0, :, 1, 1], dim=0))


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="num_classes"):
        CIRKDLoss(1.0, num_classes=None)
    with pytest.raises(ConfigError, match="pixel_memory_size=0"):
        CIRKDLoss(1.0, num_classes=3, pixel_memory_size=0)
    with pytest.raises(ConfigError, match="pixels_per_update=16 must be <= pixel_memory_size=8"):
        CIRKDLoss(1.0, num_classes=3, pixel_memory_size=8)
    with pytest.raises(ConfigError, match="temperature"):
        CIRKDLoss(1.0, num_classes=3, temperature=0)


def test_state_survives_a_checkpoint_round_trip_and_is_not_the_students(tmp_path):
    term = _term()
    for seed in range(3):
        masks = torch.randint(0, 3, (2, 3, 3), generator=torch.Generator().manual_seed(seed))
        term.update_state(None, _rand(2, 5, 3, 3, seed=20 + seed), masks)
    save_checkpoint(tmp_path / "c.pt", state_dict={}, model={}, terms={f"cirkd.{k}": v for k, v in term.state_dict().items()})
    fresh = _term()
    assert not torch.equal(fresh.pixel_queue, term.pixel_queue)
    saved = load_checkpoint(tmp_path / "c.pt")["terms"]
    fresh.load_state_dict({k.removeprefix("cirkd."): v for k, v in saved.items()})
    for name, buffer in term.named_buffers():
        assert torch.equal(buffer, dict(fresh.named_buffers())[name]), name
    assert {"pixel_queue", "pixel_ptr", "region_queue", "region_ptr", "step"} <= set(dict(term.named_buffers()))


class _Net(torch.nn.Module):
    """A tiny network with a tap ``feat`` (B x 4 x H/2 x W/2) and 3-class logits."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.feat = torch.nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.head = torch.nn.Conv2d(channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(self.feat(x)), size=x.shape[-2:])


def test_probe_changes_neither_state_nor_rng_and_training_steps_push():
    torch.manual_seed(0)
    student, teacher = _Net(4), _Net(5)
    rng = torch.get_rng_state()
    term = CIRKDLoss(1.0, tap="feat", num_classes=3, pixel_memory_size=6, region_memory_size=4, pixels_per_update=2, seed=3)
    model = Distiller(student, teacher, {"cirkd": term}, input_size=8)
    assert torch.equal(torch.get_rng_state(), rng)
    built = CIRKDLoss(1.0, tap="feat", num_classes=3, pixel_memory_size=6, region_memory_size=4, pixels_per_update=2, seed=3)
    built.setup((1, 4, 4, 4), (1, 5, 4, 4))
    for name, value in built.state_dict().items():  # the head's weights and BN statistics, the queues, step 0
        assert torch.equal(value, term.state_dict()[name]), name
    images, masks = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    model.eval()
    model(images, masks)
    assert term.step.item() == 0 and term.region_ptr.sum() == 0  # evaluation does not push
    model.train()
    model(images, masks)
    assert term.step.item() == 1 and term.region_ptr.sum() > 0
