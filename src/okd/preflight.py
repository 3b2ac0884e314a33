"""Preflight: in about a minute, whether this machine trains okd's CUDA path correctly.

    python -m okd.preflight                     # the GPU if there is one, else the CPU
    python -m okd.preflight --json preflight.json

It prints the versions (Python, torch, CUDA, cuDNN, driver), the device, its free
memory, ``/dev/shm`` (DataLoader workers pass batches through it) and the cores, then
trains PCL on ``resnet8_tiny`` for two epochs, eagerly and with the step as one CUDA
graph, from the same seed, on the resident path (the embedded digits) and on the
streaming path (a generated JPEG folder decoded by DataLoader workers into pinned
memory, which is what made a "global" capture fail). One line per check says whether
the graph was captured, was replayed, ended where the eager run ended (relative to how
far training moved the weights) and, on a GPU, that a replay never synchronises with
the host (``torch.cuda.set_sync_debug_mode("error")``). On a GPU it also reports how
much memory the partial batch and the evaluation reserved beside the graph's pool.

On a CPU the same checks run through ``okd.cuda_standin`` (a stand-in for torch.cuda
whose capture executes nothing and whose replay reruns the step), so CI runs them; the
host-sync check needs a GPU and says so. The exit code is 0 when every check passed,
1 otherwise (``benchmarks/gpu_check.sh`` stops there).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .config import config_from_dict
from .cuda_graph import relative_gap
from .cuda_standin import FAULTS
from .data import load_dataset
from .devices import resolve_auto, set_up_device
from .errors import OkdError
from .hardware import device_name
from .logger import MemoryLogger

AGREE_TOLERANCE = 0.05  # graphed vs eager after two epochs, relative to how far the weights moved
BATCH, FULL_BATCHES, PARTIAL = 32, 4, 20  # per epoch: warm-up 3, capture 1, then a partial batch


def environment(device: torch.device) -> Dict:
    """Versions, the device and its free memory, /dev/shm and the cores."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "driver": driver_version(), "device": str(device), "device_name": device_name(device),
           "cpu_cores": os.cpu_count()}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", memory_total_gib=total / 2**30,
                   memory_free_gib=free / 2**30, bf16=torch.cuda.is_bf16_supported())
    try:
        shm = shutil.disk_usage("/dev/shm")
        env.update(shm_total_gib=shm.total / 2**30, shm_free_gib=shm.free / 2**30)
    except OSError:
        env.update(shm_total_gib=None, shm_free_gib=None)
    return env


def driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment_lines(env: Dict) -> List[str]:
    lines = [f"preflight: python {env['python']} | torch {env['torch']} | CUDA {env['cuda']} | cuDNN {env['cudnn']} | "
             f"driver {env['driver'] or 'unknown'}"]
    where = f"preflight: device {env['device']} ({env['device_name']})"
    if "memory_total_gib" in env:
        where += (f", capability {env['capability']}, {env['memory_free_gib']:.1f} of {env['memory_total_gib']:.1f} "
                  f"GiB free, bf16 {env['bf16']}")
    shm = (f"{env['shm_free_gib']:.1f} of {env['shm_total_gib']:.1f} GiB free" if env["shm_free_gib"] is not None
           else "absent")
    lines.append(where + f" | /dev/shm {shm} | {env['cpu_cores']} CPU cores")
    if env["shm_free_gib"] is not None and env["shm_free_gib"] < 1.0:
        lines.append("preflight: warning: /dev/shm has under 1 GiB free; DataLoader workers (the streaming path) "
                     "may die with a bus error: set data.workers=0 or enlarge it (docker --shm-size)")
    return lines


def jpeg_tree(root: Path, classes: int = 3) -> Path:
    """train/<class>/*.jpg and test/<class>/*.jpg: enough images for the batches above, 36x36 px."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    per_class = {"train": -(-(BATCH * FULL_BATCHES + PARTIAL) // classes), "test": 8}
    for split, count in per_class.items():
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                y, x = np.mgrid[0:36, 0:36]
                picture = np.stack([128 + 90 * np.sin(0.2 * x + c), 128 + 90 * np.cos(0.15 * y + i),
                                    (x + y) * 3.0], -1) + rng.randint(-20, 21, size=(36, 36, 3))
                Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def config(device: torch.device, data: Dict, graphs: bool):
    tree = {"seed": 0, "device": str(device), "data": data, "model": {"name": "resnet8_tiny"},
            "method": {"name": "pcl", "rampup_epochs": 2},
            "optim": {"lr": 0.05}, "schedule": {"milestones": [1]},
            "train": {"epochs": 2, "batch_size": BATCH, "log_every": 1000, "eval_batch_size": 64,
                      "cuda_graphs": graphs and device.type == "cuda", "threads": 0}}
    cfg, _ = resolve_auto(config_from_dict(tree), device)
    return cfg


def train(cfg, dataset, device: torch.device, graphed_step=None):
    """Two epochs of the real trainer, writing nothing; (trainer, initial weights, log, seconds)."""
    from .build import build_run_method, build_trainer

    method = build_run_method(cfg, dataset.num_classes, device, image_size=dataset.image_size)
    initial = [t.detach().clone() for t in method.state_dict().values()]
    log = MemoryLogger()
    trainer = build_trainer(cfg, method, dataset, device, log, graphed_step=graphed_step)
    clock = time.perf_counter()
    trainer.fit()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return trainer, initial, log, time.perf_counter() - clock


def standin_factory(stand_ins: List, fault: Optional[str] = None):
    from .cuda_standin import standin_graphed_step

    def make(step, device, log):
        graphed, cuda = standin_graphed_step(step, device, log, fault=fault)
        stand_ins.append(cuda)
        return graphed

    return make


def check_path(name: str, device: torch.device, data: Dict, fault: Optional[str] = None) -> Dict:
    """Eager and graphed runs of one data path from the same seed, and what the graph did."""
    eager_cfg, graph_cfg = config(device, data, False), config(device, data, True)
    dataset = load_dataset(eager_cfg.data)
    stand_ins: List = []
    factory = None if device.type == "cuda" else standin_factory(stand_ins, fault)
    eager, initial, _, eager_s = train(eager_cfg, dataset, device)
    graphed, _, log, graphed_s = train(graph_cfg, dataset, device, graphed_step=factory)
    g = graphed.graphed
    names = list(eager.method.state_dict())
    groups = ["buffers" if "running" in n or "num_batches" in n else "parameters" for n in names]
    gap = relative_gap(list(graphed.method.state_dict().values()), initial,
                       list(eager.method.state_dict().values()), groups)
    expected_replays = 2 * FULL_BATCHES - 3 - 1  # epoch 1: warm-up 3, capture (checked eagerly); epoch 2: all
    result = {"check": f"{name} graphed", "captured": bool(g is not None and g.captured),
              "replays": g.replays if g is not None else 0, "expected_replays": expected_replays,
              "replay_gap": g.replay_gap if g is not None else None,
              "off_reason": g.off_reason if g is not None else "no GraphedStep was built",
              "agreement_gap": gap, "tolerance": AGREE_TOLERANCE, "eager_seconds": eager_s,
              "graphed_seconds": graphed_s, "via": "torch.cuda" if device.type == "cuda" else "stand-in",
              "log": [line for line in log.lines if "cuda graphs" in line]}
    # eager work (partial batches, evaluation) allocates from the graph's pool where torch has MemPool; a
    # torch whose capture refuses a MemPool keeps the graph's own pool (logged, not a failure), but a pool
    # that eager work cannot enter (an unindexed device did that) is one
    result["pool"] = ("none" if g is None or not g.captured else f"NOT shared ({g.pool_error})" if g.pool_error else
                      "shared with eager work" if g.pool is not None and g.pool_for_eager else "the graph's own")
    result["ok"] = (result["captured"] and result["replays"] == expected_replays and gap <= AGREE_TOLERANCE
                    and (g is None or g.pool_error is None))
    if device.type == "cuda":
        result.update(sync_check(graphed, g))
        result["ok"] = result["ok"] and result["no_host_sync"]
    else:
        result["pool_entries"] = stand_ins[0].pool_entries if stand_ins else 0
        result["no_host_sync"] = None
    return result


def sync_check(trainer, graphed, replays: int = 5) -> Dict:
    """A few more replays under set_sync_debug_mode("error"), and the memory that eager work reserves."""
    batch = next(b for b in trainer.stream.epoch(2) if b.labels.shape[0] == trainer.stream.batch_size)
    out: Dict = {}
    if graphed is None or not graphed.captured:
        return {"no_host_sync": False, "sync_error": "no graph"}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(replays):
            trainer.step(batch.views, batch.labels)
        out["no_host_sync"], out["sync_error"] = True, None
    except RuntimeError as exc:
        out["no_host_sync"], out["sync_error"] = False, str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # the partial batch and an evaluation, eagerly: how much do they reserve beside the graph's pool?
    partial = next(b for b in trainer.stream.epoch(2) if b.labels.shape[0] != trainer.stream.batch_size)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    trainer.step(partial.views, partial.labels)
    with graphed.memory():
        trainer.test.evaluate(trainer.method)
    torch.cuda.synchronize()
    out["eager_reserved_mib"] = (torch.cuda.memory_reserved() - reserved) / 2**20
    out["reserved_mib"] = torch.cuda.memory_reserved() / 2**20
    return out


def result_line(r: Dict) -> str:
    status = "ok" if r["ok"] else "FAILED"
    parts = [("captured" if r["captured"] else f"NOT captured ({r['off_reason']})"),
             f"{r['replays']} replays (expected {r['expected_replays']})",
             (f"first replay matched the eager step to {r['replay_gap']:.1e}" if r["replay_gap"] is not None else
              "no checked replay"),
             f"after 2 epochs {'agrees' if r['agreement_gap'] <= r['tolerance'] else 'DISAGREES'} with the eager run "
             f"(gap {r['agreement_gap']:.1e}, tolerance {r['tolerance']})", f"memory pool {r['pool']}"]
    if r["no_host_sync"] is None:
        parts.append("host syncs: not checkable through the stand-in (needs a GPU)")
    else:
        parts.append("no host sync in 5 replays" if r["no_host_sync"] else f"SYNCHRONISES ({r['sync_error']})")
    if "eager_reserved_mib" in r:
        parts.append(f"partial batch + evaluation reserved {r['eager_reserved_mib']:.0f} MiB more "
                     f"({r['reserved_mib']:.0f} MiB in all)")
    speed = f"eager {r['eager_seconds']:.1f} s, graphed {r['graphed_seconds']:.1f} s"
    return f"check {r['check']} via {r['via']}: {status}: " + "; ".join(parts) + f" ({speed})"


def run(device: torch.device, workers: int, fault: Optional[str] = None) -> Dict:
    env = environment(device)
    for line in environment_lines(env):
        print(line, flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="okd_preflight_") as tmp:
        paths = {"resident": {"name": "digits", "train_subset": BATCH * FULL_BATCHES + PARTIAL, "test_subset": 64},
                 f"streaming ({workers} workers)": {"name": "imagefolder", "root": str(jpeg_tree(Path(tmp) / "jpeg")),
                                                    "pipeline": "stream", "workers": workers, "image_size": 32,
                                                    "train_subset": BATCH * FULL_BATCHES + PARTIAL,
                                                    "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
        for name, data in paths.items():
            try:
                result = check_path(name, device, data, fault)
            except Exception as exc:  # noqa: BLE001 - a crash is this check's failure, reported in one line
                result = {"check": f"{name} graphed", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
                print(f"check {name} graphed: FAILED: {result['error'].splitlines()[0]}", flush=True)
            else:
                print(result_line(result), flush=True)
            results.append(result)
    passed = sum(r["ok"] for r in results)
    print(f"preflight: {passed} of {len(results)} checks passed" + ("" if passed == len(results) else
          "; the CUDA path is not safe to trust here (see the FAILED lines)"), flush=True)
    return {"environment": env, "checks": results, "passed": passed == len(results)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m okd.preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the streaming check")
    p.add_argument("--json", help="also write the environment and every check here")
    p.add_argument("--rehearse-fault", choices=[f for f in FAULTS if f], metavar="FAULT",
                   help=f"on a CPU: let the stand-in play a GPU fault ({', '.join(f for f in FAULTS if f)}), to "
                        f"rehearse what follows a failed preflight (benchmarks/gpu_check.sh's tests)")
    args = p.parse_args(argv)
    try:
        device = set_up_device(args.device)  # indexed and current, as in a training run
    except OkdError as exc:
        print(f"preflight: error: {exc}", file=sys.stderr)
        return 2
    if args.rehearse_fault and device.type == "cuda":
        print("preflight: error: --rehearse-fault plays a fault through the CPU stand-in; not on a GPU", file=sys.stderr)
        return 2
    report = run(device, args.workers, args.rehearse_fault)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
