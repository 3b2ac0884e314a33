"""Shared test helpers (imported as ``from conftest import ...``) and fixtures."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yml")


@pytest.fixture(scope="session", autouse=True)
def _fp32_on_every_cpu(tmp_path_factory):
    """train.precision=auto means fp32 in the tests on every CPU: the bf16 probe's cache says so.

    (A CPU where bf16 is measured faster would otherwise run every CLI test in bf16; the probe
    itself is tested with its own cache.) Subprocesses inherit the variable.
    """
    from okd import hardware

    cache = tmp_path_factory.mktemp("okd_cache")
    keys = {f"{hardware.cpu_name()} | torch {torch.__version__} | threads {n}": 0.0
            for n in range(1, (os.cpu_count() or 1) + 1)}
    (cache / "cpu_bf16_probe.json").write_text(json.dumps(keys))
    previous = os.environ.get("OKD_CACHE")
    os.environ["OKD_CACHE"] = str(cache)
    yield
    if previous is None:
        os.environ.pop("OKD_CACHE", None)
    else:
        os.environ["OKD_CACHE"] = previous


@pytest.fixture(autouse=True)
def _small_threads():
    # CI has 2 cores; keep runs comparable and deterministic
    torch.set_num_threads(2)
    yield


@pytest.fixture
def channels_last_backbone():
    """The name of resnet8_tiny with a 16-channel stem, registered for one test: a tiny backbone a CPU may
    run in channels_last (resnet8_tiny's 8-channel 1x1 stride-2 shortcut is refused there, see
    ``okd.devices.channels_last_hazards``)."""
    from functools import partial

    from okd.models import BACKBONES
    from okd.models.resnet import BasicBlock, resnet_spec

    name = "resnet8_tiny16"
    BACKBONES.register(name)(partial(resnet_spec, BasicBlock, [1, 1, 1], widths=(16, 16, 32)))
    yield name
    BACKBONES._entries.pop(name)
    BACKBONES._meta.pop(name)


def large_backbones():
    """Registered backbones whose per-backbone tests are marked slow: more than a million parameters, or
    depthwise / grouped convolutions (MobileNetV2, ShuffleNetV2), whose CPU kernels are slow in fp64 and,
    grouped once more per branch, in the batched path."""
    from torch import nn

    from okd import create_model
    from okd.models import BACKBONES

    def costly(model):
        grouped = any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
        return grouped or sum(p.numel() for p in model.parameters()) > 1e6

    return {name for name in BACKBONES.names() if costly(create_model(name, 10))}


def ListLog():
    """A run logger that keeps its lines (okd's own MemoryLogger)."""
    from okd.logger import MemoryLogger

    return MemoryLogger()


def pcl_train_step(**train):
    """(TrainStep, its SyncPolicy with the log in ``.log``) of a tiny PCL on CPU, ready for its first step; ``train``: train.* settings."""
    from okd.config import config_from_dict
    from okd.distributed import DistInfo
    from okd.loss_meter import LossMeter
    from okd.methods.pcl import PCL
    from okd.models import backbone_spec
    from okd.optim import Optimization
    from okd.run_state import RunState
    from okd.step import TrainStep, training_module
    from okd.sync import SyncPolicy

    cfg = config_from_dict({"device": "cpu", "model": {"name": "resnet8_tiny"}, "method": {"name": "pcl"},
                            "train": {"precision": "fp32", "batch_size": 4, **train}})
    torch.manual_seed(0)
    method = PCL(backbone_spec("resnet8_tiny", 10), 10, cfg.method).train()
    device = torch.device("cpu")
    log = ListLog()
    module = training_module(method, cfg, device, DistInfo())  # the method itself, or torch.compile's
    sync = SyncPolicy(cfg, device, log)
    step = TrainStep(module, method, Optimization.build(cfg, method, device), LossMeter(device), sync.health, cfg,
                     device, cfg.train.batch_size)
    step.meter.load(RunState())
    step.start(RunState())
    method.kd_scale.fill_(method.options.kd_scale(0))
    return step, sync


def records(run_dir):
    """The epoch records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def tree_digest(path):
    """One hash of every file name and content under ``path``: equal digests = nothing changed."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(*argv, env=None, timeout=300):
    """``python main.py ARGV`` in a fresh process (for exit codes, stderr and signals)."""
    return subprocess.run([sys.executable, str(REPO / "main.py"), *argv], capture_output=True, text=True,
                          cwd=str(REPO), timeout=timeout, env={**os.environ, **(env or {})})


def softmax_kl(student, teacher, T):
    """T^2 * mean_i sum_c p_t log(p_t / p_s), written out without okd's helpers."""
    p_t = torch.exp(teacher / T) / torch.exp(teacher / T).sum(1, keepdim=True)
    p_s = torch.exp(student / T) / torch.exp(student / T).sum(1, keepdim=True)
    return T * T * (p_t * (p_t.log() - p_s.log())).sum(1).mean()


def random_batch(n_views, batch=4, classes=10, seed=1):
    """(views, labels): ``n_views`` random 32x32 images of the same labels."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n_views)]
    return views, torch.randint(0, classes, (batch,), generator=g)


def synthetic_image(height, width, seed):
    """A smooth, JPEG-friendly uint8 H x W x 3 picture (gradients, stripes, some noise)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    f = rng.uniform(0.02, 0.2, size=3)
    base = np.stack([128 + 100 * np.sin(f[0] * x + seed), 128 + 100 * np.cos(f[1] * y),
                     (x + y) * (255.0 / (height + width)) * (1 + f[2])], -1)
    return (base + rng.randint(-12, 13, size=base.shape)).clip(0, 255).astype(np.uint8)


def make_imagenet_tree(root, classes=("n01", "n02", "n03"), train_per_class=6, val_per_class=3, sizes=(64, 256)):
    """root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG, each image of its own size in ``sizes``."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(classes):
            folder = Path(root) / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.randint(sizes[0], sizes[1] + 1, size=2)
                Image.fromarray(synthetic_image(h, w, 100 * c + i)).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return Path(root)


def make_tiny_tree(root, classes=("n01", "n02", "n03"), train_per_class=6, val_images=9, size=64):
    """Tiny-ImageNet's official layout: train/<wnid>/images/, val/images/ + val_annotations.txt, wnids.txt."""
    from PIL import Image

    root = Path(root)
    for c, wnid in enumerate(classes):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(train_per_class):
            Image.fromarray(synthetic_image(size, size, 100 * c + i)).save(folder / f"{wnid}_{i}.JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(val_images):
        Image.fromarray(synthetic_image(size, size, 7 + i)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{classes[i % len(classes)]}\t0\t0\t{size - 1}\t{size - 1}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(classes) + "\n")
    return root
