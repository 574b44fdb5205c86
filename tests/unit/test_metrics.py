"""Confusion matrix, IoU and pixel accuracy against hand-computed values."""
import math

import pytest
import torch

from kdseg.metrics import ConfusionMatrix

# 2 x 3 example, 3 classes, one ignored pixel (255).
_TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
_PRED = torch.tensor([[[0, 1, 1], [1, 2, 0]]])


def test_hand_computed_matrix_and_scores():
    cm = ConfusionMatrix(num_classes=3)
    cm.update(_PRED, _TARGET)
    # Counted pixels (gt -> pred): 0->0, 0->1, 1->1, 1->1, 2->2; the 255 pixel is skipped.
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    assert torch.equal(cm.mat, expected)
    assert cm.mat.dtype == torch.int64
    scores = cm.compute()
    # IoU: class 0: 1 / (1 + 0 + 1) = 1/2; class 1: 2 / (2 + 1 + 0) = 2/3; class 2: 1/1.
    assert scores["iou"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert scores["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert scores["pixel_acc"] == pytest.approx(4 / 5)


def test_absent_class_is_nan_and_left_out_of_mean():
    cm = ConfusionMatrix(num_classes=4)
    cm.update(_PRED, _TARGET)
    scores = cm.compute()
    assert math.isnan(scores["iou"][3])
    assert scores["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_class_only_predicted_counts_as_zero_iou():
    cm = ConfusionMatrix(num_classes=2)
    cm.update(torch.tensor([[1, 1]]), torch.tensor([[0, 0]]))
    scores = cm.compute()
    assert scores["iou"] == [0.0, 0.0]
    assert scores["miou"] == 0.0
    assert scores["pixel_acc"] == 0.0


def test_empty_matrix_gives_nan():
    scores = ConfusionMatrix(num_classes=3).compute()
    assert math.isnan(scores["miou"]) and math.isnan(scores["pixel_acc"])


def test_two_updates_equal_one_concatenated_update():
    torch.manual_seed(0)
    pred = torch.randint(0, 5, (4, 7, 9))
    target = torch.randint(0, 5, (4, 7, 9))
    target[target == 4] = 255
    split, whole = ConfusionMatrix(5), ConfusionMatrix(5)
    split.update(pred[:2], target[:2])
    split.update(pred[2:], target[2:])
    whole.update(pred, target)
    assert torch.equal(split.mat, whole.mat)
    assert int(whole.mat.sum()) == int((target != 255).sum())


def test_reset():
    cm = ConfusionMatrix(3)
    cm.update(_PRED, _TARGET)
    cm.reset()
    assert int(cm.mat.sum()) == 0


def test_uint8_target_is_accepted():
    cm = ConfusionMatrix(num_classes=3)
    cm.update(_PRED, _TARGET.to(torch.uint8))
    assert int(cm.mat.sum()) == 5


def test_shape_mismatch_names_shapes():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\(1, 2, 3\).*\(1, 3, 2\)"):
        cm.update(_PRED, _TARGET.reshape(1, 3, 2))


def test_out_of_range_target_raises_with_values():
    cm = ConfusionMatrix(3)
    target = _TARGET.clone()
    target[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"target values \[7\]"):
        cm.update(_PRED, target)


def test_out_of_range_prediction_raises():
    cm = ConfusionMatrix(3)
    pred = _PRED.clone()
    pred[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"prediction values \[-1\]"):
        cm.update(pred, _TARGET)


def test_non_strict_drops_out_of_range_labels():
    cm = ConfusionMatrix(3, strict=False)
    target = _TARGET.clone()
    target[0, 0, 0] = 7
    cm.update(_PRED, target)
    assert int(cm.mat.sum()) == 4


def test_float_labels_rejected():
    with pytest.raises(ValueError, match="integer"):
        ConfusionMatrix(3).update(_PRED.float(), _TARGET)
