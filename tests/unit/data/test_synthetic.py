"""The built-in dataset: VOC 2012 layout, determinism, class design and the generate-once cache."""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import pathlib

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import VOCSegmentation

from kdseg.data import synthetic
from kdseg.data.classes import IGNORE_INDEX, VOC_CLASSES, voc_palette

OBJECT_CLASSES = set(range(1, len(VOC_CLASSES)))


def _read_ids(root: pathlib.Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().splitlines()


def _masks(root: pathlib.Path, split: str = "trainval") -> list[np.ndarray]:
    return [np.array(Image.open(root / "SegmentationClass" / f"{i}.png")) for i in _read_ids(root, split)]


def _file_bytes(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """60 images at 64 px, inside the VOCdevkit/VOC2012 folder torchvision expects."""
    base = tmp_path_factory.mktemp("voc")
    synthetic.generate(base / "VOCdevkit" / "VOC2012", num_train=48, num_val=12, size=64, seed=0)
    return base


def test_torchvision_voc_reader_opens_the_set(voc_root: pathlib.Path) -> None:
    for split, count in (("train", 48), ("val", 12), ("trainval", 60)):
        dataset = VOCSegmentation(root=voc_root, year="2012", image_set=split, download=False)
        assert len(dataset) == count
    image, mask = dataset[0]
    assert image.mode == "RGB" and image.size == (64, 64)
    assert mask.mode == "P" and mask.getpalette() == voc_palette()
    for mask_path in dataset.masks:
        with Image.open(mask_path) as mask:
            assert mask.mode == "P" and mask.getpalette() == voc_palette()
            values = set(np.unique(np.array(mask)).tolist())
        assert values <= set(range(len(VOC_CLASSES))) | {IGNORE_INDEX}


def test_layout_ids_and_jpegs(voc_root: pathlib.Path) -> None:
    root = voc_root / "VOCdevkit" / "VOC2012"
    train, val, trainval = (_read_ids(root, s) for s in ("train", "val", "trainval"))
    assert trainval == train + val and len(set(trainval)) == 60
    assert train[0] == "2026_000001" and val[0] == "2026_000049"
    for split in ("train", "val", "trainval"):
        assert (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_bytes().endswith(b"\n")
    for sample_id in trainval:
        path = root / "JPEGImages" / f"{sample_id}.jpg"
        assert path.read_bytes()[:3] == b"\xff\xd8\xff"
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)


def test_every_class_appears_and_objects_have_void_borders(voc_root: pathlib.Path) -> None:
    masks = _masks(voc_root / "VOCdevkit" / "VOC2012")
    seen = set().union(*(np.unique(m).tolist() for m in masks))
    assert OBJECT_CLASSES <= seen and IGNORE_INDEX in seen
    for mask in masks:
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            touching = (a != b) & (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
            assert not touching.any(), "two different labels touch without a void border between them"
        if (mask != 0).any():
            assert (mask == IGNORE_INDEX).any()


def test_colour_reveals_the_shape_family_but_not_the_texture(tmp_path: pathlib.Path) -> None:
    """Per-object mean colours: the five shape families differ by more than colours vary inside a
    class, while the four classes of one family (same shape, different textures) differ by far less.

    Classes with no colour information put the ratio near 1 / sqrt(objects per class) (~0.2 here);
    textures mix in the second colour, so they move it a little.
    """
    root = synthetic.generate(tmp_path, num_train=300, num_val=1, size=48, seed=1)
    records: dict[int, list[np.ndarray]] = {c: [] for c in OBJECT_CLASSES}
    for sample_id in _read_ids(root, "train"):
        image = np.asarray(Image.open(root / "JPEGImages" / f"{sample_id}.jpg"), dtype=np.float64)
        mask = np.array(Image.open(root / "SegmentationClass" / f"{sample_id}.png"))
        for label in set(np.unique(mask).tolist()) & OBJECT_CLASSES:
            if (mask == label).sum() >= 10:
                records[label].append(image[mask == label].mean(axis=0))
    assert min(len(r) for r in records.values()) >= 10
    class_means = np.stack([np.mean(records[c], axis=0) for c in sorted(OBJECT_CLASSES)])
    within = np.sqrt(np.mean(np.concatenate([(np.stack(r) - np.mean(r, axis=0)) ** 2 for r in records.values()]),
                             axis=0))
    n_shapes, n_textures = len(synthetic.SHAPES), len(synthetic.TEXTURES)
    assert [synthetic.CLASS_DESIGN[c][0] for c in sorted(OBJECT_CLASSES)][::n_textures] == list(synthetic.SHAPES)
    by_family = class_means.reshape(n_shapes, n_textures, 3)
    inside_family = by_family.std(axis=1) / within
    across_families = by_family.mean(axis=1).std(axis=0) / within
    assert (inside_family < 0.6).all(), f"classes of one shape differ in colour by {inside_family} x the spread"
    assert (across_families > 1.0).all(), f"shape families differ in colour by only {across_families} x the spread"


def test_same_arguments_give_identical_bytes(tmp_path: pathlib.Path) -> None:
    first = _file_bytes(synthetic.generate(tmp_path / "a", 6, 3, 48, seed=7))
    second = _file_bytes(synthetic.generate(tmp_path / "b", 6, 3, 48, seed=7))
    other = _file_bytes(synthetic.generate(tmp_path / "c", 6, 3, 48, seed=8))
    assert first == second
    assert first.keys() == other.keys()
    jpegs = [k for k in first if k.endswith(".jpg")]
    assert all(first[k] != other[k] for k in jpegs)


def test_val_images_do_not_depend_on_the_training_count(tmp_path: pathlib.Path) -> None:
    small = synthetic.generate(tmp_path / "small", 2, 2, 32, seed=3)
    large = synthetic.generate(tmp_path / "large", 3, 2, 32, seed=3)
    for folder in ("JPEGImages", "SegmentationClass"):
        ext = "jpg" if folder == "JPEGImages" else "png"
        for a, b in zip(_read_ids(small, "val"), _read_ids(large, "val")):
            assert (small / folder / f"{a}.{ext}").read_bytes() == (large / folder / f"{b}.{ext}").read_bytes()


def test_ensure_synthetic_generates_once_and_reuses(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "cache" / "synthetic"
    assert synthetic.ensure_synthetic(root, 3, 2, 32, seed=0) == root
    assert "generated" in capsys.readouterr().out
    marker = json.loads((root / synthetic.MARKER).read_text())
    assert marker == {"format_version": synthetic.FORMAT_VERSION, "num_train": 3, "num_val": 2, "size": 32, "seed": 0}
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert synthetic.ensure_synthetic(root, 3, 2, 32, seed=0) == root
    assert capsys.readouterr().out == ""
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    assert [p.name for p in root.parent.iterdir() if ".partial-" in p.name] == []


def test_ensure_synthetic_rejects_other_arguments(tmp_path: pathlib.Path) -> None:
    root = synthetic.ensure_synthetic(tmp_path / "synthetic", 2, 1, 32, seed=0)
    with pytest.raises(ValueError, match="synthetic") as error:
        synthetic.ensure_synthetic(root, 2, 1, 32, seed=1)
    assert "'seed': 0" in str(error.value) and "'seed': 1" in str(error.value)


def test_ensure_synthetic_refuses_a_foreign_folder(tmp_path: pathlib.Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete built-in dataset"):
        synthetic.ensure_synthetic(tmp_path / "data", 2, 1, 32, seed=0)
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


def test_interrupted_generation_leaves_nothing_behind(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out: pathlib.Path, *args: int) -> None:
        (pathlib.Path(out) / "JPEGImages").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate", crash)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_synthetic(tmp_path / "synthetic", 2, 1, 32, seed=0)
    assert [p.name for p in tmp_path.iterdir() if p.name != "synthetic.lock"] == []


def _ensure_and_report(root: pathlib.Path, outputs: multiprocessing.Queue) -> None:
    """Child process body: run ensure_synthetic and send back what it printed."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            synthetic.ensure_synthetic(root, 20, 5, 64, seed=0)
    finally:
        outputs.put(printed.getvalue())


def test_parallel_processes_generate_once(tmp_path: pathlib.Path) -> None:
    context = multiprocessing.get_context("fork")
    outputs = context.Queue()
    workers = [context.Process(target=_ensure_and_report, args=(tmp_path / "synthetic", outputs)) for _ in range(2)]
    for worker in workers:
        worker.start()
    printed = [outputs.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert sum("generated" in out for out in printed) == 1
    assert len(_read_ids(tmp_path / "synthetic", "train")) == 20


def test_cli_writes_the_set(tmp_path: pathlib.Path) -> None:
    synthetic.main(["--out", str(tmp_path / "set"), "--train", "3", "--val", "2", "--size", "32", "--seed", "5"])
    assert len(_read_ids(tmp_path / "set", "train")) == 3 and len(_read_ids(tmp_path / "set", "val")) == 2
    assert json.loads((tmp_path / "set" / synthetic.MARKER).read_text())["seed"] == 5
    with pytest.raises(SystemExit, match="was generated with"):
        synthetic.main(["--out", str(tmp_path / "set"), "--train", "3", "--val", "2", "--size", "32", "--seed", "6"])


@pytest.mark.parametrize(("arguments", "name"), [
    ({"num_train": 0}, "num_train"),
    ({"num_val": 0}, "num_val"),
    ({"size": 31}, "size"),
    ({"size": 64.0}, "size"),
    ({"seed": -1}, "seed"),
])
def test_invalid_arguments_are_clear_errors(tmp_path: pathlib.Path, arguments: dict, name: str) -> None:
    valid = {"num_train": 2, "num_val": 1, "size": 32, "seed": 0}
    for function in (synthetic.generate, synthetic.ensure_synthetic):
        with pytest.raises(ValueError, match=name):
            function(tmp_path / "out", **{**valid, **arguments})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flag", "value"), [("--train", "0"), ("--val", "-3"), ("--size", "16"), ("--size", "big")])
def test_cli_rejects_invalid_arguments(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture, flag: str,
                                       value: str) -> None:
    arguments = {"--out": str(tmp_path / "out"), "--train": "2", "--val": "1", "--size": "32", flag: value}
    with pytest.raises(SystemExit) as error:
        synthetic.main([part for pair in arguments.items() for part in pair])
    assert error.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
