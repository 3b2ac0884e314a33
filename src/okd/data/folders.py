"""Datasets stored as image files: ImageNet, Tiny-ImageNet and any class-per-folder tree.

Each loader only lists files (nothing is decoded here) and checks the layout, so a
mistake is one line naming the folder or file and what was expected. Classes are
the sorted folder names (torchvision's ImageFolder order), files sorted by name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple

from ..errors import DataError
from .datasets import DATASETS, default_root
from .splits import Dataset, FileSplit

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".webp", ".tif", ".tiff"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Tiny-ImageNet's training set, as commonly quoted (e.g. in its public training recipes)
TINYIMAGENET_MEAN, TINYIMAGENET_STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)


def class_folders(split_dir: Path) -> List[str]:
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def image_files(folder: Path) -> List[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


def require_dir(path: Path, expected: str) -> None:
    if not path.is_dir():
        raise DataError(f"'{path}' not found; expected {expected}")


def require_root(root: Path, name: str, expected: str) -> None:
    if not root.is_dir():
        raise DataError(f"{name} not found: '{root}' does not exist; expected {expected} there "
                        f"(set data.root, $OKD_DATA or --data-root)")


def list_class_tree(split_dir: Path, inner: str = "") -> Tuple[List[str], List[Tuple[str, int]]]:
    """Classes and (path relative to split_dir, label) of ``split_dir/<class>/<inner>/<image>``."""
    classes = class_folders(split_dir)
    if not classes:
        loose = image_files(split_dir)
        hint = (f" (it holds {len(loose)} images directly: sort them into one folder per class)" if loose else "")
        raise DataError(f"'{split_dir}' has no class folders{hint}; expected '{split_dir}/<class>/{inner}<image>'")
    items = []
    for label, name in enumerate(classes):
        folder = split_dir / name / inner
        if inner and not folder.is_dir():
            raise DataError(f"'{split_dir / name}' has no '{inner.rstrip('/')}' folder; expected "
                            f"'{split_dir}/<class>/{inner}<image>'")
        files = image_files(folder)
        if not files:
            raise DataError(f"class folder '{folder}' holds no images; remove it or add images")
        items += [(os.path.join(name, inner, f), label) for f in files]
    return classes, items


def check_same_classes(train: List[str], test: List[str], train_dir: Path, test_dir: Path) -> None:
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        which = (f"{len(only_train)} only in train (e.g. {only_train[0]})" if only_train else "") + \
                (", " if only_train and only_test else "") + \
                (f"{len(only_test)} only in {test_dir.name} (e.g. {only_test[0]})" if only_test else "")
        raise DataError(f"the class folders of '{train_dir}' and '{test_dir}' differ: {which}; make them match")


def class_tree_splits(train_dir: Path, test_dir: Path) -> Tuple[List[str], FileSplit, FileSplit]:
    """(classes, train, test) of two ``<class>/<image>`` trees that must have the same class folders."""
    classes, train_items = list_class_tree(train_dir)
    test_classes, test_items = list_class_tree(test_dir)
    check_same_classes(classes, test_classes, train_dir, test_dir)
    return classes, FileSplit.build(train_dir, train_items), FileSplit.build(test_dir, test_items)


@DATASETS.register("imagefolder")
def imagefolder(cfg) -> Dataset:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``root/val/<class>/*``), any image size;
    views are ``data.image_size`` (default 32) and mean/std are measured on the training images."""
    root = default_root(cfg.root)
    require_root(root, "imagefolder", "train/<class>/* and test/<class>/*")
    train_dir = root / "train"
    test_dir = root / "test" if (root / "test").is_dir() or not (root / "val").is_dir() else root / "val"
    for d in (train_dir, test_dir):
        require_dir(d, f"'{root}/train/<class>/*' and '{root}/test/<class>/*' (an ImageFolder tree)")
    classes, train, test = class_tree_splits(train_dir, test_dir)
    return Dataset("imagefolder", train, test, classes, None, None, image_size=32, augment="crop_flip")


@DATASETS.register("imagenet", train_images=1_281_167, num_classes=1000)
def imagenet(cfg) -> Dataset:
    """ILSVRC 2012 in its usual prepared layout: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``
    (the validation images sorted into class folders). Streams RandomResizedCrop 224 views by default."""
    root = default_root(cfg.root)
    require_root(root, "imagenet", "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    layout = f"'{root}/train/<wnid>/*.JPEG' and '{root}/val/<wnid>/*.JPEG' (ImageNet's prepared layout)"
    train_dir, val_dir = root / "train", root / "val"
    require_dir(train_dir, layout)
    require_dir(val_dir, layout)
    if not class_folders(val_dir) and image_files(val_dir):
        raise DataError(f"'{val_dir}' holds the validation images directly; sort them into '{val_dir}/<wnid>/' "
                        f"folders with the devkit's ground truth (the common valprep.sh does this)")
    classes, train, val = class_tree_splits(train_dir, val_dir)
    return Dataset("imagenet", train, val, classes, IMAGENET_MEAN, IMAGENET_STD, image_size=224,
                   augment="resized_crop")


@DATASETS.register("tinyimagenet", train_images=100_000, num_classes=200)
def tinyimagenet(cfg) -> Dataset:
    """Tiny-ImageNet as distributed (tiny-imagenet-200.zip): ``train/<wnid>/images/*.JPEG``, and
    ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``; 64x64, 200 classes. The unlabelled
    ``test/`` folder is not used: ``val`` is the test split, as in the papers."""
    root = default_root(cfg.root)
    require_root(root, "tinyimagenet", "the extracted tiny-imagenet-200.zip")
    if not (root / "train").is_dir() and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"  # the folder the zip extracts to
    layout = f"'{root}/train/<wnid>/images/*.JPEG' and '{root}/val/images/*.JPEG' (Tiny-ImageNet's layout)"
    train_dir, val_dir = root / "train", root / "val"
    require_dir(train_dir, layout)
    require_dir(val_dir / "images", layout)
    classes, train_items = list_class_tree(train_dir, inner="images/")
    wnids = root / "wnids.txt"
    if wnids.is_file():
        listed = sorted(line.strip() for line in wnids.read_text().splitlines() if line.strip())
        check_same_classes(classes, listed, train_dir, wnids)
    val_items = read_val_annotations(val_dir, {name: i for i, name in enumerate(classes)})
    return Dataset("tinyimagenet", FileSplit.build(train_dir, train_items), FileSplit.build(val_dir, val_items),
                   classes, TINYIMAGENET_MEAN, TINYIMAGENET_STD, image_size=64, augment="crop_flip")


def read_val_annotations(val_dir: Path, label_of: Dict[str, int]) -> List[Tuple[str, int]]:
    """(images/<file>, label) of every validation image, in file-name order, from val_annotations.txt."""
    notes = val_dir / "val_annotations.txt"
    if not notes.is_file():
        raise DataError(f"'{notes}' is missing: Tiny-ImageNet's validation labels live there; re-extract "
                        f"tiny-imagenet-200.zip")
    labels: Dict[str, int] = {}
    for number, line in enumerate(notes.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise DataError(f"'{notes}' line {number} is not '<file> <wnid> ...': {line.strip()!r}")
        name, wnid = fields[0], fields[1]
        if wnid not in label_of:
            raise DataError(f"'{notes}' line {number} labels '{name}' with class '{wnid}', which has no folder "
                            f"in '{val_dir.parent / 'train'}'")
        labels[name] = label_of[wnid]
    present = image_files(val_dir / "images")
    unlabelled = [f for f in present if f not in labels]
    if unlabelled:
        raise DataError(f"'{val_dir / 'images' / unlabelled[0]}' has no line in '{notes}' "
                        f"({len(unlabelled)} such image(s)); restore the annotations or remove the image(s)")
    missing = sorted(set(labels) - set(present))
    if missing:
        raise DataError(f"'{notes}' lists '{missing[0]}', which is not in '{val_dir / 'images'}' "
                        f"({len(missing)} missing); re-extract tiny-imagenet-200.zip")
    return [(os.path.join("images", f), labels[f]) for f in present]
