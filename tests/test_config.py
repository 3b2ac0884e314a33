"""Config loading: defaults, inheritance, overrides, one-line errors naming the key."""
from pathlib import Path

import pytest
import torch

from okd.config import load_config
from okd.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_paper_protocol():
    cfg = load_config()
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.1, 0.9, True, 5e-4)
    assert (cfg.train.epochs, cfg.train.batch_size) == (300, 128)
    assert cfg.schedule.milestones == [150, 225] and cfg.schedule.gamma == 0.1
    # speed settings default to the device (okd.devices): the paper protocol does not depend on them
    assert (cfg.train.precision, cfg.train.channels_last, cfg.train.cuda_graphs) == ("auto", None, None)
    assert cfg.to_dict()["method"] == {"name": "pcl", "num_peers": 3, "temperature": 3.0, "rampup_epochs": 80,
                          "ema_decay": 0.999, "ema_buffers": "own", "fused_views": None,
                          "ensemble_teacher": True, "mean_teacher": True, "peer_views": True}


def test_repo_configs_load():
    for name in ("cifar100", "cifar10", "cifar10_imagefolder", "quickstart"):
        cfg = load_config(str(CONFIGS / f"{name}.yml"))
        assert cfg.method.name == "pcl"
    assert load_config(str(CONFIGS / "cifar10.yml")).data.name == "cifar10"
    assert load_config(str(CONFIGS / "cifar10.yml")).train.epochs == 300  # inherited from cifar100.yml


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "parent.yml", "train:\n  epochs: 10\n  batch_size: 32\nschedule:\n  milestones: [5]\nmethod:\n  temperature: 4\n")
    child = write(tmp_path, "child.yml", "base: parent.yml\ntrain:\n  epochs: 20\n")
    cfg = load_config(child, ["train.batch_size=16", "model.name=vgg16", "method.ema_decay=0.99", "seed=3"])
    assert cfg.train.epochs == 20 and cfg.train.batch_size == 16
    assert cfg.model.name == "vgg16" and cfg.seed == 3
    assert cfg.method.temperature == 4.0 and cfg.method.ema_decay == 0.99
    assert cfg.method.temperature == 4.0


def test_alias_resolves_to_canonical():
    assert load_config(None, ["model.name=wide_resnet20_8"]).model.name == "wrn20_8"


@pytest.mark.parametrize("yaml_text,override,fragment", [
    ("train:\n  epoch: 3\n", [], "unknown config key 'train.epoch' (did you mean 'epochs'?)"),
    ("trian:\n  epochs: 3\n", [], "unknown config key 'trian' (did you mean 'train'?)"),
    ("method:\n  temprature: 3\n", [], "unknown config key 'method.temprature' (did you mean 'temperature'?)"),
    ("train:\n  epochs: ten\n", [], "config key 'train.epochs' must be an integer, got 'ten'"),
    ("optim:\n  nesterov: 1\n", [], "config key 'optim.nesterov' must be true/false"),
    ("schedule:\n  milestones: 150\n", [], "config key 'schedule.milestones' must be a list"),
    ("optim:\n  lr: -0.1\n", [], "config key 'optim.lr' must be > 0"),
    ("train:\n  epochs: 0\n", [], "config key 'train.epochs' must be > 0"),
    ("", ["model.name=resnte32"], "unknown model 'resnte32' (did you mean 'resnet32'?)"),
    ("", ["method.name=pcll"], "unknown method 'pcll' (did you mean 'pcl'?)"),
    ("", ["data.name=cifar1000"], "unknown dataset 'cifar1000'"),
    ("", ["train.epochs"], "must look like key.sub=value"),
    ("", ["device=gpu"], "config key 'device' must be auto, cpu, cuda or cuda:N"),
    ("train: [1, 2\n", [], "YAML syntax error"),
    ("- 1\n- 2\n", [], "must be a mapping"),
    ("train: 5\n", [], "config key 'train' must be a section"),
])
def test_errors_name_the_key(tmp_path, yaml_text, override, fragment):
    path = write(tmp_path, "bad.yml", yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, override)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yml")


def test_ints_accepted_for_floats_but_not_bools():
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError):
        load_config(None, ["optim.lr=true"])


# ---------------------------------------------------------------- methods

def test_method_yamls_spell_out_the_code_defaults():
    """configs/methods/<m>.yml and the Options defaults in code must not drift apart."""
    from dataclasses import asdict

    from okd.methods import METHODS

    names = sorted(p.stem for p in (CONFIGS / "methods").glob("*.yml"))
    assert names == sorted(METHODS.names())
    for name in names:
        cfg = load_config(str(CONFIGS / "methods" / f"{name}.yml"))
        assert cfg.to_dict()["method"] == {"name": name, **asdict(METHODS.get(name).Options())}, name
        assert cfg.data.name == "cifar100"


def test_method_yamls_differ_from_the_common_protocol_exactly_by_the_authors_recipe():
    """Outside ``method``, configs/methods/<m>.yml changes exactly the keys of Method.recipe, to its values;
    and the recipe label tells the two apart."""
    from okd.methods import METHODS
    from okd.recipes import AUTHORS, COMMON, recipe_label
    from okd.run_dir import flatten as flat

    common = flat(load_config(str(CONFIGS / "cifar100.yml")).to_dict())
    for name in METHODS.names():
        ours = flat(load_config(str(CONFIGS / "methods" / f"{name}.yml")).to_dict())
        changed = {k: v for k, v in ours.items() if not k.startswith(("method.", "run_name")) and common.get(k) != v}
        recipe = METHODS.get(name).recipe
        model = changed.pop("model.name", None)
        assert changed == {k: v for k, v in recipe.items() if k != "model.name"}, name
        assert model == recipe.get("model.name"), name
        as_authors = load_config(str(CONFIGS / "methods" / f"{name}.yml")).to_dict()
        on_common = load_config(str(CONFIGS / "cifar100.yml"), [f"method.name={name}"]).to_dict()
        assert recipe_label(as_authors) == (AUTHORS if recipe else COMMON), name
        assert recipe_label(on_common) == COMMON, name
    assert set(METHODS.get("switokd").recipe) == {"model.name", "optim.nesterov", "train.epochs",
                                                  "schedule.milestones"}


def test_recipe_label_names_the_keys_that_are_not_the_authors():
    from okd.recipes import recipe_label

    cfg = load_config(str(CONFIGS / "methods" / "switokd.yml"), ["train.epochs=300", "schedule.milestones=[140,200,250]"])
    assert recipe_label(cfg.to_dict()) == "mixed (not the authors': train.epochs, schedule.milestones)"
    # OKDPH's recipe is its optimizer and its views
    okdph = ["method.name=okdph", "optim.nesterov=false"]
    assert recipe_label(load_config(None, okdph).to_dict()) == "mixed (not the authors': data.views)"
    views = "data.views=[crop+flip+rotate, crop+flip+cutout, crop+randaugment]"
    assert recipe_label(load_config(None, [*okdph, views]).to_dict()) == "authors' recipe"
    assert recipe_label({"method": {"name": "not-a-method"}}) == "common protocol"


@pytest.mark.filterwarnings("ignore:Detected call of")  # the schedule alone, without optimizer steps
def test_switokd_recipe_drops_the_lr_in_the_same_epochs_as_the_authors_code():
    """SwitOKD's main.py: ``for epoch in range(1, 300)``, lr x0.1 on entering epochs 140, 200, 250 (before that
    epoch's training). okd's epoch e (0-based) is the code's epoch e + 1; every one of the 299 epochs agrees."""
    from okd.methods import build_configured_method
    from okd.optim import Optimization

    cfg = load_config(str(CONFIGS / "methods" / "switokd.yml"), ["model.name=resnet8_tiny", "device=cpu"])
    method = build_configured_method(cfg, 10)
    opt = Optimization.build(cfg, method, torch.device("cpu"))
    code_lr, ours = 0.1, []
    for epoch in range(1, 300):  # the code's loop, its adjust_learning_rate inlined
        if epoch in (140, 200, 250):
            code_lr *= 0.1
        ours.append(float(opt.optimizer.param_groups[0]["lr"]))
        assert ours[-1] == pytest.approx(code_lr, rel=1e-6), epoch
        opt.scheduler.step()  # okd steps its schedule after each epoch
    assert len(ours) == cfg.train.epochs == 299
    assert float(opt.optimizer.param_groups[1]["lr"]) == pytest.approx(0.01 * 1e-3, rel=1e-6)  # the student's


def test_changing_the_method_drops_the_previous_methods_options(tmp_path):
    base = write(tmp_path, "base.yml", "method: {name: pcl, ema_decay: 0.99}\n")
    cfg = load_config(base, ["method.name=dml"])
    assert cfg.method.name == "dml" and not hasattr(cfg.method, "ema_decay")
    # an option given for the new method survives, whatever its place on the command line
    assert load_config(base, ["method.temperature=4", "method.name=dml"]).method.temperature == 4.0
    # naming the same method keeps the file's options
    assert load_config(base, ["method.name=pcl"]).method.ema_decay == 0.99
    child = write(tmp_path, "child.yml", "base: base.yml\nmethod: {name: one, rampup_epochs: 5}\n")
    assert load_config(child).to_dict()["method"] == {"name": "one", "num_branches": 3, "temperature": 3.0,
                                         "rampup_epochs": 5, "detach_teacher": True}


def test_method_flag_on_the_dataset_config():
    from okd.cli import build_parser, flag_overrides

    args = build_parser().parse_args(["--config", str(CONFIGS / "cifar100.yml"), "--method", "dml",
                                      "--model", "vgg16"])
    cfg = load_config(args.config, list(args.overrides) + flag_overrides(args))
    assert (cfg.method.name, cfg.model.name, cfg.data.name) == ("dml", "vgg16", "cifar100")
    assert cfg.run_name == "cifar100_vgg16_dml_seed0"


def test_cl_form_fills_its_defaults():
    assert load_config(None, ["method.name=cl"]).method.temperature == 2.0
    cfg = load_config(None, ["method.name=cl", "method.form=okddip"])
    assert (cfg.method.temperature, cfg.method.rampup_epochs, cfg.method.detach_teacher) == (3.0, 80, False)
    assert load_config(None, ["method.name=cl", "method.form=okddip", "method.temperature=4"]).method.temperature == 4.0


@pytest.mark.parametrize("overrides,message", [
    (["method.name=dml", "method.ema_decay=0.9"], "unknown config key 'method.ema_decay'"),
    (["method.name=kdcl", "method.teacher=linear"], "'method.teacher' must be minlogit or naive"),
    (["method.name=cl", "method.beta=1.5"], "'method.beta' must be in [0, 1]"),
    (["method.name=okddip", "method.num_peers=1"], "'method.num_peers' must be >= 2"),
    (["method.name=onee"], "did you mean 'one'"),
])
def test_bad_method_options_are_named(overrides, message):
    from okd.methods import build_method
    from okd.models import backbone_spec

    with pytest.raises(ConfigError, match=None) as err:
        cfg = load_config(None, overrides)
        build_method(cfg.method.name, backbone_spec("resnet8_tiny", 10), 10, cfg.method)
    assert message in str(err.value)
