"""What the field argues about, measured at every evaluation from the logits it already computes.

For every group of two or more members (a method's networks, branches or peers, and its temporal-mean
peers: ``Method.diagnostic_groups``), over the test set:

  disagreement   % of images on which two members' top-1 classes differ, averaged over the pairs
                 (and the matrix, member by member)
  kl             the mean over ordered pairs (a, b) of KL(p_a || p_b) at T = 1, per image, in nats
  ensemble_top1  top-1 % of the averaged-probability ensemble of the members
  ensemble_gain  ensemble_top1 minus the members' mean top-1, in points

and for every model the method evaluates, its calibration:

  ece            expected calibration error, 15 equal-width confidence bins (0, 1/15], ..., (14/15, 1], in %
  nll            mean negative log-likelihood of the true class, in nats
  brier          mean over images of sum_c (p_c - 1[c = y])^2

Every figure is a sum over images divided once at the end, so under torchrun the per-rank sums are added
(``all_reduce``) and the result is the one process's on the same weights. The sums are float64 on the
device: one more reduction per evaluation, no host sync per batch.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from .methods.base import numbered_groups  # the default member groups, where the methods name their models

ECE_BINS = 15


class Diagnostics:
    """Running sums of one evaluation; ``add`` per batch, ``result`` once (after the ranks' sums are added).

    A batch is a few batched operations over all models at once (their logits stacked), not a loop of
    small ones per model: the cost stays a small share of the evaluation (benchmarks/diagnostics_cost.py).
    """

    def __init__(self, names: Sequence[str], groups: Dict[str, List[str]], device):
        self.names, self.groups = list(names), {g: list(m) for g, m in groups.items()}
        self.index = {g: torch.tensor([self.names.index(x) for x in m], device=device) for g, m in groups.items()}
        # per model: ECE_BINS counts, confidence sums, correct sums; then the nll and Brier sums
        self.calibration = torch.zeros(len(self.names), 3 * ECE_BINS + 2, dtype=torch.float64, device=device)
        # per group of m: the (m, m) disagreement counts, the (m, m) KL(a || b) sums, the ensemble's hits
        self.group_sums = {g: torch.zeros(2 * len(m) ** 2 + 1, dtype=torch.float64, device=device)
                           for g, m in groups.items()}

    def add(self, outputs: Dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        models = len(self.names)
        log_p = F.log_softmax(torch.stack([outputs[n].float() for n in self.names]), dim=2)  # (M, B, C)
        p = log_p.exp()
        conf, pred = p.max(dim=2)  # (M, B)
        correct = (pred == labels).double()
        bins = (conf.double() * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1
        bins = (bins + ECE_BINS * torch.arange(models, device=bins.device)[:, None]).flatten()
        per_bin = models * ECE_BINS
        c = self.calibration
        c[:, :ECE_BINS] += torch.bincount(bins, minlength=per_bin).view(models, ECE_BINS).double()
        c[:, ECE_BINS:2 * ECE_BINS] += torch.bincount(bins, weights=conf.double().flatten(),
                                                      minlength=per_bin).view(models, ECE_BINS)
        c[:, 2 * ECE_BINS:3 * ECE_BINS] += torch.bincount(bins, weights=correct.flatten(),
                                                          minlength=per_bin).view(models, ECE_BINS)
        index = labels.view(1, -1, 1).expand(models, -1, 1)
        c[:, -2] -= log_p.gather(2, index).squeeze(2).double().sum(1)
        p_true = p.gather(2, index).squeeze(2).double()
        # sum_c (p_c - 1[c = y])^2 = sum_c p_c^2 - 2 p_y + 1
        c[:, -1] += p.double().square().sum(dim=(1, 2)) - 2 * p_true.sum(1) + labels.numel()
        for group, index in self.index.items():
            gp, glp, gpred = p[index].double(), log_p[index].double(), pred[index]
            disagree = (gpred[:, None, :] != gpred[None, :, :]).double().sum(2)  # (m, m)
            # KL(a || b) summed over images = sum p_a log p_a - sum p_a log p_b
            cross = torch.einsum("abc,dbc->ad", gp, glp)
            kl = cross.diagonal()[:, None] - cross
            hits = (gp.mean(0).argmax(dim=1) == labels).double().sum()
            self.group_sums[group] += torch.cat([disagree.flatten(), kl.flatten(), hits.view(1)])

    def tensors(self) -> List[torch.Tensor]:
        """Everything summed across ranks."""
        return [self.calibration, *self.group_sums.values()]

    def result(self, count: int, top1: Dict[str, float]) -> Dict:
        n = max(count, 1)
        calibration = {}
        for row, name in enumerate(self.names):
            s = self.calibration[row].tolist()
            gaps = sum(abs(s[2 * ECE_BINS + b] - s[ECE_BINS + b]) for b in range(ECE_BINS))
            calibration[name] = {"ece": 100.0 * gaps / n, "nll": s[-2] / n, "brier": s[-1] / n}
        groups = {}
        for group, members in self.groups.items():
            m = len(members)
            s = self.group_sums[group].tolist()
            matrix = [[100.0 * s[a * m + b] / n for b in range(m)] for a in range(m)]
            kl = [[s[m * m + a * m + b] / n for b in range(m)] for a in range(m)]
            pairs = m * (m - 1)
            ensemble = 100.0 * s[-1] / n
            groups[group] = {"members": members, "disagreement": sum(map(sum, matrix)) / pairs,
                             "disagreement_matrix": matrix, "kl": sum(map(sum, kl)) / pairs,
                             "ensemble_top1": ensemble,
                             "ensemble_gain": ensemble - sum(top1[x] for x in members) / m}
        return {"groups": groups, "calibration": calibration}


__all__ = ["Diagnostics", "ECE_BINS", "numbered_groups"]
