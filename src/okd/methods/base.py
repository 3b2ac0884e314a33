"""The contract every online-distillation method fulfils, and the bases that fulfil most of it.

A method owns all of its networks (students, teachers, temporal means) as one
``nn.Module``; the trainer only sees this interface (mdistiller style). The
abstract methods must be implemented, or building the method fails at once
with a one-line error naming what is missing:

* ``forward_train(views, labels)`` -> {term name: weighted loss term}; every
  coefficient and the ramp-up are already applied, so the loss is the sum of
  the terms (``total_loss``) and the logged terms show what drives the
  gradient; it is the module's ``forward``, so the step calls it directly;
* ``evaluate_logits(images)`` -> {model name: logits} for every model it can test;
* ``summary_metrics(acc)`` -> the labelled headline numbers; the first must be
  ``reported`` (the model the method deploys) and selects ``best.pt``;
* ``deployable_state_dict()``: the reported model, loadable into
  ``okd.create_model(backbone, num_classes)``.

Optional: ``num_views`` (independently augmented views per batch), ``after_step``
(bookkeeping after each optimizer step, e.g. a temporal mean; it gets the step
index and whether the step was applied as device tensors, and must not read
them on the host),
``parameter_groups`` (SGD groups, e.g. FFL's own weight decay for its fusion
module), ``branch_dropout`` (the method's default ``model.dropout``).

Graph-safe forward: the trainer may capture the whole step in a CUDA graph
and replay it across epochs, or compile it, so ``forward_train`` sees no epoch:
the epoch's distillation factor is ``self.kd_scale``, a 0-dim buffer that the
trainer fills in place before each epoch from ``options.kd_scale(epoch)``
(outside the graph and outside torch.compile, whose guard on a Python int would
recompile every epoch). A method multiplies its distillation terms by it.

Options are a dataclass ``Options`` on the class, validated under ``method.*``;
``KDOptions`` declares what every distillation method has (temperature,
ramp-up, the factor ``kd_scale(epoch)``) and checks it, with any member count
and ``kd_weight``, once.
Each loss is also a plain function of logits in the method's file (or in
``okd.losses``), so it is tested against hand-computed values.
"""
from __future__ import annotations

import inspect
import re
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import ConfigError, OkdError
from ..losses import logit_mean, sigmoid_rampup
from ..models import BackboneSpec, IndependentNets, MultiBranchNet

Terms = Dict[str, torch.Tensor]


class MethodContractError(OkdError):
    """A method class that does not implement the whole ``Method`` interface."""


@dataclass(frozen=True)
class Summary:
    key: str  # stable name used in metrics files and TensorBoard
    label: str  # what a human reads in logs
    value: float


def require(ok: bool, method: str, option: str, requirement: str, value) -> None:
    """A one-line ConfigError naming the option, what it must be and what it was."""
    if not ok:
        raise ConfigError(f"config key 'method.{option}' must be {requirement} for {method}, got {value!r}")


MEMBER_COUNTS = ("num_networks", "num_branches", "num_peers")


@dataclass
class MethodOptions:
    """Base of every method's ``Options``; ``name`` is the registered method name."""

    method_name: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return self.method_name

    def check(self) -> None:
        """Range checks of the options (types are checked by the config loader)."""

    def kd_scale(self, epoch: int) -> Optional[float]:
        """The factor on the distillation terms in ``epoch``; None: the method distils nothing."""
        return None


@dataclass
class KDOptions(MethodOptions):
    """What every distillation method has: KD temperature T and ramp-up length R (0: none)."""

    temperature: float = 3.0
    rampup_epochs: int = 80

    def kd_scale(self, epoch: int) -> float:
        """The factor on the distillation terms in ``epoch``: the sigmoid ramp-up over ``rampup_epochs``
        (a method with a constant coefficient on them multiplies it in)."""
        return sigmoid_rampup(epoch, self.rampup_epochs)

    def check(self) -> None:
        require(self.temperature > 0, self.name, "temperature", "> 0", self.temperature)
        require(self.rampup_epochs >= 0, self.name, "rampup_epochs", ">= 0", self.rampup_epochs)
        for key in MEMBER_COUNTS:
            if hasattr(self, key):
                require(getattr(self, key) >= 2, self.name, key, ">= 2", getattr(self, key))
        if hasattr(self, "kd_weight"):
            require(self.kd_weight >= 0, self.name, "kd_weight", ">= 0", self.kd_weight)


def total_loss(terms: Terms) -> torch.Tensor:
    """The training loss: the sum of the method's weighted terms, in their order."""
    values = iter(terms.values())
    total = next(values)
    for value in values:
        total = total + value
    return total


def where_defined(cls) -> str:
    try:
        return f"{inspect.getsourcefile(cls)}:{inspect.getsourcelines(cls)[1]}"
    except (OSError, TypeError):
        return cls.__module__


class Method(nn.Module, metaclass=ABCMeta):
    Options = MethodOptions
    num_views: int = 1
    branch_dropout: float = 0.0  # default model.dropout of backbones with dropout (VGG)
    # why ``model.name`` must be one backbone for this method (``cohort_size`` None)
    identical_networks: ClassVar[str] = "shares one trunk between its branches"
    cohort_hint: ClassVar[str] = " (method.num_networks)"  # the option that sets the cohort's size
    # the authors' training recipe where it differs from okd's common protocol (configs/cifar100.yml):
    # {dotted config key: the authors' value}; configs/methods/<name>.yml sets exactly these (a test keeps
    # them equal) and okd.recipes labels every run with the recipe it used
    recipe: ClassVar[Dict[str, Any]] = {}

    @classmethod
    def cohort_size(cls, options: MethodOptions) -> Optional[int]:
        """How many independent networks ``model.name`` may list one backbone each for; None: the method
        needs one backbone for all its members."""
        return None

    @classmethod
    def unsupported(cls, spec: BackboneSpec) -> Optional[str]:
        """Why this method cannot be built on backbone ``spec`` (its one-line error), or None."""
        return None

    @property
    def deployable_backbone(self) -> str:
        """The backbone of ``deployable_state_dict`` (``okd.create_model``'s name)."""
        return self.backbones[0]

    def __new__(cls, *args, **kwargs):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            raise MethodContractError(
                f"method class {cls.__name__} ({where_defined(cls)}) does not implement {', '.join(missing)}; "
                f"see docs/extending.md")
        return super().__new__(cls)

    def __init__(self, spec: Union[BackboneSpec, Sequence[BackboneSpec]], num_classes: int, options: MethodOptions):
        super().__init__()
        options.check()
        self.options = options
        self.num_classes = num_classes
        # the members' backbone names: one for a single backbone, one per network for a cohort
        self.backbones = [s.name for s in spec] if isinstance(spec, (list, tuple)) else [spec.name]
        # options.kd_scale(epoch) on the device, filled in place by the trainer (a CUDA graph reads it)
        self.register_buffer("kd_scale", torch.zeros(()), persistent=False)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward_train" in cls.__dict__:  # calling the module (through DDP, compiled) is forward_train
            cls.forward = cls.__dict__["forward_train"]

    @abstractmethod
    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor) -> Terms:
        """{term name: weighted term}; the loss is their sum."""

    @abstractmethod
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{model name: logits} of every model the method can test."""

    @abstractmethod
    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        """Headline numbers from the models' accuracies; the first is ``reported``."""

    @abstractmethod
    def deployable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The reported model's weights in ``okd.create_model``'s layout."""

    def training_loss(self, views: List[torch.Tensor], labels: torch.Tensor, epoch: int
                      ) -> Tuple[torch.Tensor, Terms]:
        """(loss, terms) of one batch in ``epoch``, outside the trainer (tests, benchmarks)."""
        # a new tensor rather than fill_: a loss built earlier (another epoch) keeps the factor autograd saved
        # for it; the trainer fills the one buffer in place, which a CUDA graph of the step reads
        self.kd_scale = torch.full((), self.options.kd_scale(epoch) or 0.0, dtype=self.kd_scale.dtype,
                                   device=self.kd_scale.device)
        terms = self.forward_train(views, labels)
        return total_loss(terms), terms

    def after_step(self, step: torch.Tensor, applied: torch.Tensor = 1.0) -> None:
        """Called after every optimizer step: ``step`` is its 0-based global index and ``applied``
        1.0 when it was taken, 0.0 when the non-finite policy skipped it (0-dim device tensors)."""

    def after_epoch(self, epoch: int) -> None:
        """Called after each epoch's evaluation (0-based ``epoch``) and before ``last.pt`` is written:
        bookkeeping on the epoch's scale (OKDPH's fusion of its students)."""

    def diagnostic_groups(self, names: Sequence[str]) -> Dict[str, List[str]]:
        """The groups of members whose diversity every evaluation measures (``okd.diagnostics``), from the
        names of ``evaluate_logits``: by default the numbered models of each prefix with two or more
        (net1..m, branch1..m, peer1..m, mean_peer1..m)."""
        return numbered_groups(names)

    def parameter_groups(self) -> List[Dict]:
        """SGD groups; a group may set ``lr_scale`` (its lr relative to ``optim.lr``) and ``hold`` (a 0-dim
        device tensor: 1.0 leaves the group untouched by that step; see ``okd.optim``)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]


def numbered_groups(names: Sequence[str]) -> Dict[str, List[str]]:
    """Models named ``<prefix><number>`` grouped by prefix, where a prefix has two or more (peer1..3 ->
    "peer", mean_peer1..3 -> "mean_peer"), in their numbers' order."""
    groups: Dict[str, List[tuple]] = {}
    for name in names:
        match = re.fullmatch(r"(.*?)(\d+)", name)
        if match:
            groups.setdefault(match.group(1), []).append((int(match.group(2)), name))
    return {prefix: [n for _, n in sorted(members)] for prefix, members in groups.items() if len(members) >= 2}


def numbered_logits(prefix: str, logits: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """{"<prefix>1": z_1, "<prefix>2": z_2, ...}: the names models are logged under."""
    return {f"{prefix}{i + 1}": z for i, z in enumerate(logits)}


def member_summaries(acc: Dict[str, float], prefix: str, count: int, noun: str) -> List[Summary]:
    """Member 1 as the reported model (docs/methods.md §3-6, 8), then the mean over all members."""
    values = [acc[f"{prefix}{i + 1}"] for i in range(count)]
    return [Summary("reported", f"{noun} 1 (reported)", values[0]),
            Summary(f"mean_{prefix}", f"mean over {plural(noun)}", sum(values) / count)]


def cohort_summaries(acc: Dict[str, float], prefix: str, backbones: Sequence[str], noun: str,
                     reported: int = 0, rule: str = "reported") -> List[Summary]:
    """Networks of different backbones: the reported one first, then each network labelled with its
    backbone (a mean over different architectures would mix them)."""
    label = "{noun} {i} ({backbone})"
    first = f"{noun} {reported + 1} ({backbones[reported]}, {rule})"
    return [Summary("reported", first, acc[f"{prefix}{reported + 1}"]),
            *(Summary(f"{prefix}{i + 1}", label.format(noun=noun, i=i + 1, backbone=b), acc[f"{prefix}{i + 1}"])
              for i, b in enumerate(backbones))]


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("ch", "sh", "s", "x")) else "s")


class IndependentNetworksMethod(Method):
    """Test-time side of methods with m independent networks in ``self.nets`` (DML, KDCL); ``model.name``
    may list one backbone per network (a heterogeneous cohort)."""

    nets: IndependentNets

    @classmethod
    def cohort_size(cls, options) -> Optional[int]:
        return options.num_networks

    @property
    def heterogeneous(self) -> bool:
        return len(set(self.backbones)) > 1

    @torch.no_grad()
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.nets(images)
        return {**numbered_logits("net", logits), "ensemble": logit_mean(logits)}

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        members = (cohort_summaries(acc, "net", self.backbones, "network") if self.heterogeneous
                   else member_summaries(acc, "net", len(self.nets), "network"))
        return [*members, Summary("ensemble", "logit-mean ensemble", acc["ensemble"])]

    def deployable_state_dict(self):
        return self.nets.nets[0].state_dict()


class SharedTrunkMethod(Method):
    """Test-time side of methods with m branches on one trunk in ``self.net`` (CL, ONE, FFL-S).

    A subclass names its extra test-time models in ``extra_models`` ({key: label},
    logged after the branches and summarised after the mean over branches) and
    computes them in ``test_outputs``. Branch 1 is the reported model.
    """

    net: MultiBranchNet
    extra_models: ClassVar[Dict[str, str]] = {"ensemble": "logit-mean ensemble"}

    def test_outputs(self, images: torch.Tensor) -> Tuple[List[torch.Tensor], Dict[str, torch.Tensor]]:
        """(branch logits, {extra model: logits}); by default the logit mean."""
        logits = self.net(images).logits
        return logits, {"ensemble": logit_mean(logits)}

    @torch.no_grad()
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits, extra = self.test_outputs(images)
        return {**numbered_logits("branch", logits), **extra}

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        return [*member_summaries(acc, "branch", len(self.net.branches), "branch"),
                *(Summary(key, label, acc[key]) for key, label in self.extra_models.items())]

    def deployable_state_dict(self):
        return self.net.single_state_dict(0)
