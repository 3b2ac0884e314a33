"""The comparison table as jobs: its cells handed to a scheduler, their state read back, cancelled.

    python -m okd.table submit --engine slurm --config configs/cifar100.yml --seeds "0 1 2" \\
        --partition gpu --gpus-per-task 1 --cpus-per-task 8 --mem 32G     # one Slurm array task per cell
    python -m okd.table submit --engine local --config configs/cifar10.yml --gpus "0 1"   # this machine
    python -m okd.table status --config configs/cifar100.yml              # each cell's state
    python -m okd.table cancel --config configs/cifar100.yml

A cell is one run: (dataset config, backbone, method, seed), in the run directory
``<output.root>/<name>_<backbone>_<method>_seed<seed>``. Its command is okd's
own (``python -m okd --config ... --save_dir ...``), so a cell resumes by
running again: a requeued or restarted task continues from the cell's last
checkpoint, bit for bit, and the run-directory lock keeps a duplicate from
training it twice. Both engines run a cell through ``CellTask``:

* ``slurm`` submits through submitit, one array task per cell (one array per
  distinct time limit: each task's ``--time`` is the planner's estimate times
  ``--time-margin``). Before its time limit and on preemption a task gets
  SIGUSR2 (submitit's ``--signal``); ``CellTask.checkpoint`` then stops okd with
  SIGTERM, okd writes ``last.pt`` and exits, and submitit requeues the task. A
  requeue from outside (``scontrol requeue``, a preempting job) sends SIGTERM
  to the task directly, with the same effect. A cell that fails for a user
  error (a bad config, missing data) exits with okd's one-line error and is not
  requeued.
* ``local`` runs the cells on this machine, one worker per GPU (or one on the
  CPU) taking the next cell from one in-process queue.

The table's record (``<output.root>/table-<name>/table.json``: the cells, their
task ids and log files) and one state file per cell (``cells/<cell>.json``:
running, finished, interrupted, failed with its last line) are what ``status``
reads, beside the run directories and the scheduler's queue.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .config import default_run_name, load_config
from .errors import OkdError
from .paper import ALL_METHODS, BACKBONE_ROWS, TABLE_METHODS

SRC = Path(__file__).resolve().parents[1]  # the folder holding the okd package
INTERRUPTED = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL}


class TableError(OkdError):
    """A mistake in a table command (one line, exit code 2)."""


@dataclass
class Cell:
    name: str  # the run directory's name
    table: str  # the table's name (the config's stem)
    config: str
    backbone: str
    method: str
    seed: int
    run_dir: str
    argv: List[str]  # okd's command-line arguments
    epochs: int
    minutes: Optional[int] = None  # the task's time limit
    task: str = ""  # the scheduler's id of its task
    log: str = ""  # the scheduler's log of the task

    @property
    def command(self) -> List[str]:
        return [sys.executable, "-m", "okd", *self.argv]


def table_dir(root: Path, name: str) -> Path:
    return root / f"table-{name}"


def cell_state_path(tdir: Path, cell_name: str) -> Path:
    return tdir / "cells" / f"{cell_name}.json"


def write_json(path: Path, data: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- one cell's task

class CellTask:
    """Runs one cell's okd command as a child process and records its state; submitit calls it in the
    Slurm task (and ``checkpoint`` on SIGUSR2), the local engine in a worker thread."""

    def __init__(self, cell: Dict, tdir: str, env: Optional[Dict[str, str]] = None):
        self.cell, self.tdir, self.env = cell, tdir, env or {}
        self.child: Optional[subprocess.Popen] = None

    def state(self, **fields) -> None:
        path = cell_state_path(Path(self.tdir), self.cell["name"])
        old = read_json(path) or {}
        write_json(path, {**old, **fields, "time": time.time()})

    def __call__(self) -> int:
        cell = self.cell
        old = read_json(cell_state_path(Path(self.tdir), cell["name"])) or {}
        attempt = int(old.get("attempt", 0)) + 1
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        task = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID", "")
        env = {**os.environ, **self.env, "PYTHONPATH": os.pathsep.join(
            [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
        # Slurm signals every process of the task: okd ignores the USR2 that is meant for submitit (which
        # then stops okd with SIGTERM, see checkpoint); SIGTERM itself okd handles by checkpointing
        self.child = subprocess.Popen([sys.executable, "-m", "okd", *cell["argv"]], env=env,
                                      stderr=subprocess.PIPE, text=True, bufsize=1, preexec_fn=_ignore_usr2)
        self.state(state="running", attempt=attempt, host=socket.gethostname(), pid=self.child.pid, last_line="",
                   task=task, restarts=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        lines: List[str] = []
        reader = threading.Thread(target=_echo, args=(self.child.stderr, lines), daemon=True)
        reader.start()
        while self.child.poll() is None:  # poll, not wait: a signal handler may wait for the child too
            time.sleep(0.2)
        reader.join(timeout=5)
        code = self.child.returncode
        last = next((line for line in reversed(lines) if line.strip()), "")
        if code == 0:
            self.state(state="finished", exit_code=0, last_line=last)
            return 0
        if code in INTERRUPTED:  # SIGTERM (a requeue, a preemption, cancel): last.pt written, the scheduler decides
            self.state(state="interrupted", exit_code=code, last_line=last)
            return code
        if "is in use by" in last:  # another task holds the run directory: it is that one's cell now
            self.state(state="duplicate", exit_code=code, last_line=last)
            return code
        self.state(state="failed", exit_code=code, last_line=last)
        raise CellFailed(f"{cell['name']}: {last or f'exit code {code}'}")

    def checkpoint(self, *args, **kwargs):
        """submitit, on SIGUSR2 (time limit near, or preemption): stop okd (it writes last.pt), then requeue."""
        import submitit

        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            deadline = time.time() + 60
            while self.child.poll() is None and time.time() < deadline:
                time.sleep(0.2)
        self.state(state="requeued", last_line="requeued before its time limit or on preemption")
        return submitit.helpers.DelayedSubmission(CellTask(self.cell, self.tdir, self.env))


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class CellFailed(Exception):
    """A cell's okd command failed (its one-line error): the task ends failed, not requeued."""


def _echo(stream, lines: List[str]) -> None:
    for line in stream:
        sys.stderr.write(line)
        sys.stderr.flush()
        lines.append(line.rstrip("\n"))
        del lines[:-50]


# ---------------------------------------------------------------- the cells

def build_cells(config: str, methods: Sequence[str], backbones: Sequence[str], seeds: Sequence[int],
                overrides: Sequence[str], name: Optional[str] = None) -> List[Cell]:
    """Every (backbone, method, seed) of one dataset config, named as ``run_table.sh`` names them."""
    cfg = load_config(config, list(overrides))
    table = name or Path(config).stem
    root = Path(cfg.output.root)
    cells = []
    for backbone in backbones:
        for method in methods:
            for seed in seeds:
                run = default_run_name(table, backbone, method, seed)
                argv = ["--config", str(config), "--model", backbone, "--method", method, "--seed", str(seed),
                        "--save_dir", run, *overrides]
                cells.append(Cell(run, table, str(config), backbone, method, seed, str(root / run), argv,
                                  cfg.train.epochs))
    return cells


def epochs_done(run_dir: Path) -> int:
    from .estimate import measured_speed

    return measured_speed(run_dir)[0]


def time_limits(cells: List[Cell], config: str, overrides: Sequence[str], margin: float, fallback: Optional[int],
                measure: bool, gpus: int, seeds: Sequence[int] = ()) -> None:
    """Each cell's time limit in minutes: the planner's estimate of what is left x ``margin`` + 5 min
    (start, data, evaluation), or ``fallback`` where no speed is known. ``seeds``: the table's other seeds,
    whose runs give a cell's speed too."""
    from .devices import set_up_device
    from .estimate import dataset_size, plan

    cfg = load_config(config, list(overrides))
    device = set_up_device("auto" if gpus else "cpu")
    images, classes = dataset_size(cfg.data)
    planned = plan(cfg, sorted({c.backbone for c in cells}), sorted({c.method for c in cells}),
                   sorted({c.seed for c in cells} | set(seeds)), measure, device, cells[0].table if cells else None,
                   classes)
    by_key = {(p.backbone, p.method, p.seed): p for p in planned}
    for cell in cells:
        left = by_key[(cell.backbone, cell.method, cell.seed)].seconds_left(images)
        if left is not None:
            cell.minutes = int(math.ceil(left * margin / 60)) + 5
        elif fallback is not None:
            cell.minutes = fallback
        else:
            raise TableError(f"no measured speed for {cell.name}; pass --measure (a few timed steps) or "
                             f"--time MINUTES")


# ---------------------------------------------------------------- engines

def submit_slurm(cells: List[Cell], tdir: Path, args) -> None:
    try:
        import submitit
    except ImportError:
        raise TableError("--engine slurm needs submitit: pip install submitit") from None
    if not shutil_which("sbatch"):
        raise TableError("--engine slurm needs Slurm's sbatch on PATH (no Slurm here); use --engine local")
    for minutes in sorted({c.minutes for c in cells}):
        group = [c for c in cells if c.minutes == minutes]
        executor = submitit.SlurmExecutor(folder=str(tdir / "slurm" / "%j"), max_num_timeout=args.max_requeues)
        executor.update_parameters(**slurm_parameters(args, minutes, group[0].table))
        with executor.batch():
            jobs = [executor.submit(CellTask(asdict(c), str(tdir))) for c in group]
        for cell, job in zip(group, jobs):
            cell.task, cell.log = job.job_id, str(job.paths.stdout)


def slurm_parameters(args, minutes: int, table: str) -> Dict:
    """submitit's SlurmExecutor parameters of an array of cells with a time limit of ``minutes``."""
    params = {"time": minutes, "job_name": f"okd-{table}", "cpus_per_task": args.cpus_per_task,
              "signal_delay_s": args.signal_delay, "stderr_to_stdout": True,
              "setup": [f"export PYTHONPATH={shlex.quote(str(SRC))}${{PYTHONPATH:+:$PYTHONPATH}}"],
              "additional_parameters": {"requeue": True}}
    for key in ("partition", "account", "qos", "mem"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.gpus_per_task:
        params["gpus_per_task"] = args.gpus_per_task
    if args.array_parallelism:
        params["array_parallelism"] = args.array_parallelism
    return params


def shutil_which(name: str) -> Optional[str]:
    import shutil

    return shutil.which(name)


def run_local(cells: List[Cell], tdir: Path, workers: Sequence[str]) -> List[Cell]:
    """The cells on this machine: one worker per entry of ``workers`` (a GPU index, or "cpu"), each taking the
    next cell from one queue until none is left. Returns the failed cells."""
    import queue

    todo: "queue.Queue[Cell]" = queue.Queue()
    for cell in cells:
        todo.put(cell)
    failed: List[Cell] = []
    lock = threading.Lock()

    def worker(where: str) -> None:
        env = {"CUDA_VISIBLE_DEVICES": "" if where == "cpu" else where}
        while True:
            try:
                cell = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                print(f"[{where}] start {cell.name}", flush=True)
            try:
                code = CellTask(asdict(cell), str(tdir), env)()
                line = (read_json(cell_state_path(tdir, cell.name)) or {}).get("last_line", "")
                with lock:
                    if code == 0:
                        print(f"[{where}] done  {cell.name}: {cell_status(cell, tdir, {})}", flush=True)
                    else:
                        failed.append(cell)
                        print(f"[{where}] STOPPED {cell.name}: {line}", flush=True)
            except CellFailed as exc:
                with lock:
                    failed.append(cell)
                    print(f"[{where}] FAILED {exc}", flush=True)

    threads = [threading.Thread(target=worker, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


# ---------------------------------------------------------------- status

def scheduler_states(task_ids: Sequence[str]) -> Dict[str, str]:
    """{task id: Slurm state} of the tasks still known to ``squeue`` (pending, running, ...)."""
    if not task_ids or not shutil_which("squeue"):
        return {}
    jobs = sorted({t.split("_")[0] for t in task_ids})
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(jobs)], capture_output=True,
                         text=True, timeout=60)
    states = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            task, state = line.split("|", 1)
            states[task.strip()] = state.strip()
    return states


def cell_status(cell: Cell, tdir: Path, queue_states: Dict[str, str]) -> str:
    """One line: queued, running with epoch k/n, finished with its reported accuracy, failed with its last line."""
    from .runs import read_run

    run_dir = Path(cell.run_dir)
    done = epochs_done(run_dir) if run_dir.exists() else 0
    state = read_json(cell_state_path(tdir, cell.name)) or {}
    kind, sched = state.get("state"), queue_states.get(cell.task, "")
    local = cell.task.startswith("local")
    if done >= cell.epochs:
        run = read_run(run_dir)
        if run is not None and run.curve:
            return f"finished: reported best {run.best:.2f}, last {run.last:.2f} ({done}/{cell.epochs} epochs)"
        return f"finished ({done}/{cell.epochs} epochs)"
    if kind == "failed":
        return f"failed: {state.get('last_line') or 'exit code ' + str(state.get('exit_code'))}"
    again = f", requeued {state['restarts']}x" if state.get("restarts") else ""
    if kind in ("interrupted", "requeued") and sched:
        again = f", requeued after epoch {done}"
    if sched in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED"):
        return f"queued: {done}/{cell.epochs} epochs done{again}"
    if sched in ("RUNNING", "COMPLETING") or (local and kind == "running" and _alive(state.get("pid"))):
        return f"running: epoch {min(done + 1, cell.epochs)}/{cell.epochs}{again}"
    if kind == "duplicate":
        return f"duplicate task stopped: {state.get('last_line', '')}"
    if kind in ("running", "interrupted", "requeued"):
        return (f"stopped: {done}/{cell.epochs} epochs done, not {'running' if local else 'in the queue'}; "
                f"submit again to continue")
    return "queued" if sched else "not submitted"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, OSError):
        return False


def output_root(config: str, overrides: Sequence[str]) -> str:
    """``output.root`` of the table's runs (the config and its overrides, validated)."""
    return load_config(config, list(overrides)).output.root


def load_table(tdir: Path) -> List[Cell]:
    record = read_json(tdir / "table.json")
    if record is None:
        raise TableError(f"no table submitted under '{tdir}' (no table.json); run 'python -m okd.table submit' "
                         f"first")
    return [Cell(**c) for c in record["cells"]]


def status_lines(cells: List[Cell], tdir: Path) -> List[str]:
    states = scheduler_states([c.task for c in cells if c.task and not c.task.startswith("local")])
    width = max(len(c.name) for c in cells)
    return [f"{c.name:<{width}}  {c.task or '-':<12} {cell_status(c, tdir, states)}" for c in cells]


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m okd.table", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, table: bool = False):
        q.add_argument("--config", required=not table, help="the table's dataset config, e.g. configs/cifar100.yml")
        q.add_argument("--name", help="the table's name in run directories (default: the config's stem)")
        if table:
            q.add_argument("--table", help="the table's directory (what submit printed), instead of --config")
        q.set_defaults(overrides=[])  # key=value config overrides of every run, anywhere on the line

    s = sub.add_parser("submit", help="submit the cells that are not finished")
    common(s)
    s.add_argument("--engine", choices=["slurm", "local"], required=True)
    s.add_argument("--methods", default=" ".join(TABLE_METHODS), help="space-separated; 'all': also after PCL")
    s.add_argument("--backbones", default=" ".join(BACKBONE_ROWS), help="space-separated; a+b: a cohort")
    s.add_argument("--seeds", default="0", help='space-separated seeds, e.g. "0 1 2"')
    s.add_argument("--gpus", default="", help='local: the GPUs to spread the cells over ("0 1"); default one CPU worker')
    s.add_argument("--slurm", metavar="FILE", help="a YAML file of the Slurm settings below (flags win), e.g. "
                                                   "partition: gpu, gpus_per_task: 1, cpus_per_task: 8, mem: 32G")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--mem", help="memory per task, e.g. 32G")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--gpus-per-task", type=int)
    s.add_argument("--array-parallelism", type=int, help="at most this many tasks at once (default: no cap)")
    s.add_argument("--time", type=int, help="minutes per task where the planner has no measured speed")
    s.add_argument("--time-margin", type=float, help="time limit = estimate x margin + 5 min (default 1.5)")
    s.add_argument("--measure", action="store_true", help="time a few steps of cells without a measured speed")
    s.add_argument("--signal-delay", type=int, help="seconds before the time limit that SIGUSR2 comes (default 90)")
    s.add_argument("--max-requeues", type=int, help="requeues after a time limit before giving up (default 10)")
    for name, text in (("status", "each cell's state"), ("cancel", "cancel the table's tasks")):
        common(sub.add_parser(name, help=text), table=True)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides look like key=value)")
    args.overrides = [a for a in rest if a not in unknown]
    try:
        if getattr(args, "table", None):
            tdir = Path(args.table)
        elif not args.config:
            raise TableError("give --config (and the submit's overrides) or --table DIR")
        else:
            name = args.name or Path(args.config).stem
            tdir = table_dir(Path(output_root(args.config, args.overrides)), name)
        if args.command == "submit":
            return submit(args, tdir, name)
        cells = load_table(tdir)
        if args.command == "status":
            print("\n".join(status_lines(cells, tdir)))
            return 0
        return cancel(cells, tdir)
    except (OkdError, CellFailed) as exc:
        print(f"okd-table: error: {exc}", file=sys.stderr)
        return 2


SLURM_KEYS = {"partition": str, "account": str, "qos": str, "mem": str, "cpus_per_task": int, "gpus_per_task": int,
              "array_parallelism": int, "time_margin": float, "signal_delay": int, "max_requeues": int}
SLURM_DEFAULTS = {"cpus_per_task": 4, "gpus_per_task": 0, "array_parallelism": 0, "time_margin": 1.5,
                  "signal_delay": 90, "max_requeues": 10}


def apply_slurm_file(args) -> None:
    """Settings from ``--slurm FILE`` where no flag gave them; unknown keys and wrong types are one-line errors."""
    import yaml

    values = {}
    if args.slurm:
        try:
            values = yaml.safe_load(Path(args.slurm).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise TableError(f"cannot read --slurm '{args.slurm}': {exc}") from None
        values = values.get("slurm", values) if isinstance(values, dict) else values
        if not isinstance(values, dict):
            raise TableError(f"--slurm '{args.slurm}' must be a mapping of Slurm settings")
    for key, value in values.items():
        if key not in SLURM_KEYS:
            raise TableError(f"unknown key '{key}' in --slurm '{args.slurm}'; valid: {', '.join(SLURM_KEYS)}")
        kind = SLURM_KEYS[key]
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)) or isinstance(value, bool):
            raise TableError(f"'{key}' in --slurm '{args.slurm}' must be {kind.__name__}, got {value!r}")
        if getattr(args, key) is None:  # a flag wins over the file
            setattr(args, key, value)
    for key, value in SLURM_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def submit(args, tdir: Path, name: str) -> int:
    apply_slurm_file(args)
    methods = list(ALL_METHODS) if args.methods.strip() == "all" else args.methods.split()
    cells = build_cells(args.config, methods, args.backbones.split(), [int(s) for s in args.seeds.split()],
                        args.overrides, name)
    if not cells:
        raise TableError("no cells: give --methods, --backbones and --seeds")
    todo = [c for c in cells if epochs_done(Path(c.run_dir)) < c.epochs]
    for c in cells:
        if c not in todo:
            print(f"{c.name}: finished, skipped")
    if not todo:
        print(f"okd-table: all {len(cells)} cell(s) are finished")
        return 0
    previous = {c["name"]: c for c in (read_json(tdir / "table.json") or {}).get("cells", [])}
    if args.engine == "slurm":
        live = scheduler_states([previous[c.name]["task"] for c in todo if c.name in previous
                                 and previous[c.name].get("task")])
        if live:  # a cell still queued or running is not submitted twice
            for c in todo:
                if previous.get(c.name, {}).get("task") in live:
                    print(f"{c.name}: task {previous[c.name]['task']} is still in the queue, not submitted again")
            todo = [c for c in todo if previous.get(c.name, {}).get("task") not in live]
            if not todo:
                return 0
        time_limits(todo, args.config, args.overrides, args.time_margin, args.time, args.measure,
                    args.gpus_per_task, [c.seed for c in cells])
        submit_slurm(todo, tdir, args)
    if args.engine == "local":
        for c in todo:
            c.task = "local"
    merged = {**previous, **{c.name: asdict(c) for c in todo}}
    write_json(tdir / "table.json", {"name": name, "engine": args.engine, "config": args.config,
                                     "cells": list(merged.values())})
    if args.engine == "slurm":
        width = max(len(c.name) for c in todo)
        print(f"okd-table: submitted {len(todo)} cell(s) to Slurm as job(s) "
              f"{', '.join(sorted({c.task.split('_')[0] for c in todo}))}")
        for c in todo:
            print(f"  {c.name:<{width}}  task {c.task:<10} {c.minutes:>4} min  run {c.run_dir}  log {c.log}")
        print(f"okd-table: python -m okd.table status --table {tdir}")
        return 0
    workers = args.gpus.split() or ["cpu"]
    print(f"okd-table: {len(todo)} cell(s) on {' '.join(workers)} ({len(workers)} at a time)", flush=True)
    failed = run_local(todo, tdir, workers)
    if failed:
        print(f"okd-table: {len(failed)} cell(s) failed: {' '.join(c.name for c in failed)}", file=sys.stderr)
        return 1
    return 0


def cancel(cells: List[Cell], tdir: Path) -> int:
    tasks = [c.task for c in cells if c.task and not c.task.startswith("local")]
    if tasks and shutil_which("scancel"):
        subprocess.run(["scancel", *sorted(set(tasks))], check=False)
    for c in cells:  # local workers: their okd children checkpoint on SIGTERM
        state = read_json(cell_state_path(tdir, c.name)) or {}
        if c.task.startswith("local") and state.get("state") == "running" and _alive(state.get("pid")):
            os.kill(int(state["pid"]), signal.SIGTERM)
    print(f"okd-table: cancelled {len(tasks)} task(s); each cell keeps its last checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
