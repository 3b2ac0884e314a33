"""Runs okd's command line under torchrun and dumps each rank's final method state.

Test-only: lets the test compare the ranks' weights directly instead of trusting
okd's own in-sync check. Usage (from a test):
    OKD_TEST_DUMP=<dir> python -m torch.distributed.run --nproc_per_node=2 ddp_worker.py <okd args>
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch  # noqa: E402

import okd.trainer  # noqa: E402
from okd.cli import main  # noqa: E402

_fit = okd.trainer.Trainer.fit


def fit_and_dump(self, *args, **kwargs):
    _fit(self, *args, **kwargs)
    state = {k: v.detach().cpu().clone() for k, v in self.method.state_dict().items()}
    torch.save(state, Path(os.environ["OKD_TEST_DUMP"]) / f"rank{self.dist.rank}.pt")


okd.trainer.Trainer.fit = fit_and_dump
sys.exit(main(sys.argv[1:]))
