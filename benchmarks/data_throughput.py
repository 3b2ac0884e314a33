"""Decode + augment throughput of okd's streaming path against torchvision's standard ImageFolder pipeline.

    python benchmarks/data_throughput.py                      # 256 generated 500x375 JPEGs, m = 3 views
    python benchmarks/data_throughput.py --tree /data/imagenet/train --images 2000 --workers 4

Both sides decode every image once and make ``--views`` training views of it (as PCL and KDCL
need), 224 px, in DataLoader workers, and hand batches of ``--batch-size`` images to the main process:

* **reference**: ``torchvision.datasets.ImageFolder`` with PIL decoding and the standard transforms,
  RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize, applied ``--views`` times to
  the decoded image; float32 batches, the default collate (what the ImageNet examples do).
* **okd**: ``okd.data.file_stream`` (the path an ``imagenet`` run uses): ``torchvision.io`` decoding,
  RandomResizedCrop + flip on the uint8 tensor per view from a per-image generator; uint8 batches,
  normalised later on the training device (as in training, where that costs the CPU nothing).

Per core: each side runs ``--workers`` decode processes with one thread each, and its img/s is
divided by the number of workers. The tree is generated smooth (gradients, stripes, mild noise) at
ImageNet's typical size, 500x375, quality 90 (~100 kB, about an average ImageNet JPEG), unless ``--tree`` names a folder of class
folders. Protocol: both warmed up, then ``--rounds`` alternating rounds of one pass over the images;
median, min, max; the last line is ``ratio_vs_reference=<median ratio>``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from okd.config import DataConfig  # noqa: E402
from okd.data import load_dataset  # noqa: E402
from okd.data.file_stream import EpochJobs, TrainViews, loader  # noqa: E402
from okd.data.folders import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from okd.data.sampling import Sampling  # noqa: E402
from okd.distributed import DistInfo  # noqa: E402
from okd.hardware import cpu_name  # noqa: E402


def generate_tree(root: Path, images: int, classes: int = 4, size=(375, 500)) -> Path:
    from PIL import Image

    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    for i in range(images):
        rng = np.random.RandomState(i)
        f = rng.uniform(0.01, 0.08, size=4)
        picture = np.stack([128 + 90 * np.sin(f[0] * x + f[1] * y), 128 + 90 * np.cos(f[2] * y + i),
                            (x * f[3] * 40 + y * 0.3) % 256], -1)
        picture = (picture + rng.normal(0, 20, picture.shape)).clip(0, 255).astype(np.uint8)
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(folder / f"{i:06d}.JPEG", quality=90)
    (root / "val").mkdir(exist_ok=True)
    for c in range(classes):  # load_dataset wants a val split: one image per class
        (root / "val" / f"c{c}").mkdir(exist_ok=True)
        os.link(next((root / "train" / f"c{c}").iterdir()), root / "val" / f"c{c}" / "v.JPEG")
    return root


class ReferenceViews:
    """The standard PIL transform applied ``views`` times to one decoded image."""

    def __init__(self, views: int):
        self.views = views
        self.transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __call__(self, image):
        return torch.stack([self.transform(image) for _ in range(self.views)])


def reference_loader(train_dir: Path, args) -> DataLoader:
    dataset = torchvision.datasets.ImageFolder(str(train_dir), transform=ReferenceViews(args.views))
    if args.images < len(dataset):  # the images okd's data.train_subset takes (same sorted listing)
        keep = np.sort(np.random.RandomState(0).permutation(len(dataset))[:args.images])
        dataset = torch.utils.data.Subset(dataset, keep.tolist())
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      persistent_workers=True, prefetch_factor=4)


def okd_loader(root: Path, args):
    data = load_dataset(DataConfig(name="imagenet", root=str(root), train_subset=args.images, pipeline="stream"))
    jobs = EpochJobs(Sampling(data.train.labels, args.batch_size), args.batch_size, seed=0, dist=DistInfo())
    views = TrainViews(data.train, args.views, 224, "resized_crop", 0, True, (0.08, 1.0), seed=0)
    return loader(views, jobs, args.workers, torch.device("cpu")), jobs, len(data.train)


def one_pass(labels) -> tuple:
    """(images, seconds) of one pass; ``labels`` yields each batch's labels."""
    start, count = time.perf_counter(), 0
    for batch_labels in labels:
        count += len(batch_labels)
    return count, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", help="a folder in ImageNet's layout, train/<wnid>/*.JPEG and val/ (default: generate one)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="decode processes per side (img/s is divided by it)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.tree) if args.tree else generate_tree(Path(tmp), args.images)
        ref = reference_loader(root / "train", args)
        okd, jobs, count = okd_loader(root, args)
        kb = statistics.mean(os.path.getsize(p) for p, _ in ref.dataset.samples[:200]) / 1e3 \
            if hasattr(ref.dataset, "samples") else float("nan")
        print(f"{count} images (~{kb:.0f} kB each), {args.views} views of 224 px each, batch {args.batch_size}, {args.workers} "
              f"worker(s) per side | CPU {cpu_name()} | torch {torch.__version__}, torchvision {torchvision.__version__}")

        def run_okd(epoch):
            jobs.set_epoch(epoch, 0)
            return one_pass(labels for _, _, labels in okd)

        def run_reference(_):
            return one_pass(labels for _, labels in ref)

        sides = {"reference": run_reference, "okd": run_okd}
        for run in sides.values():
            run(0)  # warm-up: workers started, files in the page cache
        rates = {name: [] for name in sides}
        for r in range(1, args.rounds + 1):
            for name, run in sides.items():
                n, seconds = run(r)
                rates[name].append(n / seconds / args.workers)
    result = {}
    for name, values in rates.items():
        result[name] = {"median_img_per_s_per_core": statistics.median(values), "min": min(values),
                        "max": max(values), "rounds": values}
    ratio = result["okd"]["median_img_per_s_per_core"] / result["reference"]["median_img_per_s_per_core"]
    for name, r in result.items():
        label = "torchvision ImageFolder + PIL transforms" if name == "reference" else "okd streaming path"
        print(f"{label:42s} {r['median_img_per_s_per_core']:8.1f} img/s per core (min {r['min']:.1f}, max "
              f"{r['max']:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "images": count, "views": args.views,
                                               "workers": args.workers, "results": result, "ratio": ratio}, indent=1))
    print(f"ratio_vs_reference={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
