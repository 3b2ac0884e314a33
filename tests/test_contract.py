"""The method and backbone contracts, checked for every registered method and backbone.

Parametrised over the registries, not literal lists: a new method or backbone file
is checked here without editing this file.
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, large_backbones, random_batch

from okd import create_model
from okd.errors import ConfigError, OkdError
from okd.methods import (
    METHODS,
    KDOptions,
    Method,
    MethodOptions,
    build_method,
    total_loss,
)
from okd.methods.base import MethodContractError
from okd.models import BACKBONES, backbone_spec
from okd.registry import Registry

LARGE = large_backbones()  # 1-30 M parameters per network: slow to build 8 times
CLASSES = 10


def backbone_params(names):
    return [pytest.param(b, marks=pytest.mark.slow) if b in LARGE else b for b in names]


@pytest.mark.parametrize("backbone", backbone_params(BACKBONES.names()))
@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_keeps_the_contract_on_every_backbone(name, backbone):
    torch.manual_seed(0)
    spec = backbone_spec(backbone, CLASSES)
    reason = METHODS.get(name).unsupported(spec)
    if reason:  # a backbone the method cannot carry is refused in one line, naming it
        assert backbone in reason and "\n" not in reason
        with pytest.raises(ConfigError, match=re.escape(reason)):
            build_method(name, spec, CLASSES, METHODS.get(name).Options())
        return
    method = build_method(name, spec, CLASSES, METHODS.get(name).Options()).train()
    views, labels = random_batch(method.num_views, classes=CLASSES)
    loss, terms = method.training_loss(views, labels, epoch=40)
    # the loss is the sum of the logged terms, all finite
    assert terms and all(torch.isfinite(v) for v in terms.values())
    assert torch.equal(loss, total_loss(terms))
    assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)
    # one SGD step over the method's parameter groups trains (nearly) every parameter it does not hold
    # in that step (SwitOKD's teacher pauses when its mode says so: okd.optim keeps such a group exactly)
    groups = method.parameter_groups()
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    trained = [p for g in groups if not ("hold" in g and float(g["hold"]) > 0) for p in g["params"]]
    before = [p.detach().clone() for p in trained]
    loss.backward()
    opt.step()
    method.after_step(0)
    assert trained and sum(not torch.equal(a, b) for a, b in zip(before, trained)) > 0.9 * len(before)
    method.eval()
    test_images = torch.randn(3, 3, 32, 32)
    logits = method.evaluate_logits(test_images)
    assert all(z.shape == (3, CLASSES) for z in logits.values())
    summaries = method.summary_metrics({k: float(i) for i, k in enumerate(logits)})
    assert summaries[0].key == "reported" and not any("branchs" in s.label for s in summaries)
    assert all(torch.isfinite(z).all() for z in logits.values())
    # the deployable network is the reported model: same logits, bit for bit
    deployed = create_model(backbone, CLASSES).eval()
    deployed.load_state_dict(method.deployable_state_dict(), strict=True)
    reported = [k for i, k in enumerate(logits) if float(i) == summaries[0].value]
    assert len(reported) == 1
    assert torch.equal(deployed(test_images), logits[reported[0]])


@pytest.mark.parametrize("name", METHODS.names())
def test_kd_weight_is_coefficient_times_rampup(name):
    options = METHODS.get(name).Options()
    method = build_method(name, backbone_spec("resnet8_tiny", CLASSES), CLASSES, options)
    if not isinstance(options, KDOptions):
        assert options.kd_scale(0) is None
        return
    # the constant factor on the KD terms (docs/methods.md): CL's paper form 1 - beta, KDCL's and OKDDip's kd_weight
    coefficient = (1.0 - options.beta if options.form == "paper" else 1.0) if name == "cl" else \
        getattr(options, "kd_weight", 1.0)
    R = options.rampup_epochs
    for epoch in (0, 7, 200):
        ramp = 1.0 if R == 0 else math.exp(-5 * (1 - min(epoch, R) / R) ** 2)
        assert options.kd_scale(epoch) == pytest.approx(coefficient * ramp, rel=1e-12)
    assert method.kd_scale.shape == () and "kd_scale" not in method.state_dict()  # filled per epoch, not saved


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_every_backbone_keeps_the_trunk_branch_shape_contract(backbone):
    """FFL fuses last maps of feature_dim channels, OKDDip pools them, ONE's gate reads trunk_channels."""
    spec = backbone_spec(backbone, CLASSES)
    trunk, branch = spec.make_trunk().eval(), spec.make_branch().eval()
    with torch.no_grad():
        shared = trunk(torch.randn(2, 3, 32, 32))
        fmap = branch.feature_map(shared)
        out = branch(shared)
    assert shared.shape[1] == spec.trunk_channels
    assert fmap.dim() == 4 and fmap.shape[1] == spec.feature_dim
    assert out.feature.shape == (2, spec.feature_dim) and out.logits.shape == (2, CLASSES)
    assert torch.allclose(out.feature, fmap.mean(dim=(2, 3)), atol=1e-6)  # the feature is the pooled map
    assert branch.fc.in_features in (spec.feature_dim, 512)  # VGG's hidden FC layers keep 512


def test_an_incomplete_method_fails_when_built_naming_what_is_missing():
    class Half(Method):
        @dataclass
        class Options(MethodOptions):
            pass

        def forward_train(self, views, labels):
            return {}

        def evaluate_logits(self, images):
            return {}

    with pytest.raises(MethodContractError) as err:
        Half(backbone_spec("resnet8_tiny", CLASSES), CLASSES, Half.Options())
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, OkdError)
    assert "deployable_state_dict, summary_metrics" in message and "test_contract.py" in message


def test_registering_a_method_without_its_own_options_is_refused():
    with pytest.raises(MethodContractError, match="needs its own 'Options' dataclass"):
        @METHODS.register("no_options_here")
        class NoOptions(Method):  # noqa: F841  (inherits Method.Options)
            pass
    assert "no_options_here" not in METHODS


def test_unknown_names_say_where_a_new_entry_goes():
    with pytest.raises(ConfigError) as err:
        METHODS.get("dmll")
    text = str(err.value)
    assert "did you mean 'dml'" in text and "src/okd/methods/" in text and "@METHODS.register('dmll')" in text
    with pytest.raises(ConfigError, match=r"src/okd/models/ .*@BACKBONES.register\('resnet57'\)"):
        BACKBONES.get("resnet57")


def test_a_new_module_in_a_registry_package_is_found_without_editing_another_file(tmp_path, monkeypatch):
    from okd.registry import import_submodules

    package = tmp_path / "plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mvcl.py").write_text(
        "from okd_contract_test_registry import REG\n@REG.register('mvcl')\ndef mvcl():\n    return 1\n")
    registry = Registry("thing")
    import sys
    import types
    monkeypatch.setitem(sys.modules, "okd_contract_test_registry", types.SimpleNamespace(REG=registry))
    monkeypatch.syspath_prepend(str(tmp_path))
    import_submodules("plugins", [str(package)])
    assert registry.get("mvcl")() == 1


def extension_examples():
    """The code blocks of docs/extending.md that stand for a file (first line '# src/okd/...'), keyed by it."""
    text = (REPO / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(# (src/okd/\S+)\n.*?)```", text, flags=re.S)
    return {path: code for code, path in blocks}


def test_the_extension_examples_work_as_printed(tmp_path):
    from okd.config import DataConfig, load_config
    from okd.data import DATASETS, load_dataset

    examples = extension_examples()
    assert set(examples) == {"src/okd/methods/ekd.py", "src/okd/models/resnet20.py", "src/okd/data/npz.py"}
    registries = {"src/okd/methods/ekd.py": (METHODS, "ekd"), "src/okd/models/resnet20.py": (BACKBONES, "resnet20"),
                  "src/okd/data/npz.py": (DATASETS, "npz")}
    added = []
    try:
        for path, code in examples.items():
            added.append(registries[path])
            exec(compile(code, path, "exec"), {"__name__": f"extending_{Path(path).stem}"})
        # the method keeps the contract (and trains through the config like any other)
        test_every_method_keeps_the_contract_on_every_backbone("ekd", "resnet8_tiny")
        cfg = load_config(None, ["method.name=ekd", "method.temperature=4", "model.name=resnet20"])
        assert cfg.method.temperature == 4.0 and cfg.method.num_branches == 3
        # ResNet-20: 3 stages of 3 BasicBlocks, 0.27 M parameters at 10 classes
        test_every_backbone_keeps_the_trunk_branch_shape_contract("resnet20")
        assert sum(p.numel() for p in create_model("resnet20", 10).parameters()) == 272_474
        # the dataset: a missing file is one line, a present one loads
        with pytest.raises(OkdError, match="expects .*data.npz holding x_train"):
            load_dataset(DataConfig(name="npz", root=str(tmp_path)))
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "data.npz", x_train=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                 y_train=np.arange(20) % 4, x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
                 y_test=np.arange(8) % 4)
        data = load_dataset(DataConfig(name="npz", root=str(tmp_path)))
        assert data.train.images.shape == (20, 3, 32, 32) and data.num_classes == 4
    finally:
        for registry, name in added:
            registry._entries.pop(name, None)


def test_every_method_registers_its_table_title_and_a_missing_one_is_refused():
    from okd.methods.base import MethodContractError
    from okd.report import method_title

    titles = {name: METHODS.meta(name)["title"] for name in METHODS.names()}
    assert titles["ffl"] == "FFL-S" and titles["okddip"] == "OKDDip" and method_title("ffl_s") == "FFL-S"
    assert all(isinstance(t, str) and t for t in titles.values())

    class Untitled(METHODS.get("dml")):
        Options = type("Options", (METHODS.get("dml").Options,), {})

    with pytest.raises(MethodContractError, match=r"register\('untitled'\) needs title="):
        METHODS.register("untitled")(Untitled)
    assert "untitled" not in METHODS


def test_every_dataset_that_declares_its_size_has_it():
    from okd.config import DataConfig
    from okd.data import DATASETS, load_dataset
    from okd.plan import dataset_size

    declared = {name: DATASETS.meta(name) for name in DATASETS.names()}
    assert declared["cifar10"] == {"train_images": 50_000, "num_classes": 10}
    assert declared["cifar100"] == {"train_images": 50_000, "num_classes": 100}
    assert declared["tinyimagenet"] == {"train_images": 100_000, "num_classes": 200}
    assert declared["imagenet"] == {"train_images": 1_281_167, "num_classes": 1000}
    # the embedded digits: 1,797 scans, 20 % of each class to test (rounded per class) leaves 1,438
    digits = load_dataset(DataConfig(name="digits"))
    assert (len(digits.train), digits.num_classes) == (declared["digits"]["train_images"], 10) == (1_438, 10)
    assert dataset_size(DataConfig(name="cifar100", train_subset=1000)) == (1000, 100)


def datasets_on_files():
    from okd.data import DATASETS

    return [name for name in DATASETS.names() if name != "digits"]  # the digits are embedded: never missing


@pytest.mark.parametrize("name", datasets_on_files())
def test_every_dataset_on_files_says_in_one_line_what_it_expected_where(name, tmp_path):
    from okd.config import DataConfig
    from okd.data import load_dataset
    from okd.errors import DataError

    with pytest.raises(DataError) as failure:
        load_dataset(DataConfig(name=name, root=str(tmp_path / "empty")))
    message = str(failure.value)
    assert "\n" not in message and str(tmp_path / "empty") in message, message


BROKEN_FILES = {  # file text -> (the line it must be blamed on, what the one-line error says)
    "untitled.py": ("from okd.methods import METHODS\nfrom okd.methods.dml import DML\n\n\n"
                    "@METHODS.register('untitled')\nclass Untitled(DML):\n    Options = type('Options', (DML.Options,), {})\n",
                    5, "@METHODS.register('untitled') needs title="),
    "typo.py": ("import torch\n\nx = 1\ndef f(:\n    pass\n", 4, "SyntaxError: "),
    "missing.py": ("\n\nfrom okd.losses import no_such_loss  # noqa\n", 3, "ImportError: cannot import name 'no_such_loss'"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_a_broken_file_in_a_registry_folder_is_a_one_line_error_naming_its_file_and_line(tmp_path, monkeypatch,
                                                                                       name):
    """The registry keeps it and raises on first use, inside every command's error handling."""
    import sys

    from okd.errors import OkdError
    from okd.registry import PluginError, import_submodules

    text, line, says = BROKEN_FILES[name]
    package_name = f"broken_{Path(name).stem}"
    package = tmp_path / package_name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("method")
    try:
        import_submodules(package_name, [str(package)], registry)  # importing the package does not fail
        with pytest.raises(PluginError) as err:
            registry.get("dml")
        message = str(err.value)
        assert isinstance(err.value, OkdError) and "\n" not in message
        assert message.startswith(f"broken method file {package / name}:{line}: ") and says in message, message
        for use in (registry.names, lambda: "dml" in registry, lambda: registry.meta("dml")):
            with pytest.raises(PluginError):
                use()
        with pytest.raises(PluginError, match=f"broken module file {re.escape(str(package / name))}:{line}: "):
            import_submodules(package_name, [str(package)])  # without a registry: raised at once
    finally:
        for module in [m for m in sys.modules if m.split(".")[0] == package_name]:
            del sys.modules[module]


def test_a_method_file_without_a_title_stops_every_command_with_exit_2_naming_the_file(tmp_path):
    """A copy of okd with one more method file, registered without title=: training and the planner say
    so in one line and exit 2 (before: a traceback at import, exit 1)."""
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "okd_copy"
    shutil.copytree(REPO / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "main.py", copy / "main.py")
    text, line, says = BROKEN_FILES["untitled.py"]
    bad = copy / "src" / "okd" / "methods" / "untitled.py"
    bad.write_text(text)
    env = {**__import__("os").environ, "PYTHONPATH": str(copy / "src")}
    runs = tmp_path / "runs"
    for argv in ([sys.executable, str(copy / "main.py"), "--config", str(REPO / "configs" / "quickstart.yml"),
                  f"output.root={runs}"],
                 [sys.executable, "-m", "okd.plan", "--config", str(REPO / "configs" / "quickstart.yml")]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
        assert proc.returncode == 2, proc.stderr[-2000:]
        (error,) = proc.stderr.strip().splitlines()
        assert f"error: broken method file {bad}:{line}: {says}" in error, error
    assert not runs.exists()  # nothing was written
