"""The VOC reader, the joint image + mask transforms, pad_collate and build_loaders.

Every check uses data whose answer is known by construction: masks written to a small
VOC-layout folder with odd image sizes, and images whose pixels encode their position or
their label, so that a transformed image says exactly which mask it must come with.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from kdseg.data import build_datasets, build_loaders, pad_collate
from kdseg.data.classes import IGNORE_INDEX, voc_palette
from kdseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transforms, val_transforms

# id -> (width, height): both odd orientations of the usual VOC sizes
TRAIN = {"2007_000032": (500, 375), "2007_000033": (375, 500), "2007_000039": (500, 375)}
VAL = {"2007_000042": (375, 500), "2007_000061": (500, 375)}
AUG_ONLY = {"2008_000002": (375, 500)}  # an SBD image: in train_aug, without a SegmentationClass mask
SPLITS = "ImageSets/Segmentation"


def _labels(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """25-px blocks of random labels 0..20, with a 2-px void (255) band along every block edge."""
    blocks = rng.integers(0, 21, (height // 25 + 1, width // 25 + 1), dtype=np.uint8)
    labels = blocks.repeat(25, axis=0).repeat(25, axis=1)[:height, :width]
    rows, cols = np.ogrid[:height, :width]
    return np.where((rows % 25 < 2) | (cols % 25 < 2), np.uint8(IGNORE_INDEX), labels)


def write_voc(root: Path, aug_format: str = "ids") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Write a VOC2012-like folder (plus SBD-style aug masks and train_aug list) into ``root``.

    Returns the label maps written to SegmentationClass (palette PNGs) and to
    SegmentationClassAug (grey PNGs), by image id; the two differ, so a test can tell
    which folder a mask came from. ``aug_format`` is the train_aug line format: "ids" or "pairs".
    """
    rng = np.random.default_rng(0)
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", SPLITS):
        (root / folder).mkdir(parents=True, exist_ok=True)
    voc_masks, aug_masks = {}, {}
    for image_id, (width, height) in {**TRAIN, **VAL, **AUG_ONLY}.items():
        image = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        Image.fromarray(image).resize((width, height)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        aug_masks[image_id] = _labels(rng, width, height)
        Image.fromarray(aug_masks[image_id]).save(root / "SegmentationClassAug" / f"{image_id}.png")
        if image_id not in AUG_ONLY:
            voc_masks[image_id] = _labels(rng, width, height)
            mask = Image.fromarray(voc_masks[image_id])
            mask.putpalette(voc_palette())
            mask.save(root / "SegmentationClass" / f"{image_id}.png")
    (root / SPLITS / "train.txt").write_text("".join(f"{i}\n" for i in TRAIN))
    (root / SPLITS / "val.txt").write_text("".join(f"{i}\n" for i in VAL))
    aug_ids = [*TRAIN, *AUG_ONLY]
    lines = aug_ids if aug_format == "ids" else [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in aug_ids]
    (root / SPLITS / "train_aug.txt").write_text("".join(f"{line}\n" for line in lines))
    return voc_masks, aug_masks


@pytest.fixture
def voc(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "VOC2012"
    voc_masks, _ = write_voc(root)
    return root, voc_masks


@pytest.fixture
def data_cfg(make_cfg):
    """``data_cfg(root, *overrides, dataset="voc")``: the dataset config at 64 px crops."""

    def make(root: Path, *overrides: str, dataset: str = "voc"):
        sizes = ("dataset.base_size=64", "dataset.crop_size=64")
        return make_cfg(f"dataset={dataset}", f"dataset.root={root}", *sizes, *overrides, smoke=False).dataset

    return make


# --- reader -----------------------------------------------------------------------------


def test_voc_reader_counts_and_exact_masks(voc, data_cfg) -> None:
    root, masks = voc
    train, val = build_datasets(data_cfg(root))
    assert (len(train), len(val)) == (len(TRAIN), len(VAL))
    for dataset, split in ((train, TRAIN), (val, VAL)):
        for index, (image_id, (width, height)) in enumerate(split.items()):
            image, mask = dataset.load(index)
            assert image.shape == (3, height, width) and image.dtype == torch.uint8
            assert mask.shape == (height, width) and mask.dtype == torch.uint8
            np.testing.assert_array_equal(mask.numpy(), masks[image_id])
    image, mask = train[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64)


@pytest.mark.parametrize("aug_format", ["ids", "pairs"])
def test_voc_aug_reads_train_aug_and_aug_masks(tmp_path: Path, data_cfg, aug_format: str) -> None:
    root = tmp_path / "VOC2012"
    _, aug_masks = write_voc(root, aug_format)
    train, val = build_datasets(data_cfg(root, dataset="voc_aug"))
    assert (len(train), len(val)) == (len(TRAIN) + len(AUG_ONLY), len(VAL))
    for index, image_id in enumerate([*TRAIN, *AUG_ONLY]):
        image, mask = train.load(index)
        assert image.shape[-2:] == mask.shape
        np.testing.assert_array_equal(mask.numpy(), aug_masks[image_id])


def test_full_eval_keeps_odd_resolution(voc, data_cfg) -> None:
    root, masks = voc
    _, val = build_datasets(data_cfg(root, "dataset.eval_mode=full"))
    for index, (image_id, (width, height)) in enumerate(VAL.items()):
        image, mask = val[index]
        assert image.shape == (3, height, width) and image.dtype == torch.float32
        assert mask.dtype == torch.int64
        np.testing.assert_array_equal(mask.numpy(), masks[image_id])


def test_center_crop_eval_gives_crop_squares(voc, data_cfg) -> None:
    root, masks = voc
    _, val = build_datasets(data_cfg(root, "dataset.eval_mode=center_crop", "dataset.crop_size=48"))
    for index, image_id in enumerate(VAL):
        image, mask = val[index]
        assert image.shape == (3, 48, 48) and mask.shape == (48, 48)
        assert set(mask.unique().tolist()) <= set(np.unique(masks[image_id]).tolist())


def test_center_crop_larger_than_base_size_is_refused() -> None:
    with pytest.raises(ValueError, match="crop_size=96 > base_size=64"):
        val_transforms("center_crop", base_size=64, crop_size=96)


# --- clear errors -----------------------------------------------------------------------


def test_missing_root_names_it(tmp_path: Path, data_cfg) -> None:
    absent = tmp_path / "no" / "VOC2012"
    with pytest.raises(FileNotFoundError, match=f"dataset.root '{re.escape(str(absent))}' does not exist"):
        build_datasets(data_cfg(absent))


def test_missing_split_file_names_it(voc, data_cfg) -> None:
    root, _ = voc
    list_file = root / SPLITS / "val.txt"
    list_file.unlink()
    with pytest.raises(FileNotFoundError, match=f"split file '{re.escape(str(list_file))}' does not exist"):
        build_datasets(data_cfg(root))


def test_image_without_mask_names_the_mask(voc, data_cfg) -> None:
    root, _ = voc
    missing = root / "SegmentationClass" / "2007_000033.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=f"mask '{re.escape(str(missing))}' does not exist"):
        build_datasets(data_cfg(root))


def test_empty_split_file_is_an_error(voc, data_cfg) -> None:
    root, _ = voc
    list_file = root / SPLITS / "train.txt"
    list_file.write_text("\n\n")
    with pytest.raises(ValueError, match=f"'{re.escape(str(list_file))}' lists no images"):
        build_datasets(data_cfg(root))


def test_malformed_list_line_names_file_and_line(voc, data_cfg) -> None:
    root, _ = voc
    list_file = root / SPLITS / "train.txt"
    list_file.write_text(list_file.read_text() + "a.jpg b.png c.png\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(list_file))}:4: expected an image id"):
        build_datasets(data_cfg(root))


def test_image_and_mask_of_different_sizes_names_both(voc, data_cfg) -> None:
    root, _ = voc
    image_path, mask_path = root / "JPEGImages" / "2007_000032.jpg", root / "SegmentationClass" / "2007_000032.png"
    Image.fromarray(np.zeros((500, 375), dtype=np.uint8)).save(mask_path)
    with pytest.raises(ValueError, match=f"image '{re.escape(str(image_path))}'.*mask '{re.escape(str(mask_path))}'"):
        build_datasets(data_cfg(root))


# --- transforms -------------------------------------------------------------------------


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: back to integer 0..255 pixel values."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).round().long()


def _pattern(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return (rows // 8 + cols // 8) % 20 + 1


def _position_sample(height: int = 151, width: int = 201) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """Image red = row, green = column, blue = 255 (so padding, 0, stands out); mask = _pattern(row, col)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([rows, cols, torch.full_like(rows, 255)]).to(torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(_pattern(rows, cols).to(torch.uint8))


@pytest.mark.parametrize("crop", [96, 256])
def test_flip_and_crop_keep_image_and_mask_aligned(crop: int) -> None:
    """At scale 1 every output pixel says where it came from: the mask must be the pattern there."""
    image, mask = _position_sample()
    height, width = image.shape[-2:]
    transform = train_transforms(base_size=height, crop_size=crop, scale_range=(1.0, 1.0), blur_prob=0.0)
    torch.manual_seed(0)
    steps = set()
    for _ in range(12):
        out_image, out_mask = transform(image, mask)
        rgb = _to_uint8(out_image)
        real = rgb[2] == 255
        assert (rgb[:, ~real] == 0).all() and (out_mask[~real] == IGNORE_INDEX).all()
        assert torch.equal(out_mask[real], _pattern(rgb[0][real], rgb[1][real]))
        # the real pixels form one window of the source, unflipped (column step +1) or mirrored (-1)
        h, w = min(crop, height), min(crop, width)
        assert int(real.sum()) == h * w
        ys, xs = torch.nonzero(real, as_tuple=True)
        window = rgb[:2, ys.min():ys.min() + h, xs.min():xs.min() + w]
        step = int(window[1, 0, 1] - window[1, 0, 0])
        assert (window[0].diff(dim=0) == 1).all() and (window[0].diff(dim=1) == 0).all()
        assert (window[1].diff(dim=1) == step).all() and (window[1].diff(dim=0) == 0).all()
        steps.add(step)
    assert steps == {1, -1}


COLOUR_A, COLOUR_B = torch.tensor([220, 40, 40]).view(3, 1, 1), torch.tensor([30, 90, 200]).view(3, 1, 1)


def _halves_sample() -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """Left half colour A and class 3, right half colour B and class 7 (75 x 101)."""
    image = torch.empty(3, 75, 101, dtype=torch.uint8)
    image[:, :, :50], image[:, :, 50:] = COLOUR_A, COLOUR_B
    mask = torch.full((75, 101), 7, dtype=torch.uint8)
    mask[:, :50] = 3
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def _assert_halves_aligned(out_image: torch.Tensor, out_mask: torch.Tensor) -> None:
    """Padding is 0 / 255; elsewhere class 3 exactly where the (resampled) colour is nearer A than B."""
    rgb = _to_uint8(out_image)
    pad = out_mask == IGNORE_INDEX
    assert (rgb[:, pad] == 0).all()
    nearer_a = (rgb - COLOUR_A).abs().sum(0) < (rgb - COLOUR_B).abs().sum(0)
    assert torch.equal(nearer_a[~pad], out_mask[~pad] == 3)


def test_flip_and_scale_keep_halves_aligned() -> None:
    """Random flips and scales (0.5..2 x), at the pixel: a shifted mask edge fails the colour check."""
    image, mask = _halves_sample()
    transform = train_transforms(base_size=64, crop_size=64, blur_prob=0.0)
    torch.manual_seed(0)
    a_on_left = set()
    for _ in range(40):
        out_image, out_mask = transform(image, mask)
        _assert_halves_aligned(out_image, out_mask)
        cols = torch.arange(64).expand(64, 64).float()
        if (out_mask == 3).any() and (out_mask == 7).any():
            a_on_left.add(bool(cols[out_mask == 3].mean() < cols[out_mask == 7].mean()))
    assert a_on_left == {True, False}


@pytest.mark.parametrize("base_size", [37, 64, 150])
def test_center_crop_eval_keeps_halves_aligned(base_size: int) -> None:
    image, mask = _halves_sample()
    out_image, out_mask = val_transforms("center_crop", base_size=base_size, crop_size=32)(image, mask)
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
    _assert_halves_aligned(out_image, out_mask)


def test_train_transforms_never_invent_labels_and_give_crop_tensors() -> None:
    """Nearest-neighbour resizing on a 1-px noise of labels: only written labels (or padding) come out."""
    values = torch.tensor([0, 5, 14, IGNORE_INDEX], dtype=torch.uint8)
    mask = tv_tensors.Mask(values[torch.randint(0, 4, (45, 67), generator=torch.Generator().manual_seed(0))])
    image = tv_tensors.Image(torch.randint(0, 256, (3, 45, 67), dtype=torch.uint8))
    transform = train_transforms(base_size=48, crop_size=32)
    torch.manual_seed(0)
    for _ in range(50):
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
        assert out_mask.shape == (32, 32) and out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= set(values.tolist())


def test_blur_changes_the_image_only() -> None:
    """Same seed with and without blur: the flip, scale and crop draws come first, so only the blur differs."""
    image = tv_tensors.Image(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8))
    _, mask = _position_sample(64, 64)
    image_changed = []
    for seed in range(5):
        outputs = []
        for blur_prob in (0.0, 1.0):
            torch.manual_seed(seed)
            outputs.append(train_transforms(base_size=64, crop_size=48, blur_prob=blur_prob)(image, mask))
        (plain_image, plain_mask), (blurred_image, blurred_mask) = outputs
        assert torch.equal(plain_mask, blurred_mask)
        image_changed.append(not torch.equal(plain_image, blurred_image))
    assert any(image_changed)  # a small sigma (from 0.1) may leave uint8 pixels unchanged


@pytest.mark.parametrize("scale_range", [(2.0, 0.5), (0.0, 1.0)])
def test_scale_range_is_validated(scale_range: tuple[float, float]) -> None:
    message = f"scale_range must satisfy 0 < min <= max, got {list(scale_range)}"
    with pytest.raises(ValueError, match=re.escape(message)):
        train_transforms(64, 64, scale_range)


# --- batching ---------------------------------------------------------------------------


def test_pad_collate_pads_to_multiple_of_16_with_void() -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = [(17, 30), (33, 5)]
    images = [tv_tensors.Image(torch.rand(3, h, w, generator=generator) + 1) for h, w in sizes]
    masks = [tv_tensors.Mask(torch.randint(0, 21, (h, w), generator=generator)) for h, w in sizes]
    batch_images, batch_masks = pad_collate(list(zip(images, masks)))
    assert batch_images.shape == (2, 3, 48, 32) and batch_masks.shape == (2, 48, 32)
    assert batch_masks.dtype == torch.int64
    for k, (h, w) in enumerate(sizes):
        assert torch.equal(batch_images[k, :, :h, :w], images[k]) and torch.equal(batch_masks[k, :h, :w], masks[k])
        padded = torch.ones(48, 32, dtype=torch.bool)
        padded[:h, :w] = False
        assert (batch_images[k][:, padded] == 0).all() and (batch_masks[k][padded] == IGNORE_INDEX).all()


def test_build_loaders_refuses_batch_larger_than_train_split(voc, data_cfg) -> None:
    train, val = build_datasets(data_cfg(voc[0]))
    with pytest.raises(ValueError, match=r"trainer.batch_size=4 is larger than the train split \(3 images\)"):
        build_loaders(train, val, batch_size=4, num_workers=0, seed=0)
    train_loader, _ = build_loaders(train, val, batch_size=3, num_workers=0, seed=0)
    images, masks = next(iter(train_loader))
    assert images.shape == (3, 3, 64, 64) and masks.shape == (3, 64, 64)
