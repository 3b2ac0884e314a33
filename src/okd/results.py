"""A reproduction record: one JSON file per finished run, committed under ``results/``.

    python -m okd.results record RUN_DIR --protocol paper [--dataset cifar10] [--wall-seconds S] [--out results/]
    python -m okd.results record RUN_DIR --protocol scaled --unfinished   # a run stopped early (a time limit)
    python -m okd.report results/            # the records beside the published numbers

A record says what was trained (method, model, dataset, epochs, seed, whether
the paper's protocol or a shortened schedule), what it reached (the reported
model's best and last top-1), what it cost (wall seconds, training img/s) and
where (device as torch names it, precision, torch, okd commit), plus the
resolved config the run used. Everything is read from the run directory
(``last.pt``, ``metrics.jsonl``); nothing is typed in by hand. A record is
never overwritten: a second record of the same cell gets a numbered name.
A run stopped before its last epoch is recorded only when asked (``--unfinished``):
its record says ``"finished": false`` and holds the epochs it completed
(``epochs_done`` of ``epochs``), what the GPU check keeps when its time limit ends
a run. ``--preflight preflight.json`` labels the record with the preflight of its
machine (``"preflight": {"passed": ..., "failed": [...]}``): the GPU check trains
and records even when a preflight check failed, and the record says which.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from . import checkpoint_file
from .errors import OkdError
from .metrics import median_img_per_s, read_metrics
from .paper import paper_top1
from .recipes import recipe_label

RECORD_VERSION = 1
PROTOCOLS = ("paper", "scaled")


def build_record(run_dir: Path, protocol: str, dataset: Optional[str] = None,
                 wall_seconds: Optional[float] = None, unfinished: bool = False) -> Dict:
    if protocol not in PROTOCOLS:
        raise OkdError(f"protocol must be {' or '.join(PROTOCOLS)}, got '{protocol}'")
    last = run_dir / "last.pt"
    if not last.exists():
        raise OkdError(f"'{run_dir}' has no last.pt; is it an okd run directory?")
    blob, _ = checkpoint_file.load_latest(last)
    cfg = blob["config"]
    epochs_done, epochs = int(blob["epoch"]), int(cfg["train"]["epochs"])
    if epochs_done < epochs and not unfinished:
        raise OkdError(f"run '{run_dir}' has finished {epochs_done} of {epochs} epochs; record finished runs only "
                       f"(or pass --unfinished)")
    if epochs_done == 0:
        raise OkdError(f"run '{run_dir}' has not finished an epoch yet: nothing to record")
    records = [r for r in read_metrics(run_dir) if "train" in r]
    reported = blob["best"].get("reported") or {}
    last_reported = blob["last"].get("reported") or {}
    train_seconds = sum(float(r["train"].get("seconds", 0.0)) for r in records)
    eval_seconds = sum(float(r.get("eval_seconds", 0.0)) for r in records)
    environment = blob.get("environment", {})
    name = dataset or cfg["data"]["name"]
    return {
        "okd_result": RECORD_VERSION,
        "method": cfg["method"]["name"], "model": cfg["model"]["name"], "dataset": name,
        "epochs": epochs, "epochs_done": epochs_done, "finished": epochs_done >= epochs,
        "protocol": protocol, "recipe": recipe_label(cfg), "seed": int(cfg["seed"]),
        "reported_best": reported.get("value"), "reported_best_epoch": reported.get("epoch"),
        "reported_last": last_reported.get("value"), "reported_label": last_reported.get("label"),
        "paper_top1": paper_top1(name, cfg["model"]["name"], cfg["method"]["name"]),
        "wall_seconds": wall_seconds if wall_seconds is not None else train_seconds + eval_seconds,
        "train_seconds": train_seconds,
        "img_per_s": median_img_per_s(records),
        "precision": cfg["train"]["precision"],
        "device": environment.get("device", "unknown"), "torch": environment.get("torch", blob.get("torch_version")),
        "commit": environment.get("commit", "unknown"),
        "config": cfg,
    }


def preflight_label(path: Path) -> Dict:
    """{"passed", "failed": one line per failed check} from ``python -m okd.preflight --json``'s file."""
    try:
        report = json.loads(path.read_text())
        checks = report["checks"]
    except (OSError, ValueError, KeyError, TypeError):
        return {"passed": False, "failed": [f"the preflight wrote no report at {path} (it timed out or crashed)"]}
    def why(c: Dict) -> str:
        pool = str(c.get("pool", ""))
        return c.get("error") or c.get("off_reason") or (f"memory pool {pool}" if pool.startswith("NOT") else
                                                         "see preflight.json")

    failed = [f"{c.get('check', '?')}: {why(c)}" for c in checks if not c.get("ok")]
    return {"passed": bool(report.get("passed")) and not failed, "failed": failed}


def free_path(folder: Path, stem: str) -> Path:
    path, n = folder / f"{stem}.json", 2
    while path.exists():
        path, n = folder / f"{stem}_{n}.json", n + 1
    return path


def write_record(record: Dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    epochs = f"{record['epochs']}" if record.get("finished", True) else f"{record['epochs_done']}of{record['epochs']}"
    stem = f"{record['dataset']}_{record['model']}_{record['method']}_{epochs}ep_{record['protocol']}_seed{record['seed']}"
    path = free_path(folder, stem)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_records(paths: List[Path]) -> List[Dict]:
    """Every okd result record in ``paths`` (files, or folders searched recursively)."""
    files = []
    for p in paths:
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p] if p.suffix == ".json" else []
    out = []
    for f in files:
        try:
            record = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "okd_result" in record:
            out.append({**record, "file": str(f)})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="okd-results", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="write the record of a finished run")
    rec.add_argument("run_dir")
    rec.add_argument("--protocol", required=True, choices=PROTOCOLS,
                     help="paper: the paper's full schedule; scaled: a shortened one")
    rec.add_argument("--dataset", help="the dataset's name in the record (e.g. cifar10 for its ImageFolder copy)")
    rec.add_argument("--wall-seconds", type=float, help="measured wall time of the whole run (default: train + eval)")
    rec.add_argument("--out", default="results", help="folder of the records (default: results/)")
    rec.add_argument("--unfinished", action="store_true",
                     help="also record a run stopped before its last epoch (labelled finished: false)")
    rec.add_argument("--preflight", metavar="JSON",
                     help="label the record with this machine's preflight (python -m okd.preflight --json)")
    args = p.parse_args(argv)
    try:
        record = build_record(Path(args.run_dir), args.protocol, args.dataset, args.wall_seconds, args.unfinished)
        if args.preflight:
            record["preflight"] = preflight_label(Path(args.preflight))
        path = write_record(record, Path(args.out))
    except (OkdError, OSError) as exc:
        print(f"okd-results: error: {exc}", file=sys.stderr)
        return 2
    done = "" if record["finished"] else f"{record['epochs_done']} of "
    print(f"okd-results: wrote {path} | {record['method']} {record['model']} {record['dataset']} "
          f"{done}{record['epochs']} epochs ({record['protocol']}): reported best {record['reported_best']:.2f}, "
          f"last {record['reported_last']:.2f} | {record['img_per_s']:.0f} img/s on {record['device']}"
          + ("" if record.get("preflight", {}).get("passed", True) else
             f" | preflight FAILED: {'; '.join(record['preflight']['failed'])}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
