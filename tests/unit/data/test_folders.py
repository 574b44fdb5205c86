"""Cityscapes, ADE20K and CamVid (kdseg.data.folders, labels, classes): folder listing, label maps, class names and palettes, bad files, the check CLI, config.

Each test writes a small folder in the dataset's real layout (odd image sizes, stored mask
values including the ignored ones) and checks the reader against label maps computed by hand.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdseg.config import validate
from kdseg.data import build_datasets
from kdseg.data.__main__ import main as check_main
from kdseg.data.classes import CLASS_DESIGN, VOC_CLASSES, dataset_classes, voc_palette
from kdseg.data.folders import folder_dataset
from kdseg.data.labels import ade20k_label_map, camvid_label_map, cityscapes_label_map
from kdseg.errors import ConfigError, DataError, MissingDataError
from kdseg.report import class_ious
from kdseg.viz import colorize

from ...real_layouts import CAMVID_MAP, CITYSCAPES_MAP, SPLITS, Written, write_dataset


def dataset_cfg(make_cfg, data: Written, *overrides: str):
    """The composed config for ``data`` at 64 px crops (trainer=smoke)."""
    sizes = ("dataset.base_size=64", "dataset.crop_size=64")
    return make_cfg("trainer=smoke", f"dataset={data.name}", f"dataset.root={data.root}", *sizes, *overrides, smoke=False)


# --- readers ----------------------------------------------------------------------------


def test_reader_lists_sorted_pairs_and_maps_labels_by_hand(written, make_cfg) -> None:
    train, val = build_datasets(dataset_cfg(make_cfg, written).dataset)
    for dataset, samples in ((train, written.train), (val, written.val)):
        assert dataset.samples == [(image, mask) for image, mask, _ in samples]
        for index, (_, _, expected) in enumerate(samples):
            image, mask = dataset.load(index)
            assert image.shape == (3, *expected.shape) and mask.dtype == torch.uint8
            np.testing.assert_array_equal(mask.numpy(), expected)
    image, mask = train[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64)


def test_folder_dataset_defaults_to_the_dataset_classes(written) -> None:
    split = next(iter(SPLITS[written.name]))
    dataset = folder_dataset(written.name, written.root, split)
    assert dataset.num_classes == {"cityscapes": 19, "ade20k": 150, "camvid": 11}[written.name] and len(dataset) == 3


def test_camvid_test_split_is_read_as_val(make_cfg, tmp_path: Path) -> None:
    """CIRKD scores its final CamVid models on the test split: dataset.val_split=test reads test/ and testannot/."""
    data = write_dataset("camvid", tmp_path / "CamVid")
    _, test = build_datasets(dataset_cfg(make_cfg, data, "dataset.val_split=test").dataset)
    ((image, mask, expected),) = data.splits["test"]
    assert test.samples == [(image, mask)] and image.parent.name == "test" and mask.parent.name == "testannot"
    np.testing.assert_array_equal(test.load(0)[1].numpy(), expected)


def test_cityscapes_label_map_is_the_19_train_ids() -> None:
    table = cityscapes_label_map().table
    assert table.shape == (256,) and table.dtype == np.uint8
    assert table[list(CITYSCAPES_MAP)].tolist() == list(CITYSCAPES_MAP.values())
    mapped = table[:34]
    assert sorted(mapped[mapped < 255].tolist()) == list(range(19))  # each train class from exactly one labelId
    assert table[255] == 255 and not ({int(v) for v in table[34:255]} & (set(range(19)) | {255}))


def test_ade20k_label_map_shifts_by_one() -> None:
    table = ade20k_label_map().table
    assert table[0] == 255 and table[255] == 255
    assert table[1:151].tolist() == list(range(150))
    assert not ({int(v) for v in table[151:255]} & (set(range(150)) | {255}))


def test_camvid_label_map_keeps_the_11_classes_and_ignores_void() -> None:
    table = camvid_label_map().table
    assert table[list(CAMVID_MAP)].tolist() == list(CAMVID_MAP.values())
    assert table[:11].tolist() == list(range(11)) and table[11] == 255 and table[255] == 255
    assert not ({int(v) for v in table[12:255]} & (set(range(11)) | {255}))


# --- class names and palettes -----------------------------------------------------------


def test_cityscapes_classes_and_palette() -> None:
    names, palette = dataset_classes("cityscapes")
    assert len(names) == 19 and (names[0], names[1], names[13], names[18]) == ("road", "sidewalk", "car", "bicycle")
    assert len(palette) == 768
    assert palette[0:3] == [128, 64, 128] and palette[3 * 13 : 3 * 14] == [0, 0, 142] and palette[-3:] == [0, 0, 0]


def test_ade20k_classes_and_palette() -> None:
    names, palette = dataset_classes("ade20k")
    assert len(names) == len(set(names)) == 150
    assert (names[0], names[1], names[2], names[7], names[149]) == ("wall", "building", "sky", "bed", "flag")
    colours = {tuple(palette[3 * i : 3 * i + 3]) for i in range(150)}
    assert len(palette) == 768 and len(colours) == 150 and (0, 0, 0) not in colours
    assert palette[0:3] == voc_palette()[3:6] and palette[-3:] == [0, 0, 0]


def test_camvid_classes_and_palette() -> None:
    names, palette = dataset_classes("camvid")
    assert names == ("sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian", "bicyclist")
    assert len(palette) == 768 and palette[0:3] == [128, 128, 128] and palette[3 * 4 : 3 * 5] == [60, 40, 222]
    assert palette[3 * 10 : 3 * 11] == [0, 128, 192] and palette[3 * 11 : 3 * 12] == [0, 0, 0] and palette[-3:] == [0, 0, 0]


@pytest.mark.parametrize("name", ["voc", "voc_aug"])
def test_voc_datasets_have_voc_classes(name: str) -> None:
    assert dataset_classes(name) == (VOC_CLASSES, voc_palette())


def test_the_built_in_set_names_its_classes_by_shape_and_texture() -> None:
    names, palette = dataset_classes("synthetic")
    assert palette == voc_palette() and len(names) == len(set(names)) == len(VOC_CLASSES)
    assert names[:6] == ("background", "disc-solid", "disc-stripes", "disc-checker", "disc-dots", "square-solid")
    assert names[-1] == "cross-dots" and not set(names[1:]) & set(VOC_CLASSES)
    assert all(names[label] == f"{shape}-{texture}" for label, (shape, texture) in CLASS_DESIGN.items())


def test_unknown_dataset_has_no_classes() -> None:
    with pytest.raises(ValueError, match="no class names for dataset 'kitti'; known datasets: .*cityscapes, ade20k"):
        dataset_classes("kitti")


def test_colorize_uses_the_given_palette() -> None:
    mask = np.array([[0, 13, 255]])
    assert colorize(mask, dataset_classes("cityscapes").palette).tolist() == [[[128, 64, 128], [0, 0, 142], [0, 0, 0]]]
    assert colorize(mask).tolist() == [[voc_palette()[0:3], voc_palette()[39:42], [224, 224, 192]]]


def test_report_orders_per_class_ious_by_the_dataset() -> None:
    metrics = {"val/miou": 0.5, "val/iou/car": 0.2, "val/iou/road": 0.9, "val/iou/151": 0.1, "val/iou/zebra": 0.3}
    assert list(class_ious(metrics, "cityscapes")) == ["road", "car", "151", "zebra"]
    assert class_ious(metrics, None) == {"151": 0.1, "car": 0.2, "road": 0.9, "zebra": 0.3}


# --- bad input --------------------------------------------------------------------------


def test_image_without_mask_names_the_mask(written, make_cfg) -> None:
    _, mask, _ = written.train[1]
    mask.unlink()
    with pytest.raises(MissingDataError, match=f"mask '{re.escape(str(mask))}' does not exist"):
        build_datasets(dataset_cfg(make_cfg, written).dataset)


def test_mask_without_image_names_the_image(written, make_cfg) -> None:
    image, _, _ = written.val[0]
    image.unlink()
    with pytest.raises(MissingDataError, match=f"image '{re.escape(str(image))}' does not exist"):
        build_datasets(dataset_cfg(make_cfg, written).dataset)


def test_size_mismatch_names_image_and_mask(written, make_cfg) -> None:
    image, mask, expected = written.train[0]
    Image.fromarray(np.zeros((expected.shape[0] + 1, expected.shape[1]), np.uint8)).save(mask)
    with pytest.raises(DataError, match=f"image '{re.escape(str(image))}' is {re.escape(str(expected.shape))} .*mask '{re.escape(str(mask))}'"):
        build_datasets(dataset_cfg(make_cfg, written).dataset)


def test_truncated_mask_is_named_when_read(written, make_cfg) -> None:
    _, mask, _ = written.val[1]
    data = mask.read_bytes()
    start = data.index(b"IDAT")
    mask.write_bytes(data[: start + 4 + int.from_bytes(data[start - 4 : start], "big") // 2])
    _, val = build_datasets(dataset_cfg(make_cfg, written).dataset)  # the header is fine: found when decoded
    with pytest.raises(DataError, match=f"mask '{re.escape(str(mask))}' is truncated or corrupt"):
        val.load(1)


BAD_VALUES = {"cityscapes": (34, 40), "ade20k": (151, 200), "camvid": (12, 40)}  # not a labelId / above 150 / above 11
EXPECTED = {"cityscapes": "Cityscapes labelIds 0..33", "ade20k": "ADE20K labels 0..150", "camvid": "CamVid labels 0..11"}


def _write_bad_labels(written: Written) -> Path:
    """Val mask 0 gets 4 + 2 pixels of stored values that are no label of the dataset."""
    _, mask, _ = written.val[0]
    stored = np.asarray(Image.open(mask)).copy()
    stored[:2, :2], stored[2, :2] = BAD_VALUES[written.name]
    Image.fromarray(stored).save(mask)
    return mask


def test_stored_label_that_maps_to_no_class_names_the_file_and_value(written, make_cfg) -> None:
    mask = _write_bad_labels(written)
    _, val = build_datasets(dataset_cfg(make_cfg, written).dataset)
    first, second = BAD_VALUES[written.name]
    message = f"mask '{mask}' has label(s) {first}, {second} (6 pixels); expected {EXPECTED[written.name]}"
    with pytest.raises(DataError, match=re.escape(message)):
        val.load(0)


def test_bad_samples_are_skipped(written, make_cfg) -> None:
    (_, missing_mask, _), (missing_image, _, _) = written.train[1], written.train[2]
    missing_mask.unlink()
    missing_image.unlink()
    bad_labels = _write_bad_labels(written)
    train, val = build_datasets(dataset_cfg(make_cfg, written, "dataset.on_bad_sample=skip").dataset)
    assert train.samples == [written.train[0][:2]] and val.samples == [written.val[1][:2]]
    assert [p.path for p in train.skipped] == [missing_mask, missing_image] and [p.path for p in val.skipped] == [bad_labels]


def test_missing_split_folder_names_it_and_the_layout(written, make_cfg) -> None:
    _, mask, _ = written.val[0]
    folder = mask.parent.parent if written.name == "cityscapes" else mask.parent
    shutil.rmtree(folder)
    hint = {"cityscapes": "leftImg8bit/<split>/<city>/<name>_leftImg8bit.png", "ade20k": "images/<split>/ADE_*.jpg",
            "camvid": "<split>/*.png and <split>annot/*.png"}[written.name]
    with pytest.raises(MissingDataError, match=f"split folder '{re.escape(str(folder))}' does not exist .*{re.escape(hint)}"):
        build_datasets(dataset_cfg(make_cfg, written).dataset)


def test_empty_split_folders_are_an_error(written, make_cfg) -> None:
    image, mask, _ = written.train[0]
    folders = (image.parent.parent, mask.parent.parent) if written.name == "cityscapes" else (image.parent, mask.parent)
    for folder in folders:
        shutil.rmtree(folder)
        folder.mkdir()
    with pytest.raises(MissingDataError, match=f"split folders '{re.escape(str(folders[0]))}' and '{re.escape(str(folders[1]))}' hold no"):
        build_datasets(dataset_cfg(make_cfg, written).dataset)


def test_missing_root_names_it_and_the_layout(written, make_cfg, tmp_path: Path) -> None:
    absent = tmp_path / "nowhere"
    hint = {"cityscapes": "a Cityscapes folder holding leftImg8bit/", "ade20k": "the ADEChallengeData2016 folder holding images/",
            "camvid": "a CamVid folder"}[written.name]
    with pytest.raises(MissingDataError, match=f"dataset.root '{re.escape(str(absent))}' does not exist \\(expected {hint}"):
        build_datasets(dataset_cfg(make_cfg, Written(written.name, absent, {})).dataset)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(MissingDataError, match=f"dataset.root '{re.escape(str(a_file))}' is a file, not a folder \\(expected {hint}"):
        build_datasets(dataset_cfg(make_cfg, Written(written.name, a_file, {})).dataset)


def test_check_lists_every_problem(written, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [f"dataset={written.name}", f"dataset.root={written.root}"]
    assert check_main(args) == 0
    assert "dataset OK" in capsys.readouterr().out
    bad_labels = _write_bad_labels(written)
    written.train[1][1].unlink()
    assert check_main(args) == 1
    out = capsys.readouterr().out
    assert f"val: mask '{bad_labels}' has label(s)" in out and f"train: mask '{written.train[1][1]}' does not exist" in out
    assert "train: 3 samples" in out and "val: 2 samples" in out and "2 problem(s) found" in out


# --- config -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, env, default", [("cityscapes", "CITYSCAPES_ROOT", "cityscapes"), ("ade20k", "ADE20K_ROOT", "ADEChallengeData2016"),
                                               ("camvid", "CAMVID_ROOT", "CamVid")])
def test_config_root_from_env_var_and_validates(make_cfg, session_dir: Path, monkeypatch, name: str, env: str, default: str) -> None:
    monkeypatch.delenv(env, raising=False)
    cfg = make_cfg(f"dataset={name}", smoke=False)
    validate(cfg)
    assert cfg.dataset.root == f"{session_dir}/data/{default}"
    assert cfg.student.classes == cfg.teacher.model.classes == len(dataset_classes(name).names)
    monkeypatch.setenv(env, "/data/elsewhere")
    assert make_cfg(f"dataset={name}", smoke=False).dataset.root == "/data/elsewhere"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset=ade20k", "dataset.num_classes=151"], "config dataset.num_classes=151: expected 150, the classes of dataset=ade20k"),
        (["dataset=cityscapes", "student.classes=21"], "config student.classes=21: expected dataset.num_classes=19"),
        (["dataset=cityscapes", "~dataset.val_split"], "config key dataset.val_split is missing"),
        (["dataset=camvid", "dataset.num_classes=12"], "config dataset.num_classes=12: expected 11, the classes of dataset=camvid"),
    ],
)
def test_validation_names_the_key(make_cfg, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(make_cfg(*overrides, smoke=False))


# --- runs -------------------------------------------------------------------------------


